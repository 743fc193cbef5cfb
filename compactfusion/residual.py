"""Residual state: one shared base per call site, warm-up, error feedback and statistics.

Every activation that crosses a link is identified by a *site key* (any hashable, for
example ``(layer, "kv", src_rank)``). The sender and every receiver of a site hold the same
base. Per call::

    sender:    payload = encode(x - base);   base <- base + decode(payload)
    receiver:                                base <- base + decode(payload)

Because the base is the *reconstruction*, whatever a codec got wrong this step is part of the
next step's residual (error feedback), so quantization errors do not accumulate. The first
``warmup_steps`` calls of a site, calls with a new shape or dtype, sites smaller than
``min_numel`` and sites the policy declines are sent raw, which also sets the base exactly.

Every base is assigned through a :class:`~compactfusion.memory.BaseStore`, which counts its
bytes, applies ``max_base_bytes`` (a refused site keeps no base, so it is always sent raw) and
stores it in ``base_storage`` format (see ``compactfusion.memory``). Blocks that can never be
sent compressed (lossless codec, below ``min_numel``, declined by the ``auto`` policy) keep no
base either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .backend import resolve_backend
from .codecs import NonFiniteInput, PayloadError, decode_header, get_codec
from .codecs.base import check_fits
from .config import CompactConfig
from .memory import BaseStore, CompactBase, Footprint, dequantized, stored_nbytes
from .policy import worth_compressing

logger = logging.getLogger(__name__)

# Activations and bases beyond this magnitude (or not finite) are sent raw. With both within
# it, x - base cannot overflow float32; the fused kernels, which cannot raise, rely on that.
MAX_MAGNITUDE = 2.0**126


def _max_abs(t: torch.Tensor) -> torch.Tensor:
    """``max |t|`` as a 0-d tensor (nan when ``t`` holds nan), in one reduction."""
    return torch.linalg.vector_norm(t, ord=math.inf).float()


@dataclass
class SiteStats:
    """Counters for one call site (bytes are what the payloads weigh, headers included)."""

    role: str  # "send" or "recv"
    shape: tuple[int, ...] = ()
    dtype: str = ""
    calls: int = 0
    raw_bytes: int = 0  # the tensors' own size in their dtype
    payload_bytes: int = 0
    raw_sends: int = 0  # warm-up, shape change, too small, policy or non-finite
    kernel_fallbacks: int = 0  # the Triton kernels declined the input; torch path used
    nonfinite: int = 0  # sent raw: x, x - base or its reconstruction not finite or too large

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["ratio"] = self.raw_bytes / self.payload_bytes if self.payload_bytes else math.nan
        return d


class _Site:
    """One site's state. Assigning ``base`` goes through the compressor's ``BaseStore``: it
    may keep nothing (budget), a compact copy (``base_storage``) or the tensor itself, so
    ``site.base`` reads back what is stored; :meth:`full_base` is the tensor to compute with."""

    __slots__ = ("_base", "base_ok", "calls", "codec_state", "key", "stats", "store")

    def __init__(self, key: Hashable, stats: SiteStats, store: BaseStore):
        self.key, self.stats, self.store = key, stats, store
        self._base: torch.Tensor | CompactBase | None = None
        self.codec_state: Any = None
        self.calls = 0  # calls since the base was (re)started
        self.base_ok = True  # the base is finite and within +-MAX_MAGNITUDE (see encode)

    @property
    def base(self) -> torch.Tensor | CompactBase | None:
        return self._base

    @base.setter
    def base(self, value: torch.Tensor | None) -> None:
        self._base = self.store.keep(self.key, self._base, value)

    def keep_copy(self, x: torch.Tensor) -> None:
        """Make ``x`` the base, copied only if it is kept at full precision (``x`` belongs to
        the caller); refused and compact sites copy nothing."""
        self._base = self.store.keep(self.key, self._base, x, copy=True)

    def full_base(self) -> torch.Tensor | None:
        """The base as a tensor of the activation dtype (a new one when stored compact)."""
        return dequantized(self._base)


@dataclass
class ResidualCompressor:
    """Per-site residual compression state for one pipeline (or one collective).

    ``encode(key, x)`` runs on the sender and returns a payload; ``decode(key, payload)`` runs
    on each receiver and returns the reconstruction (its new base). Two compressors never
    share state; ``reset()`` forgets all bases (call it between generations).

    With ``error_feedback=False`` (an ablation) the sender keeps ``base <- x`` while receivers
    keep their reconstruction, so the two sides' bases drift apart by design.
    """

    config: CompactConfig = field(default_factory=CompactConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.config, CompactConfig):
            raise TypeError(f"config must be a CompactConfig, got {type(self.config).__name__}")
        self.codec = self.config.make_codec()
        self._raw = get_codec("raw")
        self._sites: dict[Hashable, _Site] = {}
        self._warned: set[str] = set()
        self.store = BaseStore(
            self.config.max_base_bytes,
            self.config.base_storage,
            never_compressed=self.never_compresses,
        )

    def set_footprint(self, footprint: Footprint) -> None:
        """How block keys group into logical sites for ``max_base_bytes`` (see
        ``compactfusion.memory``): ``footprint(key) -> (logical site, blocks kept per rank)``.
        The default treats every key as its own site of one block; collectives need
        ``memory.exchange_footprint``. Set it before the first call."""
        self.store.footprint = footprint

    # --- decisions --------------------------------------------------------------------------
    def will_compress(self, key: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether the next ``encode(key, x)`` of this shape/dtype sends a compressed payload
        (assuming finite input). Deterministic, so every rank can agree on payload sizes."""
        cfg = self.config
        if self.codec.lossless:
            return False
        site = self._sites.get(key)
        if site is None or site.base is None or tuple(site.base.shape) != tuple(shape):
            return False
        if site.base.dtype != dtype or site.calls < cfg.warmup_steps:
            return False
        numel = math.prod(shape)
        if numel < cfg.min_numel:
            return False
        if cfg.site_policy is not None and not cfg.site_policy(key, site.calls):
            return False
        if cfg.policy == "auto":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
            return worth_compressing(
                self.codec, shape, dtype, cfg.link_bandwidth_gbps(), device_type
            )
        return True

    def never_compresses(self, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
        """Whether a block of this shape and dtype is always sent raw whatever its history
        (lossless codec, below ``min_numel``, declined by the ``auto`` policy): it needs no
        base."""
        cfg = self.config
        if self.codec.lossless or math.prod(shape) < cfg.min_numel:
            return True
        if cfg.policy == "auto":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
            return not worth_compressing(
                self.codec, shape, dtype, cfg.link_bandwidth_gbps(), device_type
            )
        return False

    def payload_nbytes(self, key: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Size of the next payload ``encode(key, x)`` returns for finite ``x``."""
        if self.will_compress(key, shape, dtype):
            return self.codec.payload_nbytes(shape, dtype)
        return self._raw.payload_nbytes(shape, dtype)

    def raw_payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return self._raw.payload_nbytes(shape, dtype)

    def received_nbytes(self, buffer: torch.Tensor, header: bytes | None = None) -> int:
        """Size of the payload at the start of ``buffer`` (which may be padded), from its
        header: lets a receiver slice payloads without knowing the sender's decision."""
        codec_id, dtype, shape, _, _ = decode_header(buffer, header)
        codec = self._raw if codec_id == self._raw.codec_id else self.codec
        return codec.payload_nbytes(shape, dtype)

    # --- sender -------------------------------------------------------------------------------
    def encode(self, key: Hashable, x: torch.Tensor, force_raw: bool = False) -> torch.Tensor:
        """Encode the activation ``x`` of site ``key``; updates the sender's base."""
        site = self._site(key, "send", x)
        compress = not force_raw and self.will_compress(key, tuple(x.shape), x.dtype)
        payload = None
        if compress and site.base_ok:
            try:
                payload, new_base = self._encode_compressed(site, x)
            except NonFiniteInput:  # x - base or the new base would not be finite
                pass
        if compress and payload is None:
            # Send raw instead of storing NaN/Inf in a base.
            site.stats.nonfinite += 1
            self._warn_once(
                "nonfinite", f"non-finite (or out-of-range) residual at site {key!r}: sent raw"
            )
        if payload is None:
            payload = self._raw.encode(x)
            site.keep_copy(x.detach())
            site.calls += 1
            site.base_ok = bool(_max_abs(x) <= MAX_MAGNITUDE)
            site.stats.raw_sends += 1
        else:
            site.base = new_base
            site.calls += 1
        self._count(site, x, payload)
        return payload

    def _encode_compressed(self, site: _Site, x: torch.Tensor):
        cfg, codec = self.config, self.codec
        if not cfg.residual:  # naive ablation: compress x itself
            payload, recon = codec.encode_with_reconstruction(x, site.codec_state)
            check_fits(recon, x.dtype, codec.name)
            return payload, recon.to(x.dtype).reshape(x.shape)
        if site.codec_state is None:
            site.codec_state = codec.new_state()
        payload, new_base = self._encode_residual(site, x)
        if not cfg.error_feedback:  # ablation: sender keeps the exact activation
            new_base = x.detach().clone()
        return payload, new_base

    def _encode_residual(self, site: _Site, x: torch.Tensor):
        base = site.full_base()
        if resolve_backend(self.config.backend, x.device) == "triton":
            from . import kernels

            try:
                payload, new_base = kernels.encode_residual(self.codec, x, base, site.codec_state)
            except kernels.KernelUnsupported as exc:
                site.stats.kernel_fallbacks += 1
                self._warn_once(f"kernel:{exc}", f"Triton kernels declined ({exc}); using torch")
            else:
                # A kernel cannot raise: check its input and result here, with one device
                # synchronisation. Both within MAX_MAGNITUDE (nan fails) keeps every later
                # x - base finite; a scale that overflowed shows as inf or nan in new_base.
                biggest = torch.maximum(_max_abs(x), _max_abs(new_base))
                if not bool(biggest <= MAX_MAGNITUDE):
                    raise NonFiniteInput(
                        f"{self.codec.name}: input or reconstruction not finite or beyond "
                        f"{MAX_MAGNITUDE:g}"
                    )
                return payload, new_base
        return self.codec.encode_residual(x, base, site.codec_state)

    # --- receiver -----------------------------------------------------------------------------
    def decode(
        self,
        key: Hashable,
        payload: torch.Tensor,
        out: torch.Tensor | None = None,
        header: bytes | None = None,
    ) -> torch.Tensor:
        """Decode a payload of site ``key``; returns the receiver's new base.

        With ``out`` the reconstruction is written there (for example a slice of a gathered
        K/V buffer) and ``out`` becomes the site's base, so the caller must leave it untouched
        until the next call of this site. ``header`` optionally holds a host copy of the
        payload's first bytes (see ``decode_header``).
        """
        codec_id, dtype, shape, _, hdr = decode_header(payload, header)
        site = self._sites.get(key)
        if site is None:
            site = self._sites[key] = _Site(key, SiteStats("recv"), self.store)
        if codec_id == self._raw.codec_id:
            nbytes = math.prod(shape) * dtype.itemsize
            if payload.numel() != self._raw.payload_nbytes(shape, dtype):
                raise PayloadError(f"site {key!r}: raw payload of the wrong size")
            value = payload[hdr : hdr + nbytes].view(dtype).reshape(shape).clone()
            if out is not None:
                out.copy_(value.reshape(out.shape))
                value = out
            restarted = site.base is None or (
                tuple(site.base.shape) != tuple(shape) or site.base.dtype != dtype
            )
            site.base = value  # kept as stored by the BaseStore; ``value`` is returned
            site.calls = 1 if restarted else site.calls + 1
            site.stats.raw_sends += 1
        elif codec_id != self.codec.codec_id:
            raise PayloadError(
                f"site {key!r}: payload of codec id {codec_id} but this compressor uses "
                f"{self.codec.name!r} (id {self.codec.codec_id}); configs differ across ranks"
            )
        else:
            if site.base is None and self.config.residual:
                raise PayloadError(f"site {key!r}: compressed payload arrived before any base")
            value = self._decode_compressed(site, payload, shape, dtype, out)
            site.base = value
            site.calls += 1
        site.stats.shape, site.stats.dtype = tuple(shape), str(dtype).replace("torch.", "")
        site.stats.calls += 1
        site.stats.raw_bytes += math.prod(shape) * dtype.itemsize
        site.stats.payload_bytes += payload.numel()
        return value

    def _decode_compressed(self, site, payload, shape, dtype, out):
        if not self.config.residual:
            value = self.codec.decode(payload)
            if out is None:
                return value
            return out.copy_(value.reshape(out.shape))
        base = site.full_base()
        if tuple(base.shape) != tuple(shape) or base.dtype != dtype:
            raise PayloadError(
                f"payload shape {tuple(shape)} {dtype} does not match the base "
                f"{tuple(base.shape)} {base.dtype}; configs or call order differ across ranks"
            )
        if resolve_backend(self.config.backend, payload.device) == "triton":
            from . import kernels

            try:
                return kernels.decode_residual(self.codec, payload, base, out)
            except kernels.KernelUnsupported as exc:
                site.stats.kernel_fallbacks += 1
                self._warn_once(f"kernel:{exc}", f"Triton kernels declined ({exc}); using torch")
        return self.codec.decode_residual(payload, base, out)

    # --- bookkeeping --------------------------------------------------------------------------
    def base(self, key: Hashable) -> torch.Tensor | None:
        """The current base of a site as a tensor of the activation dtype (dequantized when
        stored compact); None before its first call and for sites that keep no base."""
        site = self._sites.get(key)
        return None if site is None else site.full_base()

    def stored_base(self, key: Hashable) -> torch.Tensor | CompactBase | None:
        """The base of a site as it is stored (a ``CompactBase`` with compact storage)."""
        site = self._sites.get(key)
        return None if site is None else site.base

    def stored_bases(self) -> dict[Hashable, torch.Tensor | CompactBase]:
        """Every base held now, by site key."""
        return {k: s.base for k, s in self._sites.items() if s.base is not None}

    def reset(self) -> None:
        """Forget all bases, codec states and budget decisions (keeps the statistics)."""
        for site in self._sites.values():
            site.base, site.codec_state, site.calls = None, None, 0
        self.store.reset()

    def reset_stats(self) -> None:
        """Zero all counters (bases are kept; the peak restarts from the bytes held now)."""
        for site in self._sites.values():
            site.stats = SiteStats(site.stats.role)
        self.store.reset_peak()

    def sent_bytes(self) -> tuple[int, int]:
        """``(payload bytes, raw bytes)`` this compressor has sent (cheap: no per-site dict)."""
        sent = [s.stats for s in self._sites.values() if s.stats.role == "send"]
        return sum(s.payload_bytes for s in sent), sum(s.raw_bytes for s in sent)

    def stats(self) -> dict[str, Any]:
        """Plain-dict statistics: per site and totals (bytes, ratio, calls, raw sends)."""
        sites = {
            repr(k): {**s.stats.as_dict(), "base_bytes": stored_nbytes(s.base)}
            for k, s in self._sites.items()
        }
        total = SiteStats("all")
        for s in self._sites.values():
            for name in ("calls", "raw_bytes", "payload_bytes", "raw_sends"):
                setattr(total, name, getattr(total, name) + getattr(s.stats, name))
            total.kernel_fallbacks += s.stats.kernel_fallbacks
            total.nonfinite += s.stats.nonfinite
        out = total.as_dict()
        del out["role"], out["shape"], out["dtype"]
        out["sent_payload_bytes"], out["sent_raw_bytes"] = self.sent_bytes()
        out["codec"] = self.codec.describe()
        out.update(self.memory_stats())
        out["sites"] = sites
        return out

    def memory_stats(self) -> dict[str, Any]:
        """Base memory of this compressor (see ``compactfusion.memory``): ``base_bytes`` held
        now, ``peak_base_bytes`` since the statistics were reset, the storage format, the
        budget, the bytes it has reserved and the logical sites it sends raw."""
        store = self.store
        return {
            "base_bytes": store.base_bytes,
            "peak_base_bytes": store.peak_base_bytes,
            "base_storage": store.storage,
            "max_base_bytes": store.max_bytes,
            "reserved_base_bytes": store.reserved_bytes,
            "raw_by_budget": [repr(k) for k in store.refused()],
        }

    def _site(self, key: Hashable, role: str, x: torch.Tensor) -> _Site:
        site = self._sites.get(key)
        if site is None:
            site = self._sites[key] = _Site(key, SiteStats(role), self.store)
        if site.base is not None and (
            tuple(site.base.shape) != tuple(x.shape) or site.base.dtype != x.dtype
        ):
            site.base, site.codec_state, site.calls = None, None, 0  # restart with a raw send
        return site

    def _count(self, site: _Site, x: torch.Tensor, payload: torch.Tensor) -> None:
        st = site.stats
        st.shape, st.dtype = tuple(x.shape), str(x.dtype).replace("torch.", "")
        st.calls += 1
        st.raw_bytes += x.numel() * x.element_size()
        st.payload_bytes += payload.numel()

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            logger.warning("compactfusion: %s", message)
