"""``int1``: one sign bit per element and one bf16 scale (mean magnitude) per group of channels."""

from __future__ import annotations

import torch

from ._grouped import GroupedCodec
from .registry import register_codec


@register_codec
class Int1Codec(GroupedCodec):
    """Sign + scale: every element of a group of ``group_size`` channels of one token is sent as
    ``+s`` or ``-s``, where ``s`` is the group's mean magnitude.

    Math (float32; ``mean_abs`` is the exact, order-independent group mean of ``|r|`` described
    in :class:`~compactfusion.codecs._grouped.GroupedCodec`)::

        s = bf16(mean_abs)             round to nearest even (0 if max |r| < 2**-100)
        c = 1 if r >= 0 else 0         (-0.0 counts as >= 0)
        recon = (2c - 1) * float(s)    exact

    Layout: 1-bit codes, ``ceil8``-padded rows of ``Cp / 8`` bytes, LSB first; then (16-byte
    aligned) bf16 scales ``rows x ngroups``. Bytes per element: ``1/8 + 2/group_size``
    (0.1328 for G=256: about 15x smaller than bf16).

    Parameters: ``group_size`` (multiple of 8 in [8, 256], default 256; header param 0).
    """

    name = "int1"
    codec_id = 3
    bits = 1

    def _quantize(self, r, mean_abs):
        scales = mean_abs.to(torch.bfloat16)
        return torch.ge(r, 0, out=torch.empty_like(r)), scales

    def _dequantize(self, codes, scales):
        # (2c - 1) * s: both steps exact (small integers times a bf16 value)
        recon = codes.to(torch.float32) * 2.0
        return recon.sub_(1.0).mul_(scales.float().unsqueeze(-1))
