"""Memory of the bases: how they are stored, counted, capped, and how big they get.

A *base* is the last reconstruction of an exchanged tensor, held by its sender and by every
receiver until the next step. In ring/all-gather modes every rank therefore holds the full K
and V of every attention layer, which for video models is tens of GB per rank. This module
keeps that memory bounded and visible:

* :class:`BaseStore` is the one place a :class:`~compactfusion.residual.ResidualCompressor`
  assigns a base through. It counts the bytes (``base_bytes`` / ``peak_base_bytes`` in
  ``stats()``), applies ``CompactConfig.max_base_bytes`` (admission per *logical site*, see
  below) and converts the base to ``CompactConfig.base_storage``.
* :class:`CompactBase` is a base stored in 8 bits (``"int8"`` or ``"fp8"``) with one
  power-of-two float32 scale per group of up to 256 values of a row. Sender and receiver
  round the same reconstruction with the same function, so their bases stay bit-identical,
  and the rounding is part of the next step's residual (error feedback corrects it).
* :func:`estimate` gives the per-rank base memory of a model in each mode (used by
  ``benchmarks/model.py`` for the README table), with the same per-site arithmetic as the
  admission decisions.

Logical sites and admission
---------------------------
The collectives name one residual site per block they move: ``(site, src)`` for an all-gather
or ring pass, ``(site, src, dst)`` for an all-to-all. All ranks of the group hold bases of the
same blocks of ``site`` (their own as sender, the peers' as receivers), so the budget must be
decided per ``site``, not per block: otherwise a rank could keep the base of a block its peer
dropped. A *footprint* function maps a block key to ``(logical site, blocks this rank keeps)``
(:func:`exchange_footprint` for the xDiT integration). When a logical site first needs a base
in a generation, it is admitted if its whole footprint fits next to the sites admitted before
it, else it is *refused*: all its blocks are then sent raw and no base is kept. Every rank
reaches the logical sites in the same order with the same shapes, so all ranks decide alike,
without communication; the same order each generation gives the same decisions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch

from .config import BASE_STORAGES

logger = logging.getLogger(__name__)

GROUP = 256  # values per scale in compact storage (when the row length is a multiple of it)
SCALE_BYTES = 4  # one float32 power of two per group
_QMAX = {"int8": 127.0, "fp8": 448.0}  # largest code magnitude (fp8: e4m3fn's max)
_CODE_DTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}

Footprint = Callable[[Hashable], tuple[Hashable, int]]


# --------------------------------------------------------------------------------------------
# Compact storage
# --------------------------------------------------------------------------------------------
def group_size(shape: tuple[int, ...]) -> int:
    """Values per scale for a tensor of ``shape``: 256 when the last dimension is a multiple
    of it (the ``2 * H * D`` channels of a real model's K/V matrix), else the whole last
    dimension (a row)."""
    cols = int(shape[-1]) if len(shape) else 1
    return GROUP if cols % GROUP == 0 else max(cols, 1)


def storage_nbytes(shape: tuple[int, ...], dtype: torch.dtype, storage: str = "full") -> int:
    """Bytes one base of ``shape`` and activation ``dtype`` takes in ``storage``."""
    numel = math.prod(int(s) for s in shape)
    if storage == "full":
        return numel * dtype.itemsize
    _check_storage(storage)
    return numel + SCALE_BYTES * (numel // group_size(shape))


@dataclass
class CompactBase:
    """A base rounded to 8-bit codes with power-of-two scales.

    ``codes`` (int8 or float8_e4m3fn, the base's shape) times ``scales`` (float32, one per
    group of :func:`group_size` consecutive values) is the base; :meth:`dequantize` forms it
    in the activation dtype ``dtype``. Scales are powers of two, so dividing by them and
    multiplying back is exact: the only rounding is to the 8-bit code, and the dequantized
    value (at most 8 significant bits times a power of two) is exact in bf16, fp16 and fp32.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype
    storage: str

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes, self.scales

    def dequantize(self) -> torch.Tensor:
        """The base in its activation dtype (a new tensor)."""
        g = group_size(tuple(self.shape))
        values = self.codes.reshape(-1, g).float() * self.scales.reshape(-1, 1)
        return values.to(self.dtype).reshape(self.shape)

    def equal(self, other: CompactBase) -> bool:
        """Bit-for-bit equality of codes and scales."""
        return (
            self.storage == other.storage
            and self.dtype == other.dtype
            and torch.equal(self.codes.view(torch.uint8), other.codes.view(torch.uint8))
            and torch.equal(self.scales, other.scales)
        )


def compact(t: torch.Tensor, storage: str) -> CompactBase:
    """Round ``t`` to ``storage`` (``"int8"`` or ``"fp8"``): per group, the smallest power of
    two ``s`` with ``max |t| <= qmax * s``, and codes ``t / s`` rounded to nearest (even).
    Deterministic, so two ranks holding the same ``t`` hold the same result."""
    _check_storage(storage)
    if storage == "full":
        raise ValueError('compact() needs storage "int8" or "fp8"')
    qmax = _QMAX[storage]
    g = group_size(tuple(t.shape))
    rows = t.detach().reshape(-1, g).float()
    amax = torch.linalg.vector_norm(rows, ord=math.inf, dim=1)
    # frexp: amax / qmax = m * 2**e with 0.5 <= m < 1, so 2**e >= amax / qmax.
    _, e = torch.frexp(amax / qmax)
    scales = torch.ldexp(torch.ones_like(amax), e)
    scaled = (rows / scales[:, None]).clamp_(-qmax, qmax)  # exact division by a power of two
    if storage == "int8":
        codes = scaled.round_().to(torch.int8)
    else:
        codes = scaled.to(torch.float8_e4m3fn)
    return CompactBase(codes.reshape(t.shape), scales, t.dtype, storage)


def _check_storage(storage: str) -> None:
    if storage not in BASE_STORAGES:
        raise ValueError(f"base_storage: must be one of {BASE_STORAGES}, got {storage!r}")


def stored_nbytes(stored: torch.Tensor | CompactBase | None) -> int:
    """Bytes a stored base occupies (a view counts only its own elements)."""
    if stored is None:
        return 0
    if isinstance(stored, CompactBase):
        return stored.nbytes
    return stored.numel() * stored.element_size()


def dequantized(stored: torch.Tensor | CompactBase | None) -> torch.Tensor | None:
    """The base as a tensor of its activation dtype (``stored`` itself when stored full)."""
    if isinstance(stored, CompactBase):
        return stored.dequantize()
    return stored


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# Accounting and admission
# --------------------------------------------------------------------------------------------
def per_block(key: Hashable) -> tuple[Hashable, int]:
    """The default footprint: every key is its own logical site of one block (right for one
    sender and one receiver; collectives need :func:`exchange_footprint`)."""
    return key, 1


def exchange_footprint(
    kv_world: int, a2a_world: int, mode: str = "ring", storage: str = "full"
) -> Footprint:
    """Footprint of the collectives' keys on one rank.

    ``(site, src)`` (all-gather, ring pass, stale gather over ``kv_world`` ranks): the rank's
    own block as sender plus ``kv_world - 1`` peers' blocks as receiver. In ``stale`` mode
    with full storage the receivers' bases live in a persistent gathered buffer that also
    holds the rank's own block: one block more. (In ``allgather`` mode the gathered K/V are a
    temporary of each call, separate from the bases.) ``(site, src, dst)``
    (all-to-all over ``a2a_world`` ranks): ``a2a_world - 1`` blocks sent and as many received.
    """
    gathered = mode == "stale" and storage == "full"
    kv_blocks = kv_world + (1 if gathered else 0)
    a2a_blocks = 2 * (a2a_world - 1)

    def footprint(key: Hashable) -> tuple[Hashable, int]:
        if isinstance(key, tuple) and len(key) == 2:
            return key[0], kv_blocks
        if isinstance(key, tuple) and len(key) == 3:
            return key[0], a2a_blocks
        return key, 1

    return footprint


@dataclass
class _Decision:
    admitted: bool
    nbytes: int  # the footprint the decision was made for


class BaseStore:
    """Every base of one compressor is assigned through :meth:`keep`: it decides whether the
    site keeps one (budget, never-compressed sites), converts it to the storage format and
    keeps the byte count.

    ``never_compressed(shape, dtype)`` says whether a block can never be sent compressed (a
    lossless codec, fewer than ``min_numel`` elements, the ``auto`` policy declining it): such
    blocks keep no base, since nothing would ever be computed against it.
    """

    def __init__(
        self,
        max_bytes: int | None = None,
        storage: str = "full",
        footprint: Footprint = per_block,
        never_compressed: Callable[[tuple[int, ...], torch.dtype], bool] | None = None,
    ):
        _check_storage(storage)
        self.max_bytes = max_bytes
        self.storage = storage
        self.footprint = footprint
        self.never_compressed = never_compressed
        self.base_bytes = 0  # held now
        self.peak_base_bytes = 0
        self._decisions: dict[Hashable, _Decision] = {}
        self._reserved = 0  # footprints of the admitted logical sites
        self._reported: set[str] = set()  # refused sites already logged
        self._warned_small = False

    # --- the one entry point ------------------------------------------------------------------
    def keep(self, key: Hashable, old, value: torch.Tensor | None, copy: bool = False):
        """What a site of ``key`` stores when its base becomes ``value`` (None: no base);
        ``copy``: ``value`` belongs to the caller, so a full-precision base is a copy of it."""
        stored = None if value is None else self._convert(key, old, value, copy)
        self.base_bytes += stored_nbytes(stored) - stored_nbytes(old)
        if self.base_bytes > self.peak_base_bytes:
            self.peak_base_bytes = self.base_bytes
        return stored

    def _convert(self, key, old, value: torch.Tensor, copy: bool):
        same_layout = (
            old is not None and tuple(old.shape) == tuple(value.shape) and old.dtype == value.dtype
        )
        if not same_layout and not self._admit(key, tuple(value.shape), value.dtype):
            return None
        if self.storage == "full":
            return value.clone() if copy else value
        return compact(value, self.storage)

    def _admit(self, key: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        if self.never_compressed is not None and self.never_compressed(shape, dtype):
            return False
        logical, blocks = self.footprint(key)
        need = blocks * storage_nbytes(shape, dtype, self.storage)
        d = self._decisions.get(logical)
        if d is not None and d.nbytes == need:
            return d.admitted
        if d is not None and d.admitted:  # the site changed shape: decide again
            self._reserved -= d.nbytes
        fits = self.max_bytes is None or self._reserved + need <= self.max_bytes
        self._decisions[logical] = _Decision(fits, need)
        if fits:
            self._reserved += need
        elif need > self.max_bytes and not self._warned_small:
            self._warned_small = True
            logger.warning(
                "compactfusion: max_base_bytes=%d is smaller than site %r (%d bytes of bases "
                "per rank): it is sent raw, as is every site that does not fit",
                self.max_bytes,
                logical,
                need,
            )
        return fits

    # --- queries --------------------------------------------------------------------------------
    def admitted(self, logical: Hashable) -> bool:
        """Whether the logical site keeps bases in this generation (False before its first
        use, when refused by the budget and when it is never compressed)."""
        d = self._decisions.get(logical)
        return d is not None and d.admitted

    def refused(self) -> list[Hashable]:
        """Logical sites the budget sends raw in this generation, in order of first use."""
        return [k for k, d in self._decisions.items() if not d.admitted]

    @property
    def reserved_bytes(self) -> int:
        """Sum of the admitted sites' footprints (what the budget is compared with)."""
        return self._reserved

    def report(self) -> None:
        """Log, once, the logical sites the budget sends raw (only those not logged before:
        decisions repeat every generation, the log line does not)."""
        new = [repr(k) for k in self.refused() if repr(k) not in self._reported]
        if not new:
            return
        self._reported.update(new)
        logger.info(
            "compactfusion: max_base_bytes=%d: %d site(s) sent raw to stay within the "
            "budget (%d bytes reserved): %s",
            self.max_bytes,
            len(new),
            self._reserved,
            ", ".join(new),
        )

    def reset(self) -> None:
        """Forget the admission decisions (a new generation decides again, in the same
        order); the caller drops the bases themselves."""
        self._decisions.clear()
        self._reserved = 0

    def reset_peak(self) -> None:
        self.peak_base_bytes = self.base_bytes


# --------------------------------------------------------------------------------------------
# Estimates for real models
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What decides a DiT's base memory: its attention layers and their token counts.

    ``tokens`` are the sequence tokens whose K/V the ranks exchange (text tokens that travel
    with them included); ``batch`` is the batch of one transformer call (2 when classifier-
    free guidance is batched, as CogVideoX does); ``branches`` is the number of transformer
    calls per step that keep their own bases (2 when the guidance branches run as separate
    calls under diffusers' ``cache_context``, as Wan does). ``a2a`` is the number of Ulysses
    all-to-alls per layer, each of one ``[tokens/N, hidden]`` tensor (q, k, v and the output:
    FLUX's combined q/k/v counts as three).
    """

    name: str
    label: str
    layers: int
    tokens: int
    hidden: int
    batch: int = 1
    branches: int = 1
    a2a: int = 4
    itemsize: int = 2  # bf16
    note: str = ""

    def local_tokens(self, n: int) -> int:
        return math.ceil(self.tokens / n)

    def kv_block_shape(self, n: int) -> tuple[int, int]:
        """One rank's K and V of one layer as the integration's codec matrix (token-major:
        one row per token, K and V of every head side by side)."""
        return (self.batch * self.local_tokens(n), 2 * self.hidden)

    def a2a_chunk_shape(self, n: int) -> tuple[int, int]:
        """One destination's chunk of one all-to-all tensor."""
        numel = self.batch * self.local_tokens(n) * self.hidden // n
        return (numel // 256, 256) if numel % 256 == 0 else (numel // self.hidden, self.hidden)


MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape(
            "flux1", "FLUX.1-dev 1024x1024", layers=57, tokens=4096 + 512, hidden=3072,
            note="19 double + 38 single blocks, 24 x 128; 64x64 latent tokens + 512 text "
            "tokens (split across ranks with the image)",
        ),
        ModelShape(
            "flux2", "FLUX.2-dev 1024x1024", layers=56, tokens=4096 + 512, hidden=6144,
            note="8 double + 48 single blocks, 48 x 128; 4096 image + 512 text tokens",
        ),
        ModelShape(
            "cogvideox5b", "CogVideoX-5b 49x480x720", layers=42, tokens=17550, hidden=3072,
            batch=2,
            note="42 blocks, 48 x 64; 13x30x45 latent tokens; CFG batched (batch 2); the 226 "
            "text tokens stay on every rank",
        ),
        ModelShape(
            "wan21_14b", "Wan2.1-14B 81x720x1280", layers=40, tokens=75600, hidden=5120,
            branches=2,
            note="40 blocks, 40 x 128; 21x45x80 latent tokens; CFG as two calls (cond, "
            "uncond), each with its own bases (one with CFG parallelism)",
        ),
        ModelShape(
            "hunyuanvideo", "HunyuanVideo 129x720x1280", layers=60, tokens=118800, hidden=3072,
            note="20 double + 40 single blocks, 24 x 128; 33x45x80 latent tokens; guidance "
            "distilled (one call per step); text tokens left out",
        ),
    )
}  # fmt: skip

MODES = ("allgather", "ring", "stale", "ulysses", "distrifusion")


@dataclass(frozen=True)
class Estimate:
    """Per-rank memory of one model, mode, rank count and storage format (bytes)."""

    base_bytes: int  # bases (what stats()["base_bytes"] reports)
    held_bytes: int  # everything kept between steps (bases + the buffers they live in)
    site_bytes: int  # footprint of one logical site (what the budget admits or refuses)
    sites: int  # logical sites per generation


def estimate(model: ModelShape, mode: str, n: int, storage: str = "full") -> Estimate:
    """Per-rank base memory of ``model`` on ``n`` ranks.

    ``allgather``/``ring``/``stale``: one K/V site per layer and branch; the rank keeps ``n``
    blocks of ``kv_block_shape(n)`` as bases, plus (``stale``, full storage) its own block in
    the persistent gathered buffer. ``ulysses``: ``a2a`` sites per layer and branch, each
    keeping ``2 (n - 1)`` chunks. ``distrifusion``: uncompressed stale K/V (codec ``raw`` in
    ``stale`` mode), no bases: the ``n`` blocks of the previous step's gather are held.
    Activation-sized temporaries of a step (the gathered K/V the attention reads, the
    payloads) are not included, nor the in-flight payloads of ``stale`` mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dtype = {2: torch.bfloat16, 4: torch.float32}[model.itemsize]
    calls = model.layers * model.branches
    if mode == "ulysses":
        footprint = exchange_footprint(n, n, "ulysses", storage)
        _, blocks = footprint(("site", 0, 1))
        site = blocks * storage_nbytes(model.a2a_chunk_shape(n), dtype, storage)
        sites = calls * model.a2a
        return Estimate(sites * site, sites * site, site, sites)
    block_full = storage_nbytes(model.kv_block_shape(n), dtype, "full")
    if mode == "distrifusion":
        return Estimate(0, calls * n * block_full, 0, calls)
    block = storage_nbytes(model.kv_block_shape(n), dtype, storage)
    _, blocks = exchange_footprint(n, n, mode, storage)(("site", 0))
    return Estimate(calls * n * block, calls * blocks * block, blocks * block, calls)


__all__ = [
    "BASE_STORAGES",
    "MODELS",
    "BaseStore",
    "CompactBase",
    "Estimate",
    "ModelShape",
    "compact",
    "dequantized",
    "estimate",
    "exchange_footprint",
    "storage_bytes",
    "storage_nbytes",
    "stored_nbytes",
]
