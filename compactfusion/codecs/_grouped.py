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


# Channel scales (``channel_scale="mean"``): rows are cut into blocks of this many tokens whose
# per-channel sums are exact (integer sums below 2**24, see ``channel_mean_abs``). Part of the
# payload format: changing it changes the scales.
CHANNEL_BLOCK = 256
# Channel scales are sent only for matrices of at least this many rows (tokens): they cost
# ``2 * cols`` bytes, i.e. ``2 / rows`` bytes per element, which below 256 rows would take more
# than 3 % (int2) / 6 % (int1) off the wire ratio, and a mean over so few tokens says little.
# Deterministic from the shape, so sender and receiver agree without a header field. Part of the
# payload format.
CHANNEL_MIN_ROWS = 256
# Names of the channel-scale schemes and their header code (header parameter 1).
CHANNEL_SCALES: dict[str, int] = {"none": 0, "mean": 1}


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def flush_subnormal(t: torch.Tensor) -> torch.Tensor:
    """``t`` with zero and subnormal float32 values replaced by +0.0 (GPU division flushes
    subnormal operands and results; flushing explicitly makes every backend agree)."""
    return torch.where(exponent(t.abs()) < -126, torch.zeros_like(t), t)


def channel_mean_abs(r: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of ``|r|`` over the tokens of a float32 ``rows x cols`` matrix, as
    float32 ``cols``, computed so that a kernel reproduces it bit for bit.

    Tokens are cut into blocks of ``CHANNEL_BLOCK`` (the last one zero padded). In block ``b``
    with channel maximum ``m`` and ``E = floor(log2 m)``::

        P[b] = (sum_i floor(|r_i| * 2**(15 - E))) * 2**(E - 15)    exact: an integer sum
                                                                   below 2**24 (0 if m < 2**-100)

    The block sums are added as a pairwise tree over the blocks zero padded to a power of two
    (level by level, ``P[2k] + P[2k+1]``; each addition is one correctly rounded fp32 add, and
    the tree does not depend on launch settings), and ``mean = div_rn(sum, rows)``; means below
    2**-100 (and zero) are 0.
    """
    rows, cols = r.shape
    nb = ceil_div(rows, CHANNEL_BLOCK)
    a = r.abs()
    if nb * CHANNEL_BLOCK != rows:
        a = F.pad(a, (0, 0, 0, nb * CHANNEL_BLOCK - rows))
    a = a.reshape(nb, CHANNEL_BLOCK, cols)
    m = a.amax(1)
    e_raw = exponent(m)
    e = e_raw.clamp(TINY_EXP, 127)
    s = a.mul_(pow2(15 - e).unsqueeze(1)).floor_().sum(1)
    part = torch.where(e_raw < TINY_EXP, torch.zeros_like(s), s * pow2(e - 15))
    n = next_pow2(nb)
    if n != nb:
        part = F.pad(part, (0, 0, 0, n - nb))
    while part.shape[0] > 1:
        part = part[0::2] + part[1::2]
    mean = part[0] / torch.full_like(part[0], float(rows))
    return torch.where(exponent(mean) < TINY_EXP, torch.zeros_like(mean), mean)


def channel_normalize(r: torch.Tensor, channel_scales: torch.Tensor) -> torch.Tensor:
    """``u = r / c`` per channel (``c`` the bf16 channel scales, ``cols``), with subnormal ``r``
    and ``u`` flushed to 0 and ``u = 0`` in channels whose scale is 0. One correctly rounded
    fp32 division per element (``div_rn`` in the kernels)."""
    c = channel_scales.float()
    pos = c > 0
    u = flush_subnormal(r) / torch.where(pos, c, torch.ones_like(c))
    return torch.where(pos, flush_subnormal(u), torch.zeros_like(u))


class GroupedLayout(NamedTuple):
    """Packed layout of a grouped-scale codec for a ``rows x cols`` matrix."""

    group: int  # effective group size Ge = min(G, ceil8(cols))
    ngroups: int  # ceil(cols / Ge)
    padded_cols: int  # Cp = ngroups * Ge
    row_bytes: int  # Cp * bits / 8
    scales_offset: int  # 16-byte-aligned start of the bf16 group scales
    channels_offset: int  # start of the bf16 channel scales (== nbytes when there are none)
    nbytes: int  # total data bytes


class GroupedCodec(Codec):
    """Base of the codecs that quantize each group of ``G`` channels of a token with one scale,
    after an optional normalisation of every channel by a per-channel scale.

    Channel scales (``channel_scale="mean"``, the default): attention K/V have channels ~10x
    larger than the rest, which would swamp the small channels of their group. The sender
    computes ``c_j = bf16(mean_i |r_ij|)`` over the tokens (``channel_mean_abs``: exact and
    order-independent, 0 below 2**-100), sends it, and quantizes ``u = r / c``
    (``channel_normalize``); the receiver multiplies back. ``channel_scale="none"`` is the
    previous scheme (``c = 1``, nothing sent). Costs ``2 * cols`` bytes per payload (0.8 % at
    1024 x 3072 for int2) and, in the kernels, one extra read of ``x`` and ``base``. Matrices
    with fewer than ``CHANNEL_MIN_ROWS`` (256) rows get no channel scales even with
    ``"mean"`` (``c = 1``, nothing sent; :meth:`sends_channel_scales`): there the bytes would
    cost more than they buy. Real models have thousands of tokens per rank; tiny test models
    stay below the threshold.

    Per group of ``u`` (``m = max |u|`` over its valid elements, ``E = floor(log2 m)``)::

        q_i      = floor(|u_i| * 2**(15 - E))          exact integers < 2**16
        mean_abs = (sum_i q_i * 2**(E - 15)) / n_valid  integer sum (exact, order-free), then
                                                        one correctly rounded fp32 division
        mean_abs = 0                                    if m < 2**-100

    so the scale is an order-independent function of the group that a kernel reproduces
    exactly. Subclasses turn ``mean_abs`` into a bf16 scale ``s`` and codes (``_quantize``)
    and back to levels ``level(c) * s`` (``_dequantize``); the reconstruction is
    ``(level(c) * s) * c_j``, exact in fp32 (a 2-bit integer times two bf16 values).

    Layout: codes, row-major, ``Cp * bits / 8`` bytes per row (``Cp`` = row padded with
    uncounted zeros to whole groups; padded codes are 0), element ``j`` at byte
    ``j * bits // 8``, bit ``(j * bits) % 8``, LSB first; then at the next 16-byte boundary the
    bf16 group scales, ``rows x ngroups``, immediately followed (``channel_scale="mean"`` and
    ``rows >= CHANNEL_MIN_ROWS``) by the ``cols`` bf16 channel scales.

    Header parameters: ``(group_size, CHANNEL_SCALES[channel_scale], 0, 0)``.
    """

    bits: ClassVar[int]

    def __init__(self, group_size: int = 256, channel_scale: str = "mean"):
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
        if not isinstance(channel_scale, str) or channel_scale not in CHANNEL_SCALES:
            raise ValueError(
                f"{self.name}: channel_scale must be one of {sorted(CHANNEL_SCALES)}, "
                f"got {channel_scale!r}"
            )
        self.group_size = group_size
        self.channel_scale = channel_scale

    @property
    def channel_scaled(self) -> bool:
        """Whether payloads carry per-channel scales."""
        return self.channel_scale != "none"

    def sends_channel_scales(self, rows: int) -> bool:
        """Whether a payload of a ``rows x cols`` matrix carries channel scales:
        ``channel_scale != "none"`` and ``rows >= CHANNEL_MIN_ROWS``."""
        return self.channel_scaled and rows >= CHANNEL_MIN_ROWS

    def header_params(self) -> tuple[int, int, int, int]:
        return (self.group_size, CHANNEL_SCALES[self.channel_scale], 0, 0)

    @classmethod
    def from_header_params(cls, params: tuple[int, ...]) -> GroupedCodec:
        """The codec whose ``header_params()`` are ``params``."""
        names = {v: k for k, v in CHANNEL_SCALES.items()}
        if params[1] not in names:
            raise ValueError(f"unknown channel_scale code {params[1]} in header parameters")
        return cls(group_size=params[0], channel_scale=names[params[1]])

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group_size": self.group_size,
            "channel_scale": self.channel_scale,
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(group_size={self.group_size}, "
            f"channel_scale={self.channel_scale!r})"
        )

    # --- layout ---------------------------------------------------------------------------------
    def layout(self, rows: int, cols: int) -> GroupedLayout:
        group = min(self.group_size, align_up(cols, 8))
        ngroups = ceil_div(cols, group)
        padded = ngroups * group
        row_bytes = padded * self.bits // 8
        scales_offset = align_up(rows * row_bytes)
        channels_offset = scales_offset + 2 * rows * ngroups
        nbytes = channels_offset + (2 * cols if self.sends_channel_scales(rows) else 0)
        return GroupedLayout(
            group, ngroups, padded, row_bytes, scales_offset, channels_offset, nbytes
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

    def channel_scales(self, r: torch.Tensor) -> torch.Tensor | None:
        """The bf16 channel scales (``cols``) this codec sends for the float32 ``rows x cols``
        matrix ``r``; None for ``channel_scale="none"`` or fewer than ``CHANNEL_MIN_ROWS`` rows."""
        if not self.sends_channel_scales(r.shape[0]):
            return None
        return channel_mean_abs(r).to(torch.bfloat16)

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

    def quantize_with(
        self, r: torch.Tensor, channel_scales: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize the float32 ``rows x cols`` matrix ``r`` with the given bf16 channel scales
        (``cols``; None: no channel normalisation). Returns ``(codes, scales, recon)``: float32
        integer codes ``rows x Cp`` (padding 0), bf16 group scales ``rows x ngroups`` and the
        float32 reconstruction ``rows x cols``. This is the whole codec but for where the
        channel scales come from (``_encode_rows`` computes them with ``channel_scales``), so
        experiments can try other sources of channel scales."""
        rows, cols = r.shape
        lay = self.layout(rows, cols)
        if channel_scales is not None:
            r = channel_normalize(r, channel_scales)
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
        if channel_scales is not None:
            recon = recon * channel_scales.float()
        return codes.reshape(rows, lay.padded_cols), scales, recon

    def _encode_rows(self, r: torch.Tensor, dtype: torch.dtype, state: Any):
        rows, cols = r.shape
        lay = self.layout(rows, cols)
        cscales = None
        if self.sends_channel_scales(rows):
            # inf and nan propagate into the channel sums; checked here so that the channel
            # scales themselves are finite (the group maxima below are checked as well)
            check_finite(r.abs().amax(0), self.name)
            cscales = self.channel_scales(r)
        codes, scales, recon = self.quantize_with(r, cscales)
        packed = pack_bits(codes, self.bits)
        parts = [packed, bf16_bits(scales)]
        offsets = [0, lay.scales_offset]
        if cscales is not None:
            parts.append(bf16_bits(cscales))
            offsets.append(lay.channels_offset)
        data = join_sections(parts, tuple(offsets), lay.nbytes, r.device)
        return data, recon

    def _decode_rows(self, data, rows, cols, dtype):
        lay = self.layout(rows, cols)
        packed, scales = split_sections(
            data, (0, lay.scales_offset), (rows * lay.row_bytes, 2 * rows * lay.ngroups)
        )
        codes = unpack_bits(packed.reshape(rows, lay.row_bytes), self.bits, lay.padded_cols)
        scales = scales.view(torch.bfloat16).reshape(rows, lay.ngroups)
        recon = self._dequantize(codes.reshape(rows, lay.ngroups, lay.group), scales)
        recon = recon.reshape(rows, lay.padded_cols)[:, :cols]
        if self.sends_channel_scales(rows):
            c = data[lay.channels_offset : lay.channels_offset + 2 * cols].view(torch.bfloat16)
            recon = recon * c.float()
        return recon
