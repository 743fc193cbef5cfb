"""Fused ``int1`` kernels (sign + bf16 group scale): the shared grouped kernels in ``_grouped.py``
with int1's bit width. Reference: ``compactfusion.codecs.int1.Int1Codec``."""

from __future__ import annotations

from compactfusion.codecs.int1 import Int1Codec

from . import _grouped

CODEC = Int1Codec
encode = _grouped.encode
decode = _grouped.decode
launch_config = _grouped.launch_config


def plan(codec: Int1Codec, shape, dtype, interpreted: bool):
    """int1 handles every shape (rows are padded to whole groups, of at most 256 channels)."""
    return _grouped.make_plan(codec, shape, dtype, launch_config, interpreted)
