"""``int1``: one sign bit per element, one bf16 scale (mean magnitude) per group of channels of a
token, and (by default) one bf16 scale per channel."""

from __future__ import annotations

import torch

from ._grouped import GroupedCodec
from .registry import register_codec


@register_codec
class Int1Codec(GroupedCodec):
    """Sign + scale: every element of a group of ``group_size`` channels of one token is sent as
    ``+s * c_j`` or ``-s * c_j``, where ``c_j`` is the channel's scale (its mean magnitude over
    the tokens) and ``s`` the group's mean magnitude after dividing by the channel scales.

    Math (float32; ``u = r / c`` per channel and ``mean_abs``, the exact, order-independent
    group mean of ``|u|``, as described in :class:`~compactfusion.codecs._grouped.GroupedCodec`;
    with ``channel_scale="none"``, ``u = r`` and ``c = 1``)::

        s = bf16(mean_abs)                    round to nearest even (0 if max |u| < 2**-100)
        code = 1 if u >= 0 else 0             (-0.0 counts as >= 0)
        recon = ((2 code - 1) * s) * c_j      exact

    Layout: 1-bit codes, ``ceil8``-padded rows of ``Cp / 8`` bytes, LSB first; then (16-byte
    aligned) bf16 group scales ``rows x ngroups``, then the ``cols`` bf16 channel scales.
    Bytes per element: ``1/8 + 2/group_size + 2/rows`` (0.1348 for G=256 at 1024 x 3072:
    14.8x smaller than bf16, header included; 15.1x with ``channel_scale="none"``).
    Channel scales are sent only from ``CHANNEL_MIN_ROWS`` = 256 rows on (fewer rows:
    ``c = 1``, ``2/rows`` is 0).

    Parameters: ``group_size`` (multiple of 8 in [8, 256], default 256; header param 0);
    ``channel_scale``: ``"mean"`` (default) or ``"none"`` (per-group scales only; header
    param 1).
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
