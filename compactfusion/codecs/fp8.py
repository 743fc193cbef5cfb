"""``fp8``: float8 e4m3fn codes with one bf16 scale per token (row)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._grouped import TINY, bf16_bits, join_sections, split_sections
from .base import Codec, align_up, check_finite
from .registry import register_codec

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class Fp8Layout(NamedTuple):
    scales_offset: int
    nbytes: int


@register_codec
class Fp8Codec(Codec):
    """Per-token scaled float8 (e4m3fn, ``torch.float8_e4m3fn``).

    Math (float32, per row with ``m = max |r|`` over the row)::

        s     = bf16(m / 448)                    correctly rounded fp32 division, then round to
                                                 nearest even to bf16; 0 if m < 2**-100
        code  = e4m3fn(clamp(r / s, -448, 448))  correctly rounded division, then round to
                                                 nearest even (subnormals included); 0 if s = 0
        recon = float(code) * float(s)           exact

    Error bound per element: ``|recon - r| <= 2**-4 * m`` (3 mantissa bits; the clamp costs at
    most the bf16 rounding of ``s``, ``2**-8 * m``).

    Layout: codes ``rows x cols`` bytes (row-major), then at the next 16-byte boundary the bf16
    scales (``rows``). Bytes per element: ``1 + 2 / cols`` (about 2x smaller than bf16).
    """

    name = "fp8"
    codec_id = 1

    @classmethod
    def from_header_params(cls, params: tuple[int, ...]) -> Fp8Codec:
        """The codec whose ``header_params()`` are ``params`` (fp8 has none)."""
        return cls()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def __repr__(self) -> str:
        return "Fp8Codec()"

    def layout(self, rows: int, cols: int) -> Fp8Layout:
        off = align_up(rows * cols)
        return Fp8Layout(off, off + 2 * rows)

    def _data_nbytes(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        return self.layout(rows, cols).nbytes

    def _encode_rows(self, r: torch.Tensor, dtype: torch.dtype, state: Any):
        rows, cols = r.shape
        m = r.abs().amax(1, keepdim=True)  # inf and nan propagate into the row maxima
        check_finite(m, self.name)
        # Divide by a tensor, not a Python scalar: CUDA torch turns scalar division into a
        # multiplication by the (inexact) reciprocal.
        s = (m / torch.full_like(m, FP8_MAX)).to(torch.bfloat16)
        s = torch.where(m < TINY, torch.zeros_like(s), s)
        sf = s.float()
        pos = sf > 0
        y = torch.where(pos, r / torch.where(pos, sf, torch.ones_like(sf)), torch.zeros_like(r))
        codes = y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        recon = codes.float() * sf
        lay = self.layout(rows, cols)
        data = join_sections(
            [codes.view(torch.uint8), bf16_bits(s)], (0, lay.scales_offset), lay.nbytes, r.device
        )
        return data, recon

    def _decode_rows(self, data, rows, cols, dtype):
        lay = self.layout(rows, cols)
        codes, scales = split_sections(data, (0, lay.scales_offset), (rows * cols, 2 * rows))
        sf = scales.view(torch.bfloat16).float().reshape(rows, 1)
        return codes.view(torch.float8_e4m3fn).float().reshape(rows, cols) * sf
