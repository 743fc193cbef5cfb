"""``int2``: four levels (2 bits) per element and one bf16 step per group of channels."""

from __future__ import annotations

import torch

from ._grouped import GroupedCodec
from .registry import register_codec


@register_codec
class Int2Codec(GroupedCodec):
    """Uniform 2-bit quantizer with levels ``{-3d, -d, d, 3d}`` per group of channels.

    Math (float32; ``mean_abs`` is the exact, order-independent group mean of ``|r|`` described
    in :class:`~compactfusion.codecs._grouped.GroupedCodec`)::

        d = bf16(mean_abs * 0.625)     fp32 product, then round to nearest even to bf16
                                       (0 if max |r| < 2**-100)
        c = 0 if r < -2d, 1 if r < 0, 2 if r < 2d, else 3
          = [r >= -2d] + [r >= 0] + [r >= 2d]
        recon = (2c - 3) * float(d)    exact (a 2-bit integer times a bf16)

    Error bound per element: ``|recon - r| <= max(d, |r| - 3d)``.

    Layout: 2-bit codes, rows of ``Cp / 4`` bytes, element ``j`` at byte ``j // 4``, bits
    ``2 * (j % 4)``; then (16-byte aligned) bf16 steps ``rows x ngroups``. Bytes per element:
    ``1/4 + 2/group_size`` (0.2578 for G=256: about 7.8x smaller than bf16).

    Parameters: ``group_size`` (multiple of 8 in [8, 256], default 256; header param 0).
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
