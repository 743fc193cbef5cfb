"""Kernels shared by ``int1`` and ``int2`` (grouped scales, 1- or 2-bit codes; ``BITS`` picks).

The math and the payload layout are those of ``compactfusion.codecs._grouped.GroupedCodec``
and its subclasses; ``int1.py`` and ``int2.py`` choose the launch settings.

With channel scales (``channel_scale="mean"`` and at least ``CHANNEL_MIN_ROWS`` = 256 rows,
``CS=1``; fewer rows are encoded as with ``"none"``) the sender runs three launches:

1. ``channel_partial_kernel`` reads ``x`` and ``base`` once and writes the exact per-channel
   sums of ``|x - base|`` of every block of 256 tokens (fp32 scratch, ``rows / 64`` bytes per
   channel);
2. ``channel_scale_kernel`` adds those block sums in the fixed pairwise order of the reference,
   divides by ``rows`` and writes the bf16 channel scales into the payload;
3. ``grouped_encode_kernel`` reads ``x``, ``base`` and the channel scales and writes codes,
   group scales and the new base.

So the encode reads ``x`` and ``base`` twice (``5 * itemsize`` bytes per element moved instead
of ``3 * itemsize``); the decode stays one pass (it also reads the ``2 * cols`` bytes of
channel scales, which stay in cache).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from compactfusion.codecs._grouped import CHANNEL_BLOCK
from compactfusion.codecs.base import rows_cols

from ._common import (
    KernelUnsupported,
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
def flush_subnormal(v):
    """``v`` with zero and subnormal float32 values replaced by +0.0 (as the reference's
    ``flush_subnormal``; GPU division would flush them anyway, the interpreter would not)."""
    return tl.where(f32_exponent(tl.abs(v)) < -126, 0.0, v)


@triton.jit
def channel_partial_kernel(
    x_ptr,
    base_ptr,
    part_ptr,
    rows,
    cols,
    x_stride,
    base_stride,
    CB: tl.constexpr,
    BC: tl.constexpr,
    DT: tl.constexpr,
):
    """Exact per-channel sums of ``|x - base|`` over one block of ``CB`` (= 256) tokens: one
    program = tokens ``[b*CB, (b+1)*CB)`` x ``BC`` channels.

    Math (``r = x - base`` in fp32, per channel over the block, missing tokens count as 0;
    ``m = max |r|``, ``E = floor(log2 m)``)::

        P[b, j] = (sum_i int(|r_ij| * 2**(15-E))) * 2**(E-15)    (0 if m < 2**-100)

    The integer sum is below ``256 * 2**16 = 2**24``, so ``P`` is exact in fp32 and does not
    depend on the order of the tokens.

    Layout written: ``part_ptr[b * cols + j]`` float32 (scratch, not part of the payload).
    Bytes moved per element: read x + read base (``2 * itemsize``); plus ``4 / CB`` written.
    """
    b_idx = tl.program_id(0)
    c_idx = tl.program_id(1)
    r_idx = b_idx * CB + tl.arange(0, CB)
    col = c_idx * BC + tl.arange(0, BC)
    row64 = r_idx.to(tl.int64)[:, None]
    valid = (r_idx < rows)[:, None] & (col < cols)[None, :]
    x = load_f32(x_ptr + row64 * x_stride + col[None, :], valid, DT)
    b = load_f32(base_ptr + row64 * base_stride + col[None, :], valid, DT)
    a = tl.abs(x - b)
    m = tl.max(a, axis=0)
    e_raw = f32_exponent(m)
    e = tl.minimum(tl.maximum(e_raw, -100), 127)
    q = (a * pow2(15 - e)[None, :]).to(tl.int32)  # exact, each < 2**16
    s_int = tl.sum(q, axis=0)  # < 2**24
    part = tl.where(e_raw < -100, 0.0, s_int.to(tl.float32) * pow2(e - 15))
    tl.store(part_ptr + b_idx * cols + col, part, mask=col < cols)


@triton.jit
def channel_scale_kernel(
    part_ptr,
    cscale_ptr,
    nblocks,
    rows,
    cols,
    NBP: tl.constexpr,
    LOG_NBP: tl.constexpr,
    BC: tl.constexpr,
):
    """bf16 channel scales from the block sums of ``channel_partial_kernel``: one program =
    ``BC`` channels, all ``nblocks`` blocks (zero padded to ``NBP = 2**LOG_NBP``).

    Math: a pairwise tree over the blocks, level by level ``P[2k] + P[2k+1]`` (one correctly
    rounded fp32 add each, the order of the reference ``channel_mean_abs``), then
    ``mean = div_rn(sum, rows)``, ``c = bf16(mean)`` (nearest even; 0 if mean < 2**-100).

    Layout written: ``cscale_ptr[j]`` bf16 bits (int16), the payload's channel-scale section.
    Bytes moved: read ``4 * nblocks`` and write 2 bytes per channel.
    """
    col = tl.program_id(0) * BC + tl.arange(0, BC)
    blk = tl.arange(0, NBP)
    p = tl.load(
        part_ptr + blk[:, None] * cols + col[None, :],
        mask=(blk < nblocks)[:, None] & (col < cols)[None, :],
        other=0.0,
    )
    for i in tl.static_range(LOG_NBP):
        # a sum over an axis of length 2 is the one addition P[2k] + P[2k+1]
        p = tl.sum(tl.reshape(p, [NBP >> (i + 1), 2, BC]), axis=1)
    total = tl.reshape(p, [BC])
    n = tl.zeros([BC], dtype=tl.int32) + rows
    mean = tl.math.div_rn(total, n.to(tl.float32))
    bits = tl.where(f32_exponent(mean) < -100, 0, bf16_rne_bits(mean))
    tl.store(cscale_ptr + col, bits.to(tl.int16), mask=col < cols)


@triton.jit
def grouped_encode_kernel(
    x_ptr,
    base_ptr,
    out_ptr,
    codes_ptr,
    scales_ptr,
    cscale_ptr,
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
    CS: tl.constexpr,
):
    """Sender for int1 (``BITS=1``) / int2 (``BITS=2``): one program = ``BLOCK_R`` tokens x one
    group of ``GE`` channels (tile ``BLOCK_R x NB x 8/BITS``, ``NB*8/BITS = next_pow2(GE)``).

    Math, per group (``r = x - base`` in fp32; with channel scales (``CS=1``) ``c_j`` the bf16
    channel scales already in the payload and ``u = flush(div_rn(flush(r), c_j))`` (0 where
    ``c_j = 0``; ``flush``: subnormals to 0), else ``u = r`` and ``c_j = 1``;
    ``m = max|u|``, ``E = floor(log2 m)``)::

        mean = div_rn(sum_i int(|u_i| * 2**(15-E)) * 2**(E-15), n_valid)   (0 if m < 2**-100)
        int1: s = bf16(mean)          c = [u >= 0]                       lv = 2c-1
        int2: s = bf16(mean * 0.625)  c = [u>=-2s] + [u>=0] + [u>=2s]    lv = 2c-3
        new_base = dtype(base + (lv * s) * c_j)                          (nearest even)

    Layout written: codes at ``codes_ptr`` (``row_bytes`` per token, element j at byte
    ``j*BITS//8``, bit ``(j*BITS)%8``, LSB first, padding codes 0), bf16 scale bits at
    ``scales_ptr[row*ngroups + g]``; program (0, 0) also writes the header and zero gaps.

    Bytes moved per element: read x + read base + write new base (``3 * itemsize``) + write
    ``BITS/8`` code bytes + ``2/GE`` scale bytes (+ ``2/BLOCK_R`` bytes of channel scales
    read, from cache).
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
    if CS:
        col_ok = (j < GE) & (col < cols)
        cs = bf16_bits_to_f32(tl.load(cscale_ptr + col, mask=col_ok, other=0).to(tl.int32))
        cs3 = tl.broadcast_to(cs[None, :, :], [BLOCK_R, NB, PER])
        u = tl.math.div_rn(flush_subnormal(r), tl.where(cs3 > 0, cs3, 1.0))
        r = tl.where(cs3 > 0, flush_subnormal(u), 0.0)
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
    recon = level.to(tl.float32) * s
    if CS:
        recon = recon * cs3
    new = b + recon  # the products are exact, so FMA contraction is harmless
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
    cscale_ptr,
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
    CS: tl.constexpr,
):
    """Receiver for int1 / int2: one program = ``BLOCK_R`` tokens x ``BLOCK_B`` code bytes
    (``BLOCK_B * 8/BITS`` channels).

    Math: ``out = dtype(base + (level(c) * s) * c_j)`` with ``level = 2c-1`` (int1) or
    ``2c-3`` (int2), ``s`` the bf16 scale of the element's group (``col // GE``) and ``c_j`` the
    bf16 channel scale (``CS=1``; else 1); the same fp32 arithmetic as the sender, so both bases
    agree bit for bit.

    Layout read: as written by ``grouped_encode_kernel``. Bytes moved per element: read base +
    write out (``2 * itemsize``) + read ``BITS/8`` code bytes + ``2/GE`` scale bytes (+
    ``2/BLOCK_R`` bytes of channel scales, from cache).
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
    recon = level.to(tl.float32) * s
    if CS:
        cb = tl.load(cscale_ptr + col, mask=col < cols, other=0).to(tl.int32)
        recon = recon * bf16_bits_to_f32(cb)[None, :, :]
    b = load_f32(base_ptr + rows64[:, :, None] * base_stride + col[None, :, :], valid, DT)
    new = b + recon
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
    part_block_c: int  # channels per channel_partial_kernel program (x CHANNEL_BLOCK tokens)
    scale_block_c: int  # channels per channel_scale_kernel program
    nblocks: int  # token blocks of CHANNEL_BLOCK
    nblocks_p2: int  # next power of two (the pairwise tree's width)


# Token blocks of CHANNEL_BLOCK a channel-scale tree may have (rows up to 2**20): beyond, the
# kernels decline (the torch reference handles any size).
MAX_CHANNEL_BLOCKS = 4096


def launch_config(lay, rows: int, bits: int, interpreted: bool) -> GroupedLaunch:
    """Launch settings shared by int1 and int2 (the only place they are chosen).

    Sender: one program per group x enough tokens for a 4096-element tile. Receiver: tiles
    of up to 1024 channels x 4096 elements. Channel sums: tiles of 256 tokens x 16 channels;
    channel scales: 4096 block sums per program. Results do not depend on these (every
    reduction is within one group of one token, one block of tokens, or the fixed tree); the
    interpreter gets 4x larger tiles (fewer programs)."""
    per = 8 // bits
    tile = 16384 if interpreted else 4096
    gp = next_pow2(lay.group)
    enc_r = max(1, min(tile // gp, next_pow2(rows)))
    dec_b = min(next_pow2(lay.row_bytes), tile // 4 // per)
    dec_r = max(1, min(tile // (dec_b * per), next_pow2(rows)))
    cols = lay.padded_cols
    nblocks = -(-rows // CHANNEL_BLOCK)
    nbp = next_pow2(nblocks)
    return GroupedLaunch(
        enc_block_r=enc_r,
        enc_warps=8 if enc_r * gp >= 4096 else 4,
        dec_block_r=dec_r,
        dec_block_b=dec_b,
        dec_warps=8 if dec_r * dec_b * per >= 4096 else 4,
        part_block_c=max(1, min(tile // CHANNEL_BLOCK, next_pow2(cols))),
        scale_block_c=max(1, min(4096 // nbp, next_pow2(cols))),
        nblocks=nblocks,
        nblocks_p2=nbp,
    )


def make_plan(codec, shape, dtype, launch_config, interpreted) -> Plan:
    rows, cols = rows_cols(shape)
    lay = codec.layout(rows, cols)
    sections = (
        (0, rows * lay.row_bytes, torch.uint8),
        # group scales, then (channel_scale="mean") the channel scales right after them
        (lay.scales_offset, lay.nbytes - lay.scales_offset, torch.int16),
    )
    launch = launch_config(lay, rows, codec.bits, interpreted)
    channel_scaled = codec.sends_channel_scales(rows)
    if channel_scaled and launch.nblocks > MAX_CHANNEL_BLOCKS:
        raise KernelUnsupported(
            f"{codec.name}: channel scales over more than {MAX_CHANNEL_BLOCKS * CHANNEL_BLOCK} "
            f"tokens are not supported by the kernels (got {rows})"
        )
    meta = GroupedMeta(codec.bits, channel_scaled)
    return Plan.build(codec, shape, dtype, lay, launch, sections, meta=meta)


class GroupedMeta(NamedTuple):
    bits: int
    channel_scaled: bool


def _split_scales(plan: Plan, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The group-scale and channel-scale parts of the int16 scales section."""
    n = plan.rows * plan.layout.ngroups
    return scales[:n], (scales[n:] if plan.meta.channel_scaled else scales)


def encode(plan: Plan, x, base, out, strides, payload, views, hdr, gaps) -> None:
    lay, launch, (bits, cs) = plan.layout, plan.launch, plan.meta
    codes, scales = views
    scales, cscales = _split_scales(plan, scales)
    if cs:
        part = torch.empty(launch.nblocks * plan.cols, dtype=torch.float32, device=x.device)
        grid = (launch.nblocks, triton.cdiv(plan.cols, launch.part_block_c))
        channel_partial_kernel[grid](
            x, base, part, plan.rows, plan.cols, strides[0], strides[1],
            CB=CHANNEL_BLOCK, BC=launch.part_block_c, DT=plan.dt, num_warps=4,
        )  # fmt: skip
        nbp = launch.nblocks_p2
        channel_scale_kernel[(triton.cdiv(plan.cols, launch.scale_block_c),)](
            part, cscales, launch.nblocks, plan.rows, plan.cols,
            NBP=nbp, LOG_NBP=nbp.bit_length() - 1, BC=launch.scale_block_c, num_warps=4,
        )  # fmt: skip
    grid = (triton.cdiv(plan.rows, launch.enc_block_r), lay.ngroups)
    grouped_encode_kernel[grid](
        x, base, out, codes, scales, cscales, payload, hdr,
        plan.rows, plan.cols, *strides, lay.row_bytes, lay.ngroups, *gaps,
        BITS=bits, GE=lay.group, NB=next_pow2(lay.group) * bits // 8,
        BLOCK_R=launch.enc_block_r, DT=plan.dt, HDR_N=plan.hdr_n, CS=int(cs),
        num_warps=launch.enc_warps,
    )  # fmt: skip


def decode(plan: Plan, views, base, out, strides) -> None:
    lay, launch, (bits, cs) = plan.layout, plan.launch, plan.meta
    codes, scales = views
    scales, cscales = _split_scales(plan, scales)
    grid = (
        triton.cdiv(plan.rows, launch.dec_block_r),
        triton.cdiv(lay.row_bytes, launch.dec_block_b),
    )
    grouped_decode_kernel[grid](
        codes, scales, cscales, base, out, plan.rows, plan.cols, *strides, lay.row_bytes,
        lay.ngroups, BITS=bits, GE=lay.group, BLOCK_R=launch.dec_block_r,
        BLOCK_B=launch.dec_block_b, DT=plan.dt, CS=int(cs), num_warps=launch.dec_warps,
    )  # fmt: skip
