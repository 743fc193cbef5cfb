"""``raw``: the identity codec (uncompressed, in the input dtype). Bit-exact."""

from __future__ import annotations

from typing import Any

import torch

from .base import Codec
from .registry import register_codec


@register_codec
class RawCodec(Codec):
    """Sends the tensor's bytes unchanged, in its own dtype (fp32, fp16 or bf16).

    Used for warm-up steps, for sites too small to compress and as the uncompressed baseline.
    Wire size per element: the dtype's size (2 bytes for bf16).
    """

    name = "raw"
    codec_id = 0
    lossless = True

    def _data_nbytes(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        return rows * cols * dtype.itemsize

    def _encode_rows(self, r: torch.Tensor, dtype: torch.dtype, state: Any):
        raise NotImplementedError  # _encode_unchecked is overridden

    def _decode_rows(self, data, rows, cols, dtype):
        return data.view(dtype).reshape(rows, cols).float()

    def _encode_unchecked(self, x, state, dtype):
        shape = tuple(x.shape)
        self.payload_nbytes(shape, dtype)  # validates dtype and shape
        rows, cols = (1, 1) if not shape else (x.numel() // shape[-1], shape[-1])
        xc = x.detach().to(dtype).contiguous().reshape(-1)
        data = xc.view(torch.uint8)
        payload = self._assemble(shape, dtype, data, rows, cols)
        return payload, xc.reshape(rows, cols).float()

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        shape, dtype, data = self.parse(payload)
        return data.view(dtype).reshape(shape).clone()
