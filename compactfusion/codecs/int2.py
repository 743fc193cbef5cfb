"""``int2``: four levels (2 bits) per element, one bf16 step per group of channels of a token,
and (by default) one bf16 scale per channel."""

from __future__ import annotations

import torch

from ._grouped import GroupedCodec
from .registry import register_codec


@register_codec
class Int2Codec(GroupedCodec):
    """Uniform 2-bit quantizer with levels ``{-3d, -d, d, 3d} * c_j`` per group of channels of a
    token, ``c_j`` the channel's scale (its mean magnitude over the tokens).

    Math (float32; ``u = r / c`` per channel and ``mean_abs``, the exact, order-independent
    group mean of ``|u|``, as described in :class:`~compactfusion.codecs._grouped.GroupedCodec`;
    with ``channel_scale="none"``, ``u = r`` and ``c = 1``)::

        d = bf16(mean_abs * 0.625)     fp32 product, then round to nearest even to bf16
                                       (0 if max |u| < 2**-100)
        code = 0 if u < -2d, 1 if u < 0, 2 if u < 2d, else 3
             = [u >= -2d] + [u >= 0] + [u >= 2d]
        recon = ((2 code - 3) * d) * c_j     exact (a 2-bit integer times two bf16 values)

    Error bound per element: ``|recon - r| <= max(d, |u| - 3d) * c_j`` (up to the rounding of
    ``u``).

    Layout: 2-bit codes, rows of ``Cp / 4`` bytes, element ``j`` at byte ``j // 4``, bits
    ``2 * (j % 4)``; then (16-byte aligned) bf16 steps ``rows x ngroups``, then the ``cols``
    bf16 channel scales. Bytes per element: ``1/4 + 2/group_size + 2/rows`` (0.2598 for G=256
    at 1024 x 3072: 7.70x smaller than bf16, header included; 7.76x with
    ``channel_scale="none"``). Channel scales are sent only from ``CHANNEL_MIN_ROWS`` = 256
    rows on (fewer rows: ``c = 1``, ``2/rows`` is 0).

    Parameters: ``group_size`` (multiple of 8 in [8, 256], default 256; header param 0);
    ``channel_scale``: ``"mean"`` (default) or ``"none"`` (per-group scales only; header
    param 1).
    """

    name = "int2"
    codec_id = 2
    bits = 2

    def _quantize(self, r, mean_abs):
        d = (mean_abs * 0.625).to(torch.bfloat16)
        two_d = 2.0 * d.float().unsqueeze(-1)
        codes = torch.ge(r, -two_d, out=torch.empty_like(r))
        step = torch.ge(r, 0, out=torch.empty_like(r))
        codes += step
        codes += torch.ge(r, two_d, out=step)
        return codes, d

    def _dequantize(self, codes, scales):
        # (2c - 3) * d: both steps exact (small integers times a bf16 value)
        recon = codes.to(torch.float32) * 2.0
        return recon.sub_(3.0).mul_(scales.float().unsqueeze(-1))
