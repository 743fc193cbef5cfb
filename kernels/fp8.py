"""Fused ``fp8`` kernels (float8 e4m3fn codes, one bf16 scale per token).

Reference: ``compactfusion.codecs.fp8.Fp8Codec``. The float8 rounding is done in integer
arithmetic (``_common.f32_to_e4m3_bits``), bit-exact with ``torch.float8_e4m3fn``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from compactfusion.codecs.base import rows_cols
from compactfusion.codecs.fp8 import Fp8Codec

from ._common import (
    KernelUnsupported,
    Plan,
    bf16_bits_to_f32,
    bf16_rne_bits,
    e4m3_bits_to_f32,
    f32_exponent,
    f32_to_e4m3_bits,
    load_f32,
    next_pow2,
    to_storage,
    write_prologue,
)

CODEC = Fp8Codec
MAX_COLS = 16384  # the sender keeps a whole token in registers to take its max


@triton.jit
def fp8_encode_kernel(
    x_ptr,
    base_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    payload_ptr,
    hdr_ptr,
    rows,
    cols,
    x_stride,
    base_stride,
    out_stride,
    gap0,
    ngap0,
    gap1,
    ngap1,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DT: tl.constexpr,
    HDR_N: tl.constexpr,
):
    """Sender for fp8: one program = ``BLOCK_R`` whole tokens (``BLOCK_C >= cols``).

    Math (fp32, per token, ``r = x - base``, ``m = max|r|``)::

        s    = bf16(div_rn(m, 448))                       0 if m < 2**-100
        code = e4m3fn(clamp(div_rn(r, s), -448, 448))     nearest even; 0 if s == 0
        new_base = dtype(base + float(code) * s)          the product is exact

    Layout written: codes at ``codes_ptr[row*cols + col]`` (one byte each), bf16 scale bits at
    ``scales_ptr[row]``; program 0 also writes the header and zero gaps.

    Bytes moved per element: read x + read base + write new base (``3 * itemsize``) + 1 code
    byte + ``2/cols`` scale bytes.
    """
    pid = tl.program_id(0)
    if pid == 0:
        write_prologue(payload_ptr, hdr_ptr, gap0, ngap0, gap1, ngap1, HDR_N)
    r_idx = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r_idx < rows
    rows64 = r_idx.to(tl.int64)[:, None]
    col = tl.arange(0, BLOCK_C)[None, :]
    valid = row_ok[:, None] & (col < cols)

    x = load_f32(x_ptr + rows64 * x_stride + col, valid, DT)
    b = load_f32(base_ptr + rows64 * base_stride + col, valid, DT)
    r = x - b
    m = tl.max(tl.abs(r), axis=1)
    sbits = bf16_rne_bits(tl.math.div_rn(m, tl.full([BLOCK_R], 448.0, tl.float32)))
    sbits = tl.where(f32_exponent(m) < -100, 0, sbits)
    s = bf16_bits_to_f32(sbits)[:, None]
    pos = s > 0
    divisor = tl.broadcast_to(tl.where(pos, s, 1.0), [BLOCK_R, BLOCK_C])
    y = tl.where(pos, tl.math.div_rn(r, divisor), 0.0)
    code = f32_to_e4m3_bits(tl.minimum(tl.maximum(y, -448.0), 448.0))
    new = b + e4m3_bits_to_f32(code) * s
    tl.store(out_ptr + rows64 * out_stride + col, to_storage(new, DT), mask=valid)
    tl.store(codes_ptr + rows64 * cols + col, code.to(tl.uint8), mask=valid)
    tl.store(scales_ptr + r_idx, sbits.to(tl.int16), mask=row_ok)


@triton.jit
def fp8_decode_kernel(
    codes_ptr,
    scales_ptr,
    base_ptr,
    out_ptr,
    rows,
    cols,
    base_stride,
    out_stride,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    DT: tl.constexpr,
):
    """Receiver for fp8: one program = ``BLOCK_R`` tokens x ``BLOCK_C`` channels.

    Math: ``out = dtype(base + float(code) * s)``, the sender's arithmetic exactly.
    Layout read: as written by ``fp8_encode_kernel``. Bytes moved per element: read base +
    write out (``2 * itemsize``) + 1 code byte + ``2/cols`` scale bytes.
    """
    r_idx = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r_idx < rows
    rows64 = r_idx.to(tl.int64)[:, None]
    col = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    valid = row_ok[:, None] & (col < cols)
    code = tl.load(codes_ptr + rows64 * cols + col, mask=valid, other=0).to(tl.int32)
    sbits = tl.load(scales_ptr + r_idx, mask=row_ok, other=0).to(tl.int32)
    s = bf16_bits_to_f32(sbits)[:, None]
    b = load_f32(base_ptr + rows64 * base_stride + col, valid, DT)
    new = b + e4m3_bits_to_f32(code) * s
    tl.store(out_ptr + rows64 * out_stride + col, to_storage(new, DT), mask=valid)


class Fp8Launch(NamedTuple):
    enc_block_r: int  # whole tokens per sender program
    enc_block_c: int  # next_pow2(cols)
    enc_warps: int
    dec_block_r: int
    dec_block_c: int
    dec_warps: int


def launch_config(rows: int, cols: int, interpreted: bool) -> Fp8Launch:
    """Sender: whole tokens, at least 4096 elements per program when tokens are short.
    Receiver: tiles of up to 1024 channels x 4096 elements. Results do not depend on these;
    the interpreter gets 4x larger tiles (fewer programs)."""
    tile = 16384 if interpreted else 4096
    bc = max(16, next_pow2(cols))
    enc_r = max(1, min(tile // bc, next_pow2(rows)))
    dec_c = min(bc, tile // 4)
    dec_r = max(1, min(tile // dec_c, next_pow2(rows)))
    tile = enc_r * bc
    return Fp8Launch(
        enc_block_r=enc_r,
        enc_block_c=bc,
        enc_warps=16 if tile >= 16384 else 8 if tile >= 4096 else 4,
        dec_block_r=dec_r,
        dec_block_c=dec_c,
        dec_warps=8 if dec_r * dec_c >= 4096 else 4,
    )


def plan(codec: Fp8Codec, shape, dtype, interpreted: bool) -> Plan:
    rows, cols = rows_cols(shape)
    if cols > MAX_COLS:
        raise KernelUnsupported(
            f"fp8 kernels take a token's max in registers: at most {MAX_COLS} channels, got {cols}"
        )
    lay = codec.layout(rows, cols)
    sections = ((0, rows * cols, torch.uint8), (lay.scales_offset, 2 * rows, torch.int16))
    return Plan.build(codec, shape, dtype, lay, launch_config(rows, cols, interpreted), sections)


def encode(plan: Plan, x, base, out, strides, payload, views, hdr, gaps) -> None:
    lc = plan.launch
    codes, scales = views
    fp8_encode_kernel[(triton.cdiv(plan.rows, lc.enc_block_r),)](
        x, base, out, codes, scales, payload, hdr, plan.rows, plan.cols, *strides, *gaps,
        BLOCK_R=lc.enc_block_r, BLOCK_C=lc.enc_block_c, DT=plan.dt, HDR_N=plan.hdr_n,
        num_warps=lc.enc_warps,
    )  # fmt: skip


def decode(plan: Plan, views, base, out, strides) -> None:
    lc = plan.launch
    codes, scales = views
    grid = (triton.cdiv(plan.rows, lc.dec_block_r), triton.cdiv(plan.cols, lc.dec_block_c))
    fp8_decode_kernel[grid](
        codes, scales, base, out, plan.rows, plan.cols, *strides,
        BLOCK_R=lc.dec_block_r, BLOCK_C=lc.dec_block_c, DT=plan.dt, num_warps=lc.dec_warps,
    )  # fmt: skip
