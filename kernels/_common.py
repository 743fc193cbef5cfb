"""Helpers shared by the codec kernels: exact float conversions in integer arithmetic, typed
loads/stores, the payload prologue, and host-side plumbing (strides, cached headers).

Why integer arithmetic for bf16/fp8 rounding: Triton's own ``.to(tl.bfloat16)`` and fp8
conversions truncate or round half away from zero under ``TRITON_INTERPRET=1``, and fp8
conversion differs between GPU generations. The bit formulas below are round-to-nearest-even
everywhere, so the interpreter, every GPU and torch agree bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from compactfusion.codecs.base import (
    DTYPE_CODES,
    PayloadError,
    aligned_payload,
    encode_header,
    header_nbytes,
    rows_cols,
)


class KernelUnsupported(ValueError):
    """The fused kernels cannot handle this codec, shape, dtype or device; use the torch
    reference codec instead (``compactfusion.codecs``)."""


# The ``DT`` constexpr of every kernel is the payload header's dtype code:
# 0 float32, 1 float16, 2 bfloat16 (bf16 tensors are passed as int16 views).


# --- device helpers -----------------------------------------------------------------------------
@triton.jit
def pow2(e):
    """Exact ``2**e`` as float32 for integer ``e`` in [-126, 127], built from the bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def f32_exponent(m):
    """``floor(log2 m)`` of non-negative float32 ``m`` from its exponent bits (-127 for 0)."""
    return ((m.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def bf16_rne_bits(x):
    """bf16 bits (int32 in [0, 0xFFFF]) of finite float32 ``x``, rounded to nearest even."""
    u = x.to(tl.int32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16) & 0xFFFF


@triton.jit
def bf16_bits_to_f32(b):
    """float32 value of bf16 bits held in the low 16 bits of an int32."""
    return ((b & 0xFFFF) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_e4m3_bits(y):
    """float8 e4m3fn bits (int32 in [0, 255]) of float32 ``y`` with ``|y| <= 448``, rounded to
    nearest even like ``torch.Tensor.to(torch.float8_e4m3fn)``."""
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    # |y| >= 2**-6 (e4m3 normal): round the 23-bit mantissa to 3 bits, ties to even; a carry
    # into the exponent is the correct result. Re-bias the exponent from 127 to 7.
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    # |y| < 2**-6 (e4m3 subnormal, steps of 2**-9): adding 2**14 puts the 2**-9 place in the
    # last mantissa bit, so the fp32 addition itself rounds to nearest even.
    sub = (tl.abs(y) + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    return sign | tl.where(a < 0x3C800000, sub, normal)


@triton.jit
def e4m3_bits_to_f32(c):
    """float32 value of float8 e4m3fn bits (int32 in [0, 255]; no NaN codes)."""
    e = (c >> 3) & 0xF
    mant = c & 7
    normal = ((e + 120) << 23) | (mant << 20)
    sub = (mant.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # mant * 2**-9
    mag = tl.where(e == 0, sub, normal)
    return (mag | ((c & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def load_f32(ptrs, mask, DT: tl.constexpr):
    """Load fp32/fp16/bf16 as float32 (bf16 tensors are passed as int16 views)."""
    if DT == 2:
        v = tl.load(ptrs, mask=mask, other=0)
        return bf16_bits_to_f32(v.to(tl.int32))
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def to_storage(x, DT: tl.constexpr):
    """Round float32 to the storage dtype, nearest even (bf16 as int16 bits)."""
    if DT == 0:
        return x
    elif DT == 1:
        return x.to(tl.float16)
    else:
        return bf16_rne_bits(x).to(tl.int16)


@triton.jit
def write_prologue(payload_ptr, hdr_ptr, gap0, ngap0, gap1, ngap1, HDR_N: tl.constexpr):
    """Copy the header (``HDR_N`` bytes) to the payload start and zero two alignment gaps of
    fewer than 16 bytes each (between sections, and after the last one)."""
    o = tl.arange(0, 128)
    tl.store(payload_ptr + o, tl.load(hdr_ptr + o, mask=o < HDR_N), mask=o < HDR_N)
    z = tl.arange(0, 16)
    zero = tl.zeros([16], dtype=tl.uint8)
    tl.store(payload_ptr + gap0 + z, zero, mask=z < ngap0)
    tl.store(payload_ptr + gap1 + z, zero, mask=z < ngap1)


# --- host helpers -------------------------------------------------------------------------------
def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was decorated under ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(interpreted: bool, *tensors: torch.Tensor) -> None:
    """All tensors on one device, and CUDA unless the kernels run in the interpreter."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError(f"tensors are on different devices: {[str(t.device) for t in tensors]}")
    if dev.type != "cuda" and not interpreted:
        raise KernelUnsupported(
            f"the kernels run on CUDA tensors (got {dev}); CPU tensors need TRITON_INTERPRET=1 "
            "set before compactfusion.kernels is imported"
        )


def check_out(out: torch.Tensor, base: torch.Tensor) -> None:
    """``out`` must have the base's shape and dtype."""
    if tuple(out.shape) != tuple(base.shape) or out.dtype != base.dtype:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype} but the base is "
            f"{tuple(base.shape)} {base.dtype}"
        )


def checked_payload(codec, payload, shape: tuple[int, ...], dtype, total: int) -> torch.Tensor:
    """Validate a received payload for a base of ``shape``/``dtype``; return it 16-byte aligned.

    The size is always checked; the header only on CPU, where reading it back is free (on CUDA
    that would cost a device-to-host sync per call). As in the reference codecs, a
    non-contiguous payload raises ``PayloadError`` and a misaligned one is copied
    (``compactfusion.codecs.base.aligned_payload``).
    """
    payload = aligned_payload(payload)
    if payload.numel() != total:
        raise PayloadError(
            f"{codec.name} payload for shape {shape} {dtype} must be {total} bytes, "
            f"got {payload.numel()} (truncated, padded, or for another shape)"
        )
    if payload.device.type == "cpu":
        pshape, pdtype, _ = codec.parse(payload)
        if pshape != shape or pdtype != dtype:
            raise PayloadError(
                f"payload describes a {pshape} {pdtype} tensor but the base is {shape} {dtype}"
            )
    return payload


def row_stride(t: torch.Tensor, rows: int, cols: int, what: str) -> int:
    """Stride between consecutive rows of ``t`` viewed as ``rows x cols`` without a copy.

    The last dimension must be contiguous and the leading ones must collapse into one
    uniformly strided dimension (a slice along a single leading dimension does)."""
    if t.dim() == 0:
        return 1
    if cols > 1 and t.stride(-1) != 1:
        raise KernelUnsupported(f"{what} must be contiguous in its last dimension")
    dims = [(s, st) for s, st in zip(t.shape[:-1], t.stride()[:-1], strict=True) if s != 1]
    if not dims:
        return cols
    for (_, st_outer), (s_inner, st_inner) in zip(dims, dims[1:], strict=False):
        if st_outer != st_inner * s_inner:
            raise KernelUnsupported(
                f"{what} (shape {tuple(t.shape)}, strides {t.stride()}) is not a uniformly "
                f"strided stack of rows"
            )
    return dims[-1][1]


def as_kernel_arg(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bf16 tensors travel as int16 views (the kernels do the bf16 arithmetic in bits)."""
    return t.view(torch.int16) if dtype == torch.bfloat16 else t


@functools.lru_cache(maxsize=512)
def _header_cached(codec_id, params, shape, dtype, device) -> torch.Tensor:
    return encode_header(codec_id, dtype, shape, params).to(device)


def device_header(codec, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """The payload header for this codec/shape/dtype, built once on the host and cached on
    ``device`` (immutable bytes; shared by every call with the same key)."""
    return _header_cached(codec.codec_id, codec.header_params(), shape, dtype, torch.device(device))


class Plan(NamedTuple):
    """Everything a launch needs for one (codec, shape, dtype), computed once on the host."""

    shape: tuple[int, ...]
    rows: int
    cols: int
    dt: int  # dtype code (DT constexpr)
    layout: Any  # the reference codec's layout for rows x cols
    launch: Any  # launch settings, chosen by the codec's ``launch_config``
    sections: tuple[tuple[int, int, torch.dtype], ...]  # (offset in data, bytes, view dtype)
    hdr_n: int  # header bytes
    total: int  # payload bytes
    meta: Any  # codec constants the launcher needs (bits, n/m, ...)

    @classmethod
    def build(cls, codec, shape, dtype, layout, launch, sections, meta=None) -> Plan:
        rows, cols = rows_cols(shape)
        total = codec.payload_nbytes(shape, dtype)
        return cls(
            shape, rows, cols, DTYPE_CODES[dtype], layout, launch, tuple(sections),
            header_nbytes(len(shape)), total, meta,
        )  # fmt: skip

    def views(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of the data sections inside ``payload`` (16-byte aligned offsets)."""
        h = self.hdr_n
        return [payload[h + o : h + o + n].view(vdt) for o, n, vdt in self.sections]

    def gaps(self) -> tuple[int, int, int, int]:
        """Payload offset and length of the zero gap after each of the two sections."""
        (o0, n0, _), (o1, n1, _) = self.sections
        h = self.hdr_n
        return h + o0 + n0, o1 - (o0 + n0), h + o1 + n1, self.total - (h + o1 + n1)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
