"""``nm_sparse``: keep the ``n`` largest of every ``m`` consecutive channels (values + indices)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ._grouped import ceil_div, join_sections, pack_bits, split_sections, unpack_bits
from .base import Codec, PayloadError, align_up, check_finite
from .registry import register_codec


class NMLayout(NamedTuple):
    ngroups: int  # ceil(cols / m)
    slots: int  # ngroups * n kept values per row
    index_bits: int  # bits per index: 1, 2, 4 or 8
    index_row_bytes: int  # ceil(slots * index_bits / 8)
    values_nbytes: int
    index_offset: int  # 16-byte-aligned start of the indices
    nbytes: int


def index_bits(m: int) -> int:
    """Smallest of 1, 2, 4, 8 bits that holds an index below ``m`` (never straddles a byte)."""
    return next(b for b in (1, 2, 4, 8) if (1 << b) >= m)


@register_codec
class NMSparseCodec(Codec):
    """N:M magnitude sparsification: in every group of ``m`` consecutive channels of a token,
    keep the ``n`` entries of largest ``|r|`` (ties go to the lower index) and send their values
    in the activation dtype plus their in-group indices.

    Math (float32): rows are zero padded to a multiple of ``m`` (padding ranks below every real
    entry of equal magnitude, and padded slots decode to nothing)::

        rank_i = #{j : |r_j| > |r_i|} + #{j < i : |r_j| == |r_i|}     keep i  iff  rank_i < n
        value  = dtype(clamp(r_i, -max_dtype, max_dtype))             round to nearest even
        recon  = float(value) at kept positions, 0 elsewhere

    Kept slots are listed in ascending index order within the group.

    Layout: values ``rows x ngroups*n`` in the header dtype (fp32/fp16/bf16); then, at the next
    16-byte boundary, the indices: per row ``ceil(ngroups*n*b/8)`` bytes, slot ``k`` at bit
    ``k*b`` LSB first, ``b`` = the smallest of 1, 2, 4, 8 with ``2**b >= m``. Bytes per element:
    ``(n/m) * (itemsize + b/8)`` (1:4 on bf16: 0.5625, 3.6x smaller than bf16).

    Parameters: ``n`` and ``m`` (header params 0 and 1): ``m`` a power of two in [2, 256],
    ``1 <= n < m``. Default 1:4.
    """

    name = "nm_sparse"
    codec_id = 4

    def __init__(self, n: int = 1, m: int = 4):
        for pname, v in (("n", n), ("m", m)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"nm_sparse: {pname} must be an int, got {v!r}")
        if not 2 <= m <= 256 or m & (m - 1):
            raise ValueError(f"nm_sparse: m must be a power of two between 2 and 256, got {m}")
        if not 1 <= n < m:
            raise ValueError(f"nm_sparse: n must satisfy 1 <= n < m = {m}, got {n}")
        self.n = n
        self.m = m
        self.index_bits = index_bits(m)

    def header_params(self) -> tuple[int, int, int, int]:
        return (self.n, self.m, 0, 0)

    @classmethod
    def from_header_params(cls, params: tuple[int, ...]) -> NMSparseCodec:
        """The codec whose ``header_params()`` are ``params``."""
        return cls(n=params[0], m=params[1])

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "n": self.n, "m": self.m}

    def __repr__(self) -> str:
        return f"NMSparseCodec(n={self.n}, m={self.m})"

    def layout(self, rows: int, cols: int, dtype: torch.dtype) -> NMLayout:
        ngroups = ceil_div(cols, self.m)
        slots = ngroups * self.n
        row_bytes = ceil_div(slots * self.index_bits, 8)
        values = rows * slots * dtype.itemsize
        off = align_up(values)
        return NMLayout(
            ngroups, slots, self.index_bits, row_bytes, values, off, off + rows * row_bytes
        )

    def _data_nbytes(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        return self.layout(rows, cols, dtype).nbytes

    def _encode_rows(self, r: torch.Tensor, dtype: torch.dtype, state: Any):
        check_finite(r, self.name)
        rows, cols = r.shape
        lay = self.layout(rows, cols, dtype)
        rp = F.pad(r, (0, lay.ngroups * self.m - cols)).reshape(rows, lay.ngroups, self.m)
        # A stable sort keeps equal magnitudes in index order: exactly the rank rule above.
        order = torch.sort(rp.abs(), dim=-1, descending=True, stable=True).indices
        kept = torch.sort(order[..., : self.n], dim=-1).values
        vals = torch.gather(rp, -1, kept)
        if dtype != torch.float32:
            big = torch.finfo(dtype).max
            vals = vals.clamp(-big, big)
        vals = vals.to(dtype)
        recon = self._scatter(vals, kept, rows, cols)
        per = 8 // lay.index_bits
        idx = kept.reshape(rows, lay.slots)
        idx = F.pad(idx, (0, ceil_div(lay.slots, per) * per - lay.slots))
        data = join_sections(
            [vals.contiguous().view(torch.uint8), pack_bits(idx, lay.index_bits)],
            (0, lay.index_offset),
            lay.nbytes,
            r.device,
        )
        return data, recon

    def _scatter(self, vals, idx, rows, cols):
        dense = torch.zeros(rows, vals.shape[1], self.m, dtype=torch.float32, device=vals.device)
        dense.scatter_(-1, idx, vals.float())
        return dense.reshape(rows, -1)[:, :cols]

    def _decode_rows(self, data, rows, cols, dtype):
        lay = self.layout(rows, cols, dtype)
        vals, idx = split_sections(
            data, (0, lay.index_offset), (lay.values_nbytes, rows * lay.index_row_bytes)
        )
        vals = vals.view(dtype).reshape(rows, lay.ngroups, self.n)
        idx = unpack_bits(idx.reshape(rows, lay.index_row_bytes), lay.index_bits, lay.slots)
        idx = idx.reshape(rows, lay.ngroups, self.n).long()
        if int(idx.max()) >= self.m:
            raise PayloadError(f"nm_sparse payload holds an index >= m = {self.m}")
        return self._scatter(vals, idx, rows, cols)
