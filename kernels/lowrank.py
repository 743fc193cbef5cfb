"""GPU path of the ``lowrank`` codec: Triton around cuBLAS, same math as the torch reference.

Sender (``encode_residual_lowrank``), per step, for a ``rows x cols`` activation ``x`` of
``s`` bytes per element (2 for bf16) and effective rank ``k``::

    R = f32(x) - f32(base)          _residual_f32_kernel   reads 2s, writes 4 B/elem
    P, Q = codec.factorize(R)       torch matmuls (cuBLAS) + QR on rows x k; reads R twice
                                    per iteration (4 + 4 B/elem), warm-started from ``state``
    payload = header | P_f | Q_f    ``codec.pack_factors`` (k*(rows+cols) elements, tiny)
    new_base = base + P_f @ Q_f^T   _lowrank_base_update_kernel: reads s, writes s B/elem

That is ``4s + 4 + 8*iters`` bytes per element (20 for bf16 and one iteration) against about
60 for the eager torch reference, which materialises ``x.float()``, ``base.float()``, the
float32 reconstruction and the float32 sum. The reconstruction is never written to memory: it
is the epilogue of a rank-``k`` outer-product sum computed in registers, fused with the base
update (read base once, write once).

Receiver (``decode_residual_lowrank``): the same base-update kernel, reading the factors
straight from the payload and the base once, writing ``out`` (which may be ``base`` itself,
or a row-strided slice of a gathered K/V buffer). On CUDA it does not read the header back
(no device-to-host sync): the layout follows from ``base`` and the payload size is checked.

Residual precision: ``R`` is formed once in float32. ``f32(x) - f32(base)`` is the same IEEE
operation the reference performs, so ``R``, the factors and therefore the payload bytes are
identical to the torch reference's on the same device. (Feeding the matmuls an activation-dtype
residual would save 2 B/elem per read of ``R`` but round the residual to bf16 and make the
payloads differ from the reference.)

Agreement (tolerance): the payload bytes equal the reference's on the same device. The updated
base differs from the reference ``(f32(base) + P_f @ Q_f^T).to(dtype)`` only through the order
of the float32 summation (the kernel sums the ``k`` products in order ``j = 0..k-1`` without
FMA; the reference uses the BLAS's order), so per element::

    |kernel - ref| <= eps(dtype) |ref| + 2 (k + 1) 2^-24 (|base| + sum_j |P_ij Q_lj|) + tiny

with ``eps`` = 2^-7 (bf16), 2^-10 (fp16), 2^-23 (fp32) and ``tiny`` the dtype's smallest
subnormal: at most one unit in the last place of the activation dtype plus the float32
summation-order error (``tests/test_lowrank.py`` checks exactly this bound).

Sender and receiver bases are bit-identical to each other: both are written by
``_lowrank_base_update_kernel`` from the same payload bytes with the same launch configuration
(fixed here, never autotuned), whether or not ``out`` aliases ``base``. Both sides must
therefore use this path (or both the reference).

Conventions shared with the other kernels (``_common``): bf16 tensors travel as int16 views and
every rounding to bf16 is done in integer arithmetic (round to nearest even), so compiled code,
the interpreter and torch agree; inputs the kernels cannot take (another device, a layout that
needs a copy) raise ``KernelUnsupported`` so the caller falls back to the torch reference.
CPU tensors run only in interpreter mode (``TRITON_INTERPRET=1`` set before import), which
the tests use on machines without CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from compactfusion.codecs.base import (
    DTYPE_CODES,
    check_dtype,
    header_nbytes,
    rows_cols,
)
from compactfusion.codecs.lowrank import LowRankCodec, LowRankFactors, LowRankState

from ._common import (
    KernelUnsupported,
    as_kernel_arg,
    bf16_bits_to_f32,
    check_device,
    check_out,
    checked_payload,
    device_header,
    is_interpreted,
    load_f32,
    row_stride,
    to_storage,
)

__all__ = ["decode_residual_lowrank", "encode_residual_lowrank", "lowrank_base_update"]


@triton.jit
def _residual_f32_kernel(
    x_ptr,
    base_ptr,
    r_ptr,
    rows,
    cols,
    stride_x,
    stride_base,
    DT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``R = f32(x) - f32(base)`` for one ``BLOCK_M x BLOCK_N`` tile (exact conversions).

    Layout: ``x`` and ``base`` are row-major ``rows x cols`` matrices in the activation dtype
    (``DT``: 0 fp32, 1 fp16, 2 bf16 passed as int16 bits) with row strides ``stride_x`` /
    ``stride_base`` and unit column stride; ``R`` is contiguous float32, the matrix the
    projections read.
    Bytes: reads ``2 * itemsize``, writes 4 per element (8 B/elem for bf16).
    """
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask = (offs_m < rows)[:, None] & (offs_n < cols)[None, :]
    x = load_f32(x_ptr + offs_m[:, None] * stride_x + offs_n[None, :], mask, DT)
    b = load_f32(base_ptr + offs_m[:, None] * stride_base + offs_n[None, :], mask, DT)
    tl.store(r_ptr + offs_m[:, None] * cols + offs_n[None, :], x - b, mask=mask)


@triton.jit
def _lowrank_base_update_kernel(
    base_ptr,
    out_ptr,
    p_ptr,
    q_ptr,
    p_scale_ptr,
    q_scale_ptr,
    rows,
    cols,
    k,
    stride_base,
    stride_out,
    DT: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``out = dtype(f32(base) + sum_j P_f[:, j] Q_f[:, j]^T)`` for one ``BLOCK_M x BLOCK_N`` tile.

    Math: the rank-``k`` reconstruction is accumulated in float32 registers as ``k`` outer
    products in order ``j = 0..k-1``, each product and sum rounded separately (launched with
    FP fusion off, so no FMA: compiled code and the interpreter agree); with ``QUANT`` the
    int8 factors are dequantized first as ``f32(int8) * f32(scale_j)`` (the reference's exact
    product). One rounding to the activation dtype at the end, to nearest even
    (``to_storage``).
    Layout: ``P_f`` is ``rows x k`` and ``Q_f`` is ``cols x k``, row-major, bf16 (as int16
    bits) or int8 with ``k`` bf16 scales each -- the payload's sections, read in place.
    ``base`` and ``out`` are row-major matrices in the activation dtype (``DT``: 0 fp32,
    1 fp16, 2 bf16 as int16 bits) with row strides ``stride_base`` / ``stride_out`` and unit
    column stride; ``out`` may alias ``base`` (each element is read before it is written, by
    the same program).
    Bytes: reads ``base`` once and writes ``out`` once (``2 * itemsize`` B/elem); the factors
    add ``e*k*(BLOCK_M + BLOCK_N)`` bytes per tile, mostly served from L1/L2.
    """
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < rows
    mask_n = offs_n < cols
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, k):
        if QUANT:
            p_scale = bf16_bits_to_f32(tl.load(p_scale_ptr + j).to(tl.int32))
            q_scale = bf16_bits_to_f32(tl.load(q_scale_ptr + j).to(tl.int32))
            pj = tl.load(p_ptr + offs_m * k + j, mask=mask_m, other=0).to(tl.float32) * p_scale
            qj = tl.load(q_ptr + offs_n * k + j, mask=mask_n, other=0).to(tl.float32) * q_scale
        else:
            pj = load_f32(p_ptr + offs_m * k + j, mask_m, 2)
            qj = load_f32(q_ptr + offs_n * k + j, mask_n, 2)
        acc += pj[:, None] * qj[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    b = load_f32(base_ptr + offs_m[:, None] * stride_base + offs_n[None, :], mask, DT)
    new = to_storage(b + acc, DT)
    tl.store(out_ptr + offs_m[:, None] * stride_out + offs_n[None, :], new, mask=mask)


# Launch settings, chosen here and only here (no autotuning). Results do not depend on the tile
# shape (every element is computed alone). FP fusion is off explicitly: whether ``a*b + c``
# becomes an FMA would otherwise follow TRITON_DEFAULT_FP_FUSION (whose default changes in
# Triton 3.10), and ranks with different settings would disagree on the base.
_BLOCK_M = 32
_BLOCK_N = 128
_NUM_WARPS = 4
_INTERPRETED = is_interpreted(_lowrank_base_update_kernel)


def _grid(rows: int, cols: int) -> tuple[int, int]:
    return triton.cdiv(rows, _BLOCK_M), triton.cdiv(cols, _BLOCK_N)


def _check_codec(codec: LowRankCodec) -> None:
    if not isinstance(codec, LowRankCodec):
        raise TypeError(f"lowrank kernels need a LowRankCodec, got {type(codec).__name__}")


def _check_device(*tensors: torch.Tensor) -> None:
    check_device(_INTERPRETED, *tensors)


def lowrank_base_update(
    factors: LowRankFactors, base: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``out = base + P_f @ Q_f^T`` with the fused Triton kernel; returns ``out``.

    ``factors`` are a payload's views (``LowRankCodec.factor_views``); ``base`` and ``out``
    have one shape and dtype, viewable as ``rows x cols`` without a copy (``out`` may be
    ``base``).
    """
    check_out(out, base)
    check_dtype(base.dtype)
    rows, cols = rows_cols(tuple(base.shape))
    k = factors.p.shape[-1]
    if tuple(factors.p.shape) != (rows, k) or tuple(factors.q.shape) != (cols, k):
        raise ValueError("factor shapes do not match the base matrix")
    quant = factors.p_scale is not None
    want = torch.int8 if quant else torch.bfloat16
    if factors.p.dtype != want or factors.q.dtype != want:
        raise ValueError(f"factors must be {want} (as LowRankCodec.factor_views returns them)")
    _check_device(base, out, *(t for t in factors if t is not None))
    strides = row_stride(base, rows, cols, "base"), row_stride(out, rows, cols, "out")
    fp, fq, fps, fqs = (None if t is None else as_kernel_arg(t, t.dtype) for t in factors)
    _lowrank_base_update_kernel[_grid(rows, cols)](
        as_kernel_arg(base, base.dtype),
        as_kernel_arg(out, out.dtype),
        fp,
        fq,
        fps if quant else fp,  # unused without QUANT
        fqs if quant else fq,
        rows,
        cols,
        k,
        *strides,
        DT=DTYPE_CODES[base.dtype],
        QUANT=quant,
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out


def encode_residual_lowrank(
    codec: LowRankCodec,
    x: torch.Tensor,
    base: torch.Tensor,
    state: LowRankState | None = None,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sender side of one step, fused: the same ``(payload, new_base)`` contract as
    ``codec.encode_residual(x, base, state)``.

    ``x`` and ``base`` share shape, dtype and device and are viewable as ``rows x cols``
    without a copy. ``state`` (``codec.new_state()``) carries the warm start; ``None`` starts
    cold. ``new_base`` is written to ``out`` when given (``out`` may be ``base``), else to a new
    contiguous tensor. The payload is byte-identical to the torch reference's on the same
    device; ``new_base`` agrees within the tolerance in the module docstring.
    """
    _check_codec(codec)
    if tuple(x.shape) != tuple(base.shape):
        raise ValueError(f"x {tuple(x.shape)} and base {tuple(base.shape)} differ in shape")
    if x.dtype != base.dtype:
        raise KernelUnsupported(f"x ({x.dtype}) and base ({base.dtype}) must share a dtype")
    check_dtype(x.dtype)
    shape, dtype = tuple(x.shape), x.dtype
    total = codec.payload_nbytes(shape, dtype)  # also validates the shape
    rows, cols = rows_cols(shape)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=base.device)
    check_out(out, base)
    _check_device(x, base, out)

    r = torch.empty(rows, cols, dtype=torch.float32, device=x.device)
    _residual_f32_kernel[_grid(rows, cols)](
        as_kernel_arg(x, dtype),
        as_kernel_arg(base, dtype),
        r,
        rows,
        cols,
        row_stride(x, rows, cols, "x"),
        row_stride(base, rows, cols, "base"),
        DT=DTYPE_CODES[dtype],
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        num_warps=_NUM_WARPS,
    )
    p, q = codec.factorize(r, state)
    del r

    header = device_header(codec, shape, dtype, x.device)
    hdr = header.numel()
    payload = torch.zeros(total, dtype=torch.uint8, device=x.device)
    payload[:hdr] = header
    # Pack into the payload and read the factors back from it, exactly as the receiver will.
    data = payload[hdr : hdr + codec.layout(rows, cols).nbytes]
    codec.pack_factors(p, q, data)
    lowrank_base_update(codec.factor_views(data, rows, cols), base, out)
    return payload, out


def decode_residual_lowrank(
    codec: LowRankCodec,
    payload: torch.Tensor,
    base: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Receiver side of one step, fused: ``out = base + decode(payload)``, bit-identical to the
    sender's ``new_base``.

    ``out`` may be ``base`` or any tensor of its shape and dtype viewable as ``rows x cols``
    without a copy (e.g. one slice of a gathered K/V buffer); by default a new contiguous tensor
    is returned. On CUDA the header is not read back (that would cost a device-to-host sync per
    call): the layout comes from ``base`` and the payload size is checked; on CPU the header is
    validated fully.
    """
    _check_codec(codec)
    shape, dtype = tuple(base.shape), base.dtype
    check_dtype(dtype)
    payload = checked_payload(codec, payload, shape, dtype, codec.payload_nbytes(shape, dtype))
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=base.device)
    rows, cols = rows_cols(shape)
    data = payload[header_nbytes(len(shape)) :]
    return lowrank_base_update(codec.factor_views(data, rows, cols), base, out)
