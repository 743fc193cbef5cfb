"""Fused ``int2`` kernels (2-bit codes + bf16 group step): launch settings for the shared grouped
kernels in ``_grouped.py``. Reference: ``compactfusion.codecs.int2.Int2Codec``."""

from __future__ import annotations

from compactfusion.codecs.int2 import Int2Codec

from . import _grouped
from ._common import next_pow2

CODEC = Int2Codec
encode = _grouped.encode
decode = _grouped.decode


def launch_config(lay, rows: int, bits: int, interpreted: bool) -> _grouped.GroupedLaunch:
    """Sender: one program per group x enough tokens for a 4096-element tile. Receiver: tiles
    of up to 1024 channels x 4096 elements. Results do not depend on these (every reduction is
    within one group of one token); the interpreter gets 4x larger tiles (fewer programs)."""
    per = 8 // bits
    tile = 16384 if interpreted else 4096
    gp = next_pow2(lay.group)
    enc_r = max(1, min(tile // gp, next_pow2(rows)))
    dec_b = min(next_pow2(lay.row_bytes), tile // 4 // per)
    dec_r = max(1, min(tile // (dec_b * per), next_pow2(rows)))
    return _grouped.GroupedLaunch(
        enc_block_r=enc_r,
        enc_warps=8 if enc_r * gp >= 4096 else 4,
        dec_block_r=dec_r,
        dec_block_b=dec_b,
        dec_warps=8 if dec_r * dec_b * per >= 4096 else 4,
    )


def plan(codec: Int2Codec, shape, dtype, interpreted: bool):
    """int2 handles every shape (rows are padded to whole groups, of at most 256 channels)."""
    return _grouped.make_plan(codec, shape, dtype, launch_config, interpreted)
