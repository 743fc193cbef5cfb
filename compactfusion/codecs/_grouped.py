"""Pieces shared by the quantizing codecs: exact float helpers, bit packing, sections, and the
grouped-scale base class of ``int1`` and ``int2``.

Everything here is defined so that a one-pass Triton kernel (``compactfusion.kernels``) can
reproduce it bit for bit: powers of two are built from exponent bits, sums are over integers,
and the only roundings are IEEE float32 operations (correctly rounded division included) and
round-to-nearest-even conversions to bf16/fp8.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from .base import Codec, align_up, check_finite

# Scales of groups (or rows) whose largest magnitude is below this are zero: the residual is
# numerically nothing, and it keeps every power of two used below inside the normal range.
TINY = 2.0**-100
TINY_EXP = -100  # m < 2**-100  <=>  floor(log2 m) < -100 (for any float32 m >= 0)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def exponent(m: torch.Tensor) -> torch.Tensor:
    """``floor(log2 m)`` of non-negative float32 values, read from the exponent bits.

    Exact for normal numbers; zero and subnormals give -127 (below ``TINY_EXP``)."""
    return ((m.contiguous().view(torch.int32) >> 23) & 0xFF) - 127


def pow2(e: torch.Tensor) -> torch.Tensor:
    """``2**e`` as exact float32 for integer ``e`` in [-126, 127] (built from the bits)."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``rows x L`` codes of ``bits`` bits (L a multiple of ``8 // bits``) into bytes.

    Element ``j`` of a row goes to byte ``j * bits // 8`` at bit ``(j * bits) % 8``, LSB first.
    Computed as one small float32 matrix product (``sum_k c_k * 2**(k * bits)``, exact: every
    byte is an integer below 256), then one conversion to uint8.
    """
    per = 8 // bits
    rows, length = codes.shape
    weights = 2.0 ** (torch.arange(per, device=codes.device, dtype=torch.float32) * bits)
    c = codes.to(torch.float32).reshape(rows, length // per, per)
    return (c @ weights).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``rows x nbytes`` bytes to ``rows x length`` uint8 codes."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.uint8) * bits
    c = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(packed.shape[0], -1)[:, :length]


def split_sections(data: torch.Tensor, offsets: tuple[int, ...], sizes: tuple[int, ...]):
    """Views of the sections of ``data`` (each starts at its 16-byte-aligned offset)."""
    return [data[o : o + n] for o, n in zip(offsets, sizes, strict=True)]


def join_sections(
    parts: list[torch.Tensor], offsets: tuple[int, ...], total: int, device
) -> torch.Tensor:
    """Lay byte tensors out at their offsets, zero-filling the alignment gaps."""
    data = torch.zeros(total, dtype=torch.uint8, device=device)
    for part, off in zip(parts, offsets, strict=True):
        data[off : off + part.numel()] = part.reshape(-1)
    return data


def bf16_bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a bfloat16 tensor (for writing scales into a payload)."""
    return t.to(torch.bfloat16).contiguous().view(torch.uint8)


class GroupedLayout(NamedTuple):
    """Packed layout of a grouped-scale codec for a ``rows x cols`` matrix."""

    group: int  # effective group size Ge = min(G, ceil8(cols))
    ngroups: int  # ceil(cols / Ge)
    padded_cols: int  # Cp = ngroups * Ge
    row_bytes: int  # Cp * bits / 8
    scales_offset: int  # 16-byte-aligned start of the bf16 scales
    nbytes: int  # total data bytes


class GroupedCodec(Codec):
    """Base of the codecs that quantize each group of ``G`` channels of a token with one scale.

    Per group (``m = max |r|`` over its valid elements, ``E = floor(log2 m)`` from the exponent
    bits)::

        q_i      = floor(|r_i| * 2**(15 - E))          exact integers < 2**16
        mean_abs = (sum_i q_i * 2**(E - 15)) / n_valid  integer sum (exact, order-free), then
                                                        one correctly rounded fp32 division
        mean_abs = 0                                    if m < 2**-100

    so the scale is an order-independent function of the group that a kernel reproduces
    exactly. Subclasses turn ``mean_abs`` into a bf16 scale and codes (``_quantize``) and back
    (``_dequantize``).

    Layout: codes, row-major, ``Cp * bits / 8`` bytes per row (``Cp`` = row padded with
    uncounted zeros to whole groups; padded codes are 0), element ``j`` at byte
    ``j * bits // 8``, bit ``(j * bits) % 8``, LSB first; then at the next 16-byte boundary the
    bf16 scales, ``rows x ngroups``.
    """

    bits: ClassVar[int]

    def __init__(self, group_size: int = 256):
        if (
            not isinstance(group_size, int)
            or isinstance(group_size, bool)
            or group_size % 8
            or not 8 <= group_size <= 256
        ):
            raise ValueError(
                f"{self.name}: group_size must be a multiple of 8 between 8 and 256, "
                f"got {group_size!r}"
            )
        self.group_size = group_size

    def header_params(self) -> tuple[int, int, int, int]:
        return (self.group_size, 0, 0, 0)

    @classmethod
    def from_header_params(cls, params: tuple[int, ...]) -> GroupedCodec:
        """The codec whose ``header_params()`` are ``params``."""
        return cls(group_size=params[0])

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "group_size": self.group_size}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(group_size={self.group_size})"

    # --- layout ---------------------------------------------------------------------------------
    def layout(self, rows: int, cols: int) -> GroupedLayout:
        group = min(self.group_size, align_up(cols, 8))
        ngroups = ceil_div(cols, group)
        padded = ngroups * group
        row_bytes = padded * self.bits // 8
        scales_offset = align_up(rows * row_bytes)
        return GroupedLayout(
            group, ngroups, padded, row_bytes, scales_offset, scales_offset + 2 * rows * ngroups
        )

    def _data_nbytes(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        return self.layout(rows, cols).nbytes

    # --- quantization -----------------------------------------------------------------------
    @staticmethod
    def group_mean_abs(a: torch.Tensor, counts: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Order-independent mean of ``a = |r|`` (``rows x ngroups x Ge``, zero padded) whose
        group maxima are ``m``. Overwrites ``a`` (it is scratch space afterwards)."""
        e_raw = exponent(m)
        e = e_raw.clamp(TINY_EXP, 127)  # the clamp only keeps the masked lanes finite
        # a * 2**(15 - e) is exact and in [0, 2**16); its floor is an integer, and so is every
        # partial sum of a group (below 256 * 2**16 = 2**24): float32 sums them exactly, in any
        # order.
        s = a.mul_(pow2(15 - e).unsqueeze(-1)).floor_().sum(-1)
        mean = (s * pow2(e - 15)) / counts.expand_as(s)
        return torch.where(e_raw < TINY_EXP, torch.zeros_like(mean), mean)

    def _quantize(
        self, r: torch.Tensor, mean_abs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes as float32 integers (same shape as ``r``) and bf16 scales (``rows x ngroups``).
        (Comparisons into float32 outputs are several times faster on CPU than into bool.)"""
        raise NotImplementedError

    def _dequantize(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """float32 values of integer ``codes`` (``rows x ngroups x Ge``; float32 or uint8) with
        bf16 ``scales``."""
        raise NotImplementedError

    def _encode_rows(self, r: torch.Tensor, dtype: torch.dtype, state: Any):
        rows, cols = r.shape
        lay = self.layout(rows, cols)
        pad = lay.padded_cols - cols
        rp = (F.pad(r, (0, pad)) if pad else r).reshape(rows, lay.ngroups, lay.group)
        a = rp.abs()
        m = a.amax(-1)  # inf and nan propagate into the group maxima
        check_finite(m, self.name)
        col = torch.arange(lay.ngroups, device=r.device) * lay.group
        counts = (cols - col).clamp(max=lay.group).to(torch.float32)
        codes, scales = self._quantize(rp, self.group_mean_abs(a, counts, m))
        if pad:  # padded codes are 0
            valid = torch.arange(lay.padded_cols, device=r.device) < cols
            codes = codes * valid.reshape(lay.ngroups, lay.group)
        recon = self._dequantize(codes, scales).reshape(rows, lay.padded_cols)[:, :cols]
        packed = pack_bits(codes.reshape(rows, lay.padded_cols), self.bits)
        data = join_sections(
            [packed, bf16_bits(scales)], (0, lay.scales_offset), lay.nbytes, r.device
        )
        return data, recon

    def _decode_rows(self, data, rows, cols, dtype):
        lay = self.layout(rows, cols)
        packed, scales = split_sections(
            data, (0, lay.scales_offset), (rows * lay.row_bytes, 2 * rows * lay.ngroups)
        )
        codes = unpack_bits(packed.reshape(rows, lay.row_bytes), self.bits, lay.padded_cols)
        scales = scales.view(torch.bfloat16).reshape(rows, lay.ngroups)
        recon = self._dequantize(codes.reshape(rows, lay.ngroups, lay.group), scales)
        return recon.reshape(rows, lay.padded_cols)[:, :cols]
