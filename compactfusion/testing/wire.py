"""Counting the bytes a rank hands to ``torch.distributed``, for tests of what goes on the wire."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist

__all__ = ["SentBytes", "counting_sent_bytes"]

# The calls compactfusion's collectives make: the tensor sent is the second positional argument
# (the input of a gather / all-to-all), or the isend operations of a batch.
_COUNTED = ("all_gather_into_tensor", "all_gather_single", "all_to_all_single", "batch_isend_irecv")


class SentBytes:
    """Bytes this rank sent through the counted ``torch.distributed`` calls so far."""

    def __init__(self) -> None:
        self.bytes = 0


@contextlib.contextmanager
def counting_sent_bytes() -> Iterator[SentBytes]:
    """Count, inside the block, the bytes this rank passes to ``torch.distributed``'s
    ``all_gather_into_tensor`` / ``all_gather_single`` / ``all_to_all_single`` (the input
    tensor) and ``batch_isend_irecv`` (the tensors of its ``isend`` operations).

    The functions are wrapped as module attributes, so only callers that look them up at call
    time are seen (compactfusion's collectives do; functional collectives such as diffusers'
    own unpatched traffic do not). The originals are restored on exit.
    """
    counter = SentBytes()
    saved = {name: getattr(dist, name) for name in _COUNTED if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            if name == "batch_isend_irecv":
                ops = [op for op in args[0] if op.op is dist.isend]
                counter.bytes += sum(op.tensor.numel() * op.tensor.element_size() for op in ops)
            else:
                sent = args[1]
                counter.bytes += sent.numel() * sent.element_size()
            return fn(*args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
