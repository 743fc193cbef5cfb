"""Count device-to-host reads: the calls that make a CUDA host wait for the GPU.

``with HostReadCounter() as reads: ...`` records every tensor operation that hands a tensor's
values to Python (``item``, ``tolist``, ``bool(t)``, ``int(t)``, ``float(t)``, ``numpy``,
``torch.equal``, ``torch.allclose``) through a ``TorchFunctionMode``, with the Python
functions on the stack when it happened, so tests can tell *where* reads occur (e.g. inside a
compressed collective) on any device, CPU included. Copies to the CPU are not counted: on a
CPU-only machine they cannot be told apart from moving a host-built tensor (a cached header)
to its device, and values reach Python only through the calls above.

A mode does not see inside ``torch.library`` custom ops (it is suspended while it handles a
call): count reads on the eager path, which calls the same functions directly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
    torch.Tensor.numpy: "numpy",
    torch.equal: "equal",
    torch.allclose: "allclose",
    torch.is_nonzero: "is_nonzero",
}


@dataclass
class HostRead:
    """One read: the operation, and the names and files of the Python functions on the stack."""

    op: str
    stack: tuple[str, ...]
    files: tuple[str, ...] = ()

    def inside(self, *functions: str) -> bool:
        """Whether any of ``functions`` (bare names) was running when the read happened."""
        return any(f in self.stack for f in functions)

    def origin(self, skip: tuple[str, ...] = ()) -> str:
        """The file of the innermost Python frame not under any of the ``skip`` directories
        (e.g. torch's): the code that asked for the read."""
        return next((f for f in self.files if not f.startswith(skip)), "")


@dataclass
class HostReadCounter(TorchFunctionMode):
    """A ``TorchFunctionMode`` that records every device-to-host read (see module docstring)."""

    reads: list[HostRead] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _READS.get(func)
        if op is not None:
            self.reads.append(HostRead(op, *_stack()))
        return func(*args, **kwargs)

    def count(self, *inside: str) -> int:
        """Number of reads (only those made while one of ``inside`` was running, if given)."""
        return sum(1 for r in self.reads if not inside or r.inside(*inside))

    def clear(self) -> None:
        self.reads.clear()


def _stack() -> tuple[tuple[str, ...], tuple[str, ...]]:
    frame, names, files = sys._getframe(2), [], []
    while frame is not None:
        names.append(frame.f_code.co_name)
        files.append(frame.f_code.co_filename)
        frame = frame.f_back
    return tuple(names), tuple(files)


__all__ = ["HostRead", "HostReadCounter"]
