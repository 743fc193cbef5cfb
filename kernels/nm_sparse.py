"""Fused ``nm_sparse`` kernels (keep the n largest |r| of every m channels).

Reference: ``compactfusion.codecs.nm_sparse.NMSparseCodec``. Selection is by pairwise rank
inside a group (an ``m x m`` comparison per group), so the kernels handle ``m <= 32``; the
index packing works on whole tiles of slots, so ``n`` must be a power of two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from compactfusion.codecs.base import rows_cols
from compactfusion.codecs.nm_sparse import NMSparseCodec

from ._common import (
    KernelUnsupported,
    Plan,
    bf16_bits_to_f32,
    bf16_rne_bits,
    load_f32,
    next_pow2,
    to_storage,
    write_prologue,
)

CODEC = NMSparseCodec
MAX_M = 32
# Largest finite values: residuals are saturated there rather than rounded to inf.
FP16_MAX = tl.constexpr(65504.0)
BF16_MAX = tl.constexpr(3.3895313892515355e38)


@triton.jit
def nm_encode_kernel(
    x_ptr,
    base_ptr,
    out_ptr,
    vals_ptr,
    idx_ptr,
    payload_ptr,
    hdr_ptr,
    cols,
    x_stride,
    base_stride,
    out_stride,
    ngroups,
    idx_row_bytes,
    gap0,
    ngap0,
    gap1,
    ngap1,
    N: tl.constexpr,
    M: tl.constexpr,
    IB: tl.constexpr,
    BG: tl.constexpr,
    DT: tl.constexpr,
    HDR_N: tl.constexpr,
):
    """Sender for nm_sparse: one program = one token x ``BG`` groups of ``M`` channels.

    Math (fp32, ``r = x - base``, ``a = |r|``; channels past ``cols`` are zeros)::

        rank_i = #{j: a_j > a_i} + #{j < i: a_j == a_i}      keep i iff rank_i < N
        slot(i) = #{kept j < i}                              ascending index order
        value  = dtype(clamp(r_i, +-max finite))             nearest even
        new_base = dtype(base + (float(value) if kept else 0))

    Layout written: values (dtype bits, as int32/int16) at ``vals_ptr[row*ngroups*N + g*N +
    slot]``; indices, ``IB`` bits each, slot ``k`` of a row at bit ``k*IB`` of that row's
    ``idx_row_bytes`` bytes (LSB first; slots of absent groups are 0); program (0, 0) also
    writes the header and zero gaps. ``BG`` is a multiple of 8 so a tile's indices start on a
    byte boundary.

    Bytes moved per element: read x + read base + write new base (``3 * itemsize``) +
    ``N/M * (itemsize + IB/8)`` payload bytes.
    """
    PER: tl.constexpr = 8 // IB
    row = tl.program_id(0)
    pid_g = tl.program_id(1)
    if (row == 0) & (pid_g == 0):
        write_prologue(payload_ptr, hdr_ptr, gap0, ngap0, gap1, ngap1, HDR_N)
    row64 = row.to(tl.int64)
    gi = pid_g * BG + tl.arange(0, BG)
    j = tl.arange(0, M)
    col = gi[:, None] * M + j[None, :]
    valid = col < cols

    x = load_f32(x_ptr + row64 * x_stride + col, valid, DT)
    b = load_f32(base_ptr + row64 * base_stride + col, valid, DT)
    r = x - b
    a = tl.abs(r)

    ii = j[None, :, None]
    jj = j[None, None, :]
    ai = a[:, :, None]
    aj = a[:, None, :]
    beats = (aj > ai) | ((aj == ai) & (jj < ii))
    keep = tl.sum(beats.to(tl.int32), axis=2) < N
    pos = tl.sum((keep[:, None, :] & (jj < ii)).to(tl.int32), axis=2)

    if DT == 0:
        vbits = r.to(tl.int32, bitcast=True)
        vf = r
    elif DT == 1:
        h = tl.minimum(tl.maximum(r, -FP16_MAX), FP16_MAX).to(tl.float16)
        vbits = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        vf = h.to(tl.float32)
    else:
        vbits = bf16_rne_bits(tl.minimum(tl.maximum(r, -BF16_MAX), BF16_MAX))
        vf = bf16_bits_to_f32(vbits)
    new = b + tl.where(keep, vf, 0.0)
    tl.store(out_ptr + row64 * out_stride + col, to_storage(new, DT), mask=valid)

    t = tl.arange(0, N)
    sel = keep[:, :, None] & (pos[:, :, None] == t[None, None, :])  # [BG, M, N]
    g_ok = gi < ngroups
    slot_v = tl.sum(tl.where(sel, vbits[:, :, None], 0), axis=1)  # exactly one term per slot
    slot_i = tl.sum(tl.where(sel, j[None, :, None], 0), axis=1)
    slot_i = tl.where(g_ok[:, None], slot_i, 0)
    vptrs = vals_ptr + row64 * ngroups * N + gi[:, None] * N + t[None, :]
    if DT == 0:
        tl.store(vptrs, slot_v, mask=g_ok[:, None])
    else:
        tl.store(vptrs, slot_v.to(tl.int16), mask=g_ok[:, None])

    flat = tl.reshape(slot_i, [BG * N // PER, PER])
    packed = tl.sum(flat << (tl.arange(0, PER) * IB)[None, :], axis=1)
    byte = pid_g * (BG * N * IB // 8) + tl.arange(0, BG * N // PER)
    tl.store(idx_ptr + row64 * idx_row_bytes + byte, packed.to(tl.uint8), mask=byte < idx_row_bytes)


@triton.jit
def nm_decode_kernel(
    vals_ptr,
    idx_ptr,
    base_ptr,
    out_ptr,
    cols,
    base_stride,
    out_stride,
    ngroups,
    idx_row_bytes,
    N: tl.constexpr,
    M: tl.constexpr,
    IB: tl.constexpr,
    BG: tl.constexpr,
    DT: tl.constexpr,
):
    """Receiver for nm_sparse: one program = one token x ``BG`` groups.

    Math: scatter each slot's value to its index (bits, so -0.0 survives), 0 elsewhere;
    ``out = dtype(base + value)``, the sender's arithmetic exactly. Slots that point past
    ``cols`` (row padding) are dropped. Layout read: as written by ``nm_encode_kernel``.

    Bytes moved per element: read base + write out (``2 * itemsize``) + ``N/M * (itemsize +
    IB/8)`` payload bytes.
    """
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    gi = tl.program_id(1) * BG + tl.arange(0, BG)
    g_ok = gi < ngroups
    t = tl.arange(0, N)
    slot = gi[:, None] * N + t[None, :]  # [BG, N]
    vb = tl.load(vals_ptr + row64 * ngroups * N + slot, mask=g_ok[:, None], other=0)
    vb = vb.to(tl.int32)
    if DT != 0:
        vb = vb & 0xFFFF
    bit = slot * IB
    ib = tl.load(idx_ptr + row64 * idx_row_bytes + (bit >> 3), mask=g_ok[:, None], other=0)
    idx = (ib.to(tl.int32) >> (bit & 7)) & ((1 << IB) - 1)

    j = tl.arange(0, M)
    match = (idx[:, None, :] == j[None, :, None]) & g_ok[:, None, None]  # [BG, M, N]
    bits = tl.sum(tl.where(match, vb[:, None, :], 0), axis=2)  # [BG, M]
    if DT == 0:
        v = bits.to(tl.float32, bitcast=True)
    elif DT == 1:
        v = bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        v = bf16_bits_to_f32(bits)
    col = gi[:, None] * M + j[None, :]
    valid = col < cols
    b = load_f32(base_ptr + row64 * base_stride + col, valid, DT)
    tl.store(out_ptr + row64 * out_stride + col, to_storage(b + v, DT), mask=valid)


class NMLaunch(NamedTuple):
    block_groups: int  # groups per program (one token per program), a multiple of 8
    warps: int


def launch_config(ngroups: int, m: int, interpreted: bool) -> NMLaunch:
    """About 4096 pairwise comparisons per program (``BG * m * m``); at least 8 groups so a
    tile's packed indices start on a byte. Results do not depend on this; the interpreter
    gets up to 8x larger tiles (fewer programs)."""
    if interpreted:
        bg = max(8, min(32768 // (m * m), next_pow2(ngroups)))
    else:
        bg = max(8, min(256, 4096 // (m * m), next_pow2(ngroups)))
    return NMLaunch(block_groups=bg, warps=4)


def plan(codec: NMSparseCodec, shape, dtype, interpreted: bool) -> Plan:
    if codec.m > MAX_M:
        raise KernelUnsupported(f"nm_sparse kernels handle m <= {MAX_M}, got m = {codec.m}")
    if codec.n & (codec.n - 1):
        raise KernelUnsupported(f"nm_sparse kernels need n a power of two, got n = {codec.n}")
    rows, cols = rows_cols(shape)
    lay = codec.layout(rows, cols, dtype)
    vdt = torch.int32 if dtype == torch.float32 else torch.int16
    sections = (
        (0, lay.values_nbytes, vdt),
        (lay.index_offset, rows * lay.index_row_bytes, torch.uint8),
    )
    launch = launch_config(lay.ngroups, codec.m, interpreted)
    return Plan.build(codec, shape, dtype, lay, launch, sections, meta=(codec.n, codec.m))


def encode(plan: Plan, x, base, out, strides, payload, views, hdr, gaps) -> None:
    lay, lc = plan.layout, plan.launch
    n, m = plan.meta
    vals, idx = views
    grid = (plan.rows, triton.cdiv(lay.ngroups, lc.block_groups))
    nm_encode_kernel[grid](
        x, base, out, vals, idx, payload, hdr, plan.cols, *strides, lay.ngroups,
        lay.index_row_bytes, *gaps,
        N=n, M=m, IB=lay.index_bits, BG=lc.block_groups, DT=plan.dt, HDR_N=plan.hdr_n,
        num_warps=lc.warps,
    )  # fmt: skip


def decode(plan: Plan, views, base, out, strides) -> None:
    lay, lc = plan.layout, plan.launch
    n, m = plan.meta
    vals, idx = views
    grid = (plan.rows, triton.cdiv(lay.ngroups, lc.block_groups))
    nm_decode_kernel[grid](
        vals, idx, base, out, plan.cols, *strides, lay.ngroups, lay.index_row_bytes,
        N=n, M=m, IB=lay.index_bits, BG=lc.block_groups, DT=plan.dt, num_warps=lc.warps,
    )  # fmt: skip
