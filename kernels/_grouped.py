"""Kernels shared by ``int1`` and ``int2`` (grouped scales, 1- or 2-bit codes; ``BITS`` picks).

The math and the payload layout are those of ``compactfusion.codecs._grouped.GroupedCodec``
and its subclasses; ``int1.py`` and ``int2.py`` choose the launch settings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from compactfusion.codecs.base import rows_cols

from ._common import (
    Plan,
    bf16_bits_to_f32,
    bf16_rne_bits,
    f32_exponent,
    load_f32,
    next_pow2,
    pow2,
    to_storage,
    write_prologue,
)


@triton.jit
def grouped_encode_kernel(
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
    row_bytes,
    ngroups,
    gap0,
    ngap0,
    gap1,
    ngap1,
    BITS: tl.constexpr,
    GE: tl.constexpr,
    NB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DT: tl.constexpr,
    HDR_N: tl.constexpr,
):
    """Sender for int1 (``BITS=1``) / int2 (``BITS=2``): one program = ``BLOCK_R`` tokens x one
    group of ``GE`` channels (tile ``BLOCK_R x NB x 8/BITS``, ``NB*8/BITS = next_pow2(GE)``).

    Math, per group (``r = x - base`` in fp32, ``m = max|r|``, ``E = floor(log2 m)``)::

        mean = div_rn(sum_i int(|r_i| * 2**(15-E)) * 2**(E-15), n_valid)   (0 if m < 2**-100)
        int1: s = bf16(mean)          c = [r >= 0]                       recon = (2c-1) s
        int2: s = bf16(mean * 0.625)  c = [r>=-2s] + [r>=0] + [r>=2s]    recon = (2c-3) s
        new_base = dtype(base + recon)                                   (nearest even)

    Layout written: codes at ``codes_ptr`` (``row_bytes`` per token, element j at byte
    ``j*BITS//8``, bit ``(j*BITS)%8``, LSB first, padding codes 0), bf16 scale bits at
    ``scales_ptr[row*ngroups + g]``; program (0, 0) also writes the header and zero gaps.

    Bytes moved per element: read x + read base + write new base (``3 * itemsize``) + write
    ``BITS/8`` code bytes + ``2/GE`` scale bytes.
    """
    PER: tl.constexpr = 8 // BITS
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    if (pid_r == 0) & (g == 0):
        write_prologue(payload_ptr, hdr_ptr, gap0, ngap0, gap1, ngap1, HDR_N)

    r_idx = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r_idx < rows
    row64 = r_idx.to(tl.int64)
    rows64 = row64[:, None, None]
    byte = tl.arange(0, NB)
    k = tl.arange(0, PER)
    j = byte[:, None] * PER + k[None, :]  # element within the group, [NB, PER]
    col = g * GE + j
    valid = row_ok[:, None, None] & ((j < GE) & (col < cols))[None, :, :]

    x = load_f32(x_ptr + rows64 * x_stride + col[None, :, :], valid, DT)
    b = load_f32(base_ptr + rows64 * base_stride + col[None, :, :], valid, DT)
    r = x - b
    a = tl.abs(r)

    m = tl.max(tl.max(a, axis=2), axis=1)
    e_raw = f32_exponent(m)
    e = tl.minimum(tl.maximum(e_raw, -100), 127)
    q = (a * pow2(15 - e)[:, None, None]).to(tl.int32)  # exact, each < 2**16
    s_int = tl.sum(tl.sum(q, axis=2), axis=1)
    n_valid = tl.zeros([BLOCK_R], dtype=tl.int32) + tl.minimum(cols - g * GE, GE)
    mean = tl.math.div_rn(s_int.to(tl.float32) * pow2(e - 15), n_valid.to(tl.float32))
    if BITS == 1:
        sbits = bf16_rne_bits(mean)
    else:
        sbits = bf16_rne_bits(mean * 0.625)
    sbits = tl.where(e_raw < -100, 0, sbits)
    s = bf16_bits_to_f32(sbits)[:, None, None]

    if BITS == 1:
        c = (r >= 0).to(tl.int32)
        level = 2 * c - 1
    else:
        two_s = 2.0 * s
        c = (r >= -two_s).to(tl.int32) + (r >= 0).to(tl.int32) + (r >= two_s).to(tl.int32)
        level = 2 * c - 3
    new = b + level.to(tl.float32) * s  # the product is exact, so FMA contraction is harmless
    tl.store(out_ptr + rows64 * out_stride + col[None, :, :], to_storage(new, DT), mask=valid)

    c = tl.where(valid, c, 0)
    packed = tl.sum(c << (k * BITS)[None, None, :], axis=2)  # [BLOCK_R, NB]
    byte_ok = row_ok[:, None] & (byte < GE * BITS // 8)[None, :]
    code_ptrs = codes_ptr + row64[:, None] * row_bytes + g * (GE * BITS // 8) + byte[None, :]
    tl.store(code_ptrs, packed.to(tl.uint8), mask=byte_ok)
    tl.store(scales_ptr + row64 * ngroups + g, sbits.to(tl.int16), mask=row_ok)


@triton.jit
def grouped_decode_kernel(
    codes_ptr,
    scales_ptr,
    base_ptr,
    out_ptr,
    rows,
    cols,
    base_stride,
    out_stride,
    row_bytes,
    ngroups,
    BITS: tl.constexpr,
    GE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
    DT: tl.constexpr,
):
    """Receiver for int1 / int2: one program = ``BLOCK_R`` tokens x ``BLOCK_B`` code bytes
    (``BLOCK_B * 8/BITS`` channels).

    Math: ``out = dtype(base + level(c) * s)`` with ``level = 2c-1`` (int1) or ``2c-3`` (int2)
    and ``s`` the bf16 scale of the element's group (``col // GE``); the same fp32 arithmetic
    as the sender, so both bases agree bit for bit.

    Layout read: as written by ``grouped_encode_kernel``. Bytes moved per element: read base +
    write out (``2 * itemsize``) + read ``BITS/8`` code bytes + ``2/GE`` scale bytes.
    """
    PER: tl.constexpr = 8 // BITS
    pid_r = tl.program_id(0)
    pid_b = tl.program_id(1)
    r_idx = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r_idx < rows
    rows64 = r_idx.to(tl.int64)[:, None]
    byte = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    k = tl.arange(0, PER)
    col = byte[:, None] * PER + k[None, :]  # [BLOCK_B, PER]

    cb = tl.load(
        codes_ptr + rows64 * row_bytes + byte[None, :],
        mask=row_ok[:, None] & (byte < row_bytes)[None, :],
        other=0,
    ).to(tl.int32)
    c = (cb[:, :, None] >> (k * BITS)[None, None, :]) & ((1 << BITS) - 1)
    valid = row_ok[:, None, None] & (col < cols)[None, :, :]
    sb = tl.load(
        scales_ptr + rows64[:, :, None] * ngroups + (col // GE)[None, :, :], mask=valid, other=0
    )
    s = bf16_bits_to_f32(sb.to(tl.int32))
    if BITS == 1:
        level = 2 * c - 1
    else:
        level = 2 * c - 3
    b = load_f32(base_ptr + rows64[:, :, None] * base_stride + col[None, :, :], valid, DT)
    new = b + level.to(tl.float32) * s
    tl.store(
        out_ptr + rows64[:, :, None] * out_stride + col[None, :, :], to_storage(new, DT), mask=valid
    )


class GroupedLaunch(NamedTuple):
    """Launch settings of the int1/int2 kernels for one shape (chosen in ``launch_config``)."""

    enc_block_r: int  # tokens per sender program (each program does one group)
    enc_warps: int
    dec_block_r: int  # tokens per receiver program
    dec_block_b: int  # code bytes per token per receiver program
    dec_warps: int


def launch_config(lay, rows: int, bits: int, interpreted: bool) -> GroupedLaunch:
    """Launch settings shared by int1 and int2 (the only place they are chosen).

    Sender: one program per group x enough tokens for a 4096-element tile. Receiver: tiles
    of up to 1024 channels x 4096 elements. Results do not depend on these (every reduction is
    within one group of one token); the interpreter gets 4x larger tiles (fewer programs)."""
    per = 8 // bits
    tile = 16384 if interpreted else 4096
    gp = next_pow2(lay.group)
    enc_r = max(1, min(tile // gp, next_pow2(rows)))
    dec_b = min(next_pow2(lay.row_bytes), tile // 4 // per)
    dec_r = max(1, min(tile // (dec_b * per), next_pow2(rows)))
    return GroupedLaunch(
        enc_block_r=enc_r,
        enc_warps=8 if enc_r * gp >= 4096 else 4,
        dec_block_r=dec_r,
        dec_block_b=dec_b,
        dec_warps=8 if dec_r * dec_b * per >= 4096 else 4,
    )


def make_plan(codec, shape, dtype, launch_config, interpreted) -> Plan:
    rows, cols = rows_cols(shape)
    lay = codec.layout(rows, cols)
    sections = (
        (0, rows * lay.row_bytes, torch.uint8),
        (lay.scales_offset, 2 * rows * lay.ngroups, torch.int16),
    )
    launch = launch_config(lay, rows, codec.bits, interpreted)
    return Plan.build(codec, shape, dtype, lay, launch, sections, meta=codec.bits)


def encode(plan: Plan, x, base, out, strides, payload, views, hdr, gaps) -> None:
    lay, launch, bits = plan.layout, plan.launch, plan.meta
    codes, scales = views
    grid = (triton.cdiv(plan.rows, launch.enc_block_r), lay.ngroups)
    grouped_encode_kernel[grid](
        x, base, out, codes, scales, payload, hdr,
        plan.rows, plan.cols, *strides, lay.row_bytes, lay.ngroups, *gaps,
        BITS=bits, GE=lay.group, NB=next_pow2(lay.group) * bits // 8,
        BLOCK_R=launch.enc_block_r, DT=plan.dt, HDR_N=plan.hdr_n, num_warps=launch.enc_warps,
    )  # fmt: skip


def decode(plan: Plan, views, base, out, strides) -> None:
    lay, launch, bits = plan.layout, plan.launch, plan.meta
    codes, scales = views
    grid = (
        triton.cdiv(plan.rows, launch.dec_block_r),
        triton.cdiv(lay.row_bytes, launch.dec_block_b),
    )
    grouped_decode_kernel[grid](
        codes, scales, base, out, plan.rows, plan.cols, *strides, lay.row_bytes, lay.ngroups,
        BITS=bits, GE=lay.group, BLOCK_R=launch.dec_block_r, BLOCK_B=launch.dec_block_b,
        DT=plan.dt, num_warps=launch.dec_warps,
    )  # fmt: skip
