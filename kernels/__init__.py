"""Fused Triton kernels for the quantizing codecs (installed as ``compactfusion.kernels``).

For ``int1``, ``int2``, ``fp8`` and ``nm_sparse`` and fp32/fp16/bf16 activations:

* the **sender** kernel reads ``x`` and ``base`` once and writes the whole payload (header
  included) and the updated base ``base + decode(encode(x - base))``; ``int1``/``int2`` with
  channel scales (their default) read ``x`` and ``base`` once more first, for the per-channel
  mean over the tokens (see ``_grouped.py``);
* the **receiver** kernel reads the payload and ``base`` once and writes the updated base into
  ``out`` (``base`` itself, or a strided slice of a larger buffer such as a gathered K/V).

Both produce exactly the bytes and bases of the torch reference codecs in
``compactfusion.codecs`` (same payload format; every rounding is defined so that the fp32
arithmetic agrees bit for bit, see each kernel's docstring).

``lowrank`` codecs are routed to ``lowrank.py`` (matmuls through torch with fused residual and
base-update kernels around them; its docstring states its tolerance).

Public API (what the residual state calls)::

    KernelUnsupported                     ValueError subclass: use the torch reference instead
    supports(codec, shape, dtype) -> bool
    encode_residual(codec, x, base, state=None, *, out=None) -> (payload, new_base)
    decode_residual(codec, payload, base, out=None) -> out

Kernels run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this
package was imported (tests). On CUDA the receiver does not read the payload header back (that
would cost a device-to-host sync per call): it trusts the layout implied by ``base`` and
checks the payload size; on CPU it validates the header fully.
"""

from __future__ import annotations

import functools

import torch

from compactfusion.codecs.base import SUPPORTED_DTYPES
from compactfusion.codecs.lowrank import LowRankCodec

from . import fp8, int1, int2, lowrank, nm_sparse
from ._common import (
    KernelUnsupported,
    Plan,
    as_kernel_arg,
    check_device,
    check_out,
    checked_payload,
    device_header,
    row_stride,
)
from ._common import is_interpreted as _is_interpreted
from ._grouped import grouped_encode_kernel as _probe_kernel

__all__ = ["KernelUnsupported", "decode_residual", "encode_residual", "interpreted", "supports"]

# Codec class -> kernel module (each has ``CODEC``, ``plan``, ``encode``, ``decode``).
_MODULES = {mod.CODEC: mod for mod in (int1, int2, fp8, nm_sparse)}
_INTERPRETED = _is_interpreted(_probe_kernel)


def interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (CPU tensors)."""
    return _INTERPRETED


@functools.lru_cache(maxsize=1024)
def _cached_plan(cls, params, shape, dtype) -> Plan:
    return _MODULES[cls].plan(cls.from_header_params(params), shape, dtype, _INTERPRETED)


def _plan(codec, shape: tuple[int, ...], dtype: torch.dtype) -> Plan:
    if type(codec) not in _MODULES:
        raise KernelUnsupported(
            f"no fused kernels for codec {getattr(codec, 'name', codec)!r} "
            f"(kernels exist for {sorted(c.name for c in _MODULES)})"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise KernelUnsupported(f"kernels support float32, float16 and bfloat16, got {dtype}")
    return _cached_plan(type(codec), codec.header_params(), shape, dtype)


def supports(codec, shape, dtype) -> bool:
    """Whether the kernels handle this codec, shape and dtype (CUDA tensors, or CPU tensors
    under the interpreter, are needed as well)."""
    try:
        shape = tuple(int(s) for s in shape)
        if isinstance(codec, LowRankCodec):
            if dtype not in SUPPORTED_DTYPES:
                return False
            codec.payload_nbytes(shape, dtype)  # validates the shape
        else:
            _plan(codec, shape, dtype)
    except (KernelUnsupported, ValueError, TypeError):
        return False
    return True


def _check_device(*tensors: torch.Tensor) -> None:
    check_device(_INTERPRETED, *tensors)


def encode_residual(
    codec, x: torch.Tensor, base: torch.Tensor, state=None, *, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sender side of one step, fused: same ``(payload, new_base)`` as
    ``codec.encode_residual(x, base, state)``.

    ``out`` (optional) receives the new base and may be ``base`` itself (in-place update);
    by default a new contiguous tensor is returned. Inputs must be finite and within +-2**126
    (the residual state checks ``x`` and the new base after the call): a kernel cannot raise,
    so non-finite residuals give undefined payloads.
    """
    if isinstance(codec, LowRankCodec):
        return lowrank.encode_residual_lowrank(codec, x, base, state, out=out)
    if tuple(x.shape) != tuple(base.shape):
        raise ValueError(f"x {tuple(x.shape)} and base {tuple(base.shape)} differ in shape")
    if x.dtype != base.dtype:
        raise KernelUnsupported(f"x ({x.dtype}) and base ({base.dtype}) must share a dtype")
    shape, dtype = tuple(x.shape), x.dtype
    plan = _plan(codec, shape, dtype)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=base.device)
    check_out(out, base)
    _check_device(x, base, out)
    strides = (
        row_stride(x, plan.rows, plan.cols, "x"),
        row_stride(base, plan.rows, plan.cols, "base"),
        row_stride(out, plan.rows, plan.cols, "out"),
    )
    payload = torch.empty(plan.total, dtype=torch.uint8, device=x.device)
    header = device_header(codec, shape, dtype, x.device)
    _MODULES[type(codec)].encode(
        plan,
        as_kernel_arg(x, dtype),
        as_kernel_arg(base, dtype),
        as_kernel_arg(out, dtype),
        strides,
        payload,
        plan.views(payload),
        header,
        plan.gaps(),
    )
    return payload, out


def decode_residual(
    codec, payload: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Receiver side of one step, fused: ``out = base + decode(payload)``, the same values as
    ``codec.decode_residual``. ``out`` may be ``base`` or a row-strided slice of a larger
    buffer; by default a new contiguous tensor is returned."""
    if isinstance(codec, LowRankCodec):
        return lowrank.decode_residual_lowrank(codec, payload, base, out)
    shape, dtype = tuple(base.shape), base.dtype
    plan = _plan(codec, shape, dtype)
    payload = checked_payload(codec, payload, shape, dtype, plan.total)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=base.device)
    check_out(out, base)
    _check_device(payload, base, out)
    strides = (
        row_stride(base, plan.rows, plan.cols, "base"),
        row_stride(out, plan.rows, plan.cols, "out"),
    )
    _MODULES[type(codec)].decode(
        plan, plan.views(payload), as_kernel_arg(base, dtype), as_kernel_arg(out, dtype), strides
    )
    return out
