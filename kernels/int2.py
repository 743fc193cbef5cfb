"""Fused ``int2`` kernels (2-bit codes + bf16 group step): the shared grouped kernels in
``_grouped.py`` with int2's bit width. Reference: ``compactfusion.codecs.int2.Int2Codec``."""

from __future__ import annotations

from compactfusion.codecs.int2 import Int2Codec

from . import _grouped

CODEC = Int2Codec
encode = _grouped.encode
decode = _grouped.decode
launch_config = _grouped.launch_config


def plan(codec: Int2Codec, shape, dtype, interpreted: bool):
    """int2 handles every shape (rows are padded to whole groups, of at most 256 channels)."""
    return _grouped.make_plan(codec, shape, dtype, launch_config, interpreted)
