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

Two ways to use it:

* ``encode`` / ``decode``: one self-describing payload at a time. Non-finite or out-of-range
  values are found with a host read and sent raw (the payload is then larger).
* ``send`` / ``receive`` / ``end_step``: the path of the compressed collectives, with no host
  read per call. Sites exchanged together form a *group* (one collective) that is compressed
  or raw as a whole, so every rank knows every payload's size and layout from state they
  share, and receivers never read headers back. Problems become device-side status flags:
  a sender whose values are not finite still sends a payload of the agreed size, marked
  ``FLAG_NOT_FINITE`` in its header; every holder of those sites keeps the previous bases
  (nothing non-finite is stored), while the receivers' outputs show the (non-finite) decoded
  values, as the uncompressed exchange would have. ``end_step`` (once per denoising step)
  reads every group's flags with one device-to-host copy, counts and logs the event, and
  restarts the affected groups with raw payloads on every rank.

With ``CompactConfig(checksum=True)`` every payload carries a 16-byte checksum trailer (see
``compactfusion.checksum``): ``send`` appends it, ``receive`` verifies it on the device and
flags a mismatch (``CORRUPT``), which ``end_step`` raises as :class:`PayloadError` on the
receiving rank; ``encode`` / ``decode`` append and verify it too (``decode`` with a host read).

Thread safety: a compressor belongs to one thread at a time. The first call that uses its state
(``encode``, ``decode``, ``exchange_compressed``, ``send``, ``receive``, ``count_plain``,
``end_step``, ``restart``, ``reset``) claims it for the calling thread, which keeps it until it
calls :meth:`ResidualCompressor.release`, leaves a :meth:`ResidualCompressor.held` block (as a
patched pipeline does at the end of each generation) or exits. A call from any other thread in the
meantime raises :class:`ConcurrentUseError` and changes nothing: two threads interleaving calls
would let sender and receiver bases diverge silently. The check is one comparison per call
(skipped while torch.compile traces; the compressed exchanges run inside custom ops, which it
does not trace).

Observers (:meth:`ResidualCompressor.add_observer`) see each site's transfers as they happen:
the sender's exact activation and each receiver's reconstruction (benchmarks measure fidelity
with them; see ``benchmarks/quality.py``).

Every base is assigned through a :class:`~compactfusion.memory.BaseStore`, which counts its
bytes, applies ``max_base_bytes`` (a refused site keeps no base, so it is always sent raw) and
stores it in ``base_storage`` format (see ``compactfusion.memory``). Blocks that can never be
sent compressed (lossless codec, below ``min_numel``, declined by the ``auto`` policy) keep no
base either.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from .backend import resolve_backend
from .checksum import CHECKSUM_NBYTES, checksum_mismatch, with_checksum
from .codecs import NonFiniteInput, PayloadError, decode_header, get_codec
from .codecs.base import (
    FLAG_NOT_FINITE,
    FLAG_OUT_OF_RANGE,
    FLAGS_OFFSET,
    aligned_payload,
    check_fits,
    deferred_checks,
    header_mismatch,
    payload_flags,
    require_finite,
)
from .config import CompactConfig
from .memory import BaseStore, CompactBase, Footprint, dequantized, stored_nbytes
from .policy import worth_compressing
from .timeouts import wait_device

logger = logging.getLogger(__name__)

# Activations and bases beyond this magnitude (or not finite) are sent raw. With both within
# it, x - base cannot overflow float32; the fused kernels, which cannot raise, rely on that.
MAX_MAGNITUDE = 2.0**126

# Status bits of an exchange group, OR-ed on the device and read by ``end_step``. The first two
# travel in the payload headers, so every rank of a collective ends up with the same bits.
NOT_FINITE = FLAG_NOT_FINITE  # a sender's values were not finite: that payload is undefined
OUT_OF_RANGE = FLAG_OUT_OF_RANGE  # a raw base is not finite or beyond MAX_MAGNITUDE
HEADER_MISMATCH = 4  # a received header differs from the layout the ranks agreed on
OWN_NOT_FINITE = 8  # this rank's own values were not finite (statistics and warning only)
CORRUPT = 16  # a received payload failed its checksum (CompactConfig.checksum)


class ConcurrentUseError(RuntimeError):
    """A :class:`ResidualCompressor` (or the pipeline it belongs to) was used from a thread
    other than the one holding it; see "Thread safety" in ``compactfusion.residual``."""


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


@dataclass(frozen=True)
class SiteTransfer:
    """One transfer of one site, as an observer sees it (see
    :meth:`ResidualCompressor.add_observer`)."""

    key: Hashable  # the site key
    role: str  # "send" (this rank sent it) or "recv" (this rank received it)
    # send: the activation exactly as given to the compressor; recv: what this receiver
    # reconstructed (the decoded tensor, or the plain tensor received). Not to be modified.
    value: torch.Tensor
    compressed: bool  # a compressed payload (False: raw payload or plain transfer)


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
class _Group:
    """Sites exchanged together by one collective: compressed or raw as a whole."""

    device: torch.device
    slot: int  # index in the compressor's flag vector for ``device``
    keys: set = field(default_factory=set)
    raw_next: bool = False  # a base is out of range: exchange raw until it is not
    process_group: str = ""  # name of the process group it runs over (for verify_bases)


@dataclass
class ResidualCompressor:
    """Per-site residual compression state for one pipeline (or one collective).

    ``encode(key, x)`` runs on the sender and returns a payload; ``decode(key, payload)`` runs
    on each receiver and returns the reconstruction (its new base). Two compressors never
    share state; ``reset()`` forgets all bases (call it between generations).

    With ``error_feedback=False`` (an ablation) the sender keeps ``base <- x`` while receivers
    keep their reconstruction, so the two sides' bases drift apart by design.

    Not thread-safe, and misuse is detected: one thread holds it at a time (the first to use
    it, until :meth:`release`); a call from another thread raises :class:`ConcurrentUseError`.
    """

    config: CompactConfig = field(default_factory=CompactConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.config, CompactConfig):
            raise TypeError(f"config must be a CompactConfig, got {type(self.config).__name__}")
        self.codec = self.config.make_codec()
        self._raw = get_codec("raw")
        self._sites: dict[Hashable, _Site] = {}
        self._warned: set[str] = set()
        self._groups: dict[Hashable, _Group] = {}
        self._flags: dict[torch.device, torch.Tensor] = {}  # uint8 status per group slot
        self._slots: dict[torch.device, list[Hashable]] = {}
        # OrderedDict: RemovableHandle holds it weakly (a plain dict cannot be).
        self._observers: OrderedDict[int, Callable[[SiteTransfer], None]] = OrderedDict()
        self.store = BaseStore(
            self.config.max_base_bytes,
            self.config.base_storage,
            never_compressed=self.never_compresses,
        )
        self._trailer = CHECKSUM_NBYTES if self.config.checksum else 0
        self._owner: threading.Thread | None = None  # the holding thread
        self._owner_lock = threading.Lock()  # taken only to claim a free compressor

    # --- thread ownership ---------------------------------------------------------------------
    def _claim(self) -> bool:
        """Hold the compressor for the calling thread: True if it was free and is held now,
        False if this thread already held it; :class:`ConcurrentUseError` if another does."""
        if torch.compiler.is_compiling():  # traced code runs later, in the caller's thread
            return False
        me = threading.current_thread()
        if self._owner is me:
            return False
        with self._owner_lock:
            owner = self._owner
            if owner is None or not owner.is_alive():  # free, or its holder has exited
                self._owner = me
                return True
        raise ConcurrentUseError(
            f"this ResidualCompressor is held by thread {owner.name!r}, and thread "
            f"{me.name!r} tried to use it: one compressor (one patched pipeline) must not be "
            "used from two threads at once; interleaved calls would let sender and receiver "
            "bases diverge silently. Serialize the calls (one generation at a time), give each "
            "thread its own pipeline, or hand the compressor over with release()"
        )

    def release(self) -> None:
        """Let another thread use the compressor next (the calling thread gives it up; a
        no-op when no thread holds it). Raises :class:`ConcurrentUseError` when another
        thread holds it. A compressor whose holder has exited is free again anyway."""
        owner = self._owner
        if owner is not None and owner is not threading.current_thread() and owner.is_alive():
            self._claim()  # raises, naming both threads
        self._owner = None

    @contextlib.contextmanager
    def held(self) -> Iterator[ResidualCompressor]:
        """Hold the compressor for the calling thread for the block (released at its end
        unless the thread held it before); :class:`ConcurrentUseError` if another thread
        holds it."""
        claimed = self._claim()
        try:
            yield self
        finally:
            if claimed:
                self._owner = None

    def set_footprint(self, footprint: Footprint) -> None:
        """How block keys group into logical sites for ``max_base_bytes`` (see
        ``compactfusion.memory``): ``footprint(key) -> (logical site, blocks kept per rank)``.
        The default treats every key as its own site of one block; collectives need
        ``memory.exchange_footprint``. Set it before the first call."""
        self.store.footprint = footprint

    def add_observer(self, fn: Callable[[SiteTransfer], None]) -> RemovableHandle:
        """Call ``fn(transfer)`` after every transfer of a site through this compressor: each
        ``encode``/``send`` (``role="send"``, the exact activation) and each
        ``decode``/``receive`` (``role="recv"``, the reconstruction), compressed or raw, and
        each plain transfer counted by :meth:`count_plain`; see :class:`SiteTransfer`. It is
        called after the site's base was updated, so :meth:`base` shows the new base. Returns
        a handle whose ``remove()`` unregisters ``fn`` (also a context manager). Observers run
        in registration order; an exception from one propagates to the caller.

        Cost: none beyond one test of an empty dict per call while no observer is registered.

        Under ``torch.compile`` observers are never traced. The compressed all-gather and
        all-to-all run as ``torch.library`` custom ops whose bodies dynamo does not trace
        into, so observers run eagerly inside them, without a graph break; the ``ring`` and
        ``stale`` strategies, which dynamo does trace into, call observers through
        ``torch.compiler.disable`` (one graph break per call, only while an observer is
        registered). An observer may therefore read values to the host or run collectives of
        its own (every rank calls its observers for the same sites in the same order); what
        it does is its own cost, and it must not modify the tensors it is given.
        """
        if not callable(fn):
            raise TypeError(f"observer must be callable, got {type(fn).__name__}")
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = fn
        return handle

    @torch.compiler.disable
    def _notify(self, key: Hashable, role: str, value: torch.Tensor, compressed: bool) -> None:
        transfer = SiteTransfer(key, role, value, compressed)
        for fn in list(self._observers.values()):
            fn(transfer)

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
        """Size of the next payload ``encode(key, x)`` returns for finite ``x`` (checksum
        trailer included)."""
        if self.will_compress(key, shape, dtype):
            return self.codec.payload_nbytes(shape, dtype) + self._trailer
        return self.raw_payload_nbytes(shape, dtype)

    def raw_payload_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Size of a raw payload (checksum trailer included)."""
        return self._raw.payload_nbytes(shape, dtype) + self._trailer

    # --- sender -------------------------------------------------------------------------------
    def encode(self, key: Hashable, x: torch.Tensor, force_raw: bool = False) -> torch.Tensor:
        """Encode the activation ``x`` of site ``key``; updates the sender's base. With
        ``checksum`` the payload ends with its checksum trailer."""
        self._claim()
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
        compressed = payload is not None
        if payload is None:
            payload = self._raw.encode(x)
            site.keep_copy(x.detach())
            site.calls += 1
            site.base_ok = bool(_max_abs(x) <= MAX_MAGNITUDE)
            site.stats.raw_sends += 1
        else:
            site.base = new_base
            site.calls += 1
        if self._trailer:
            payload = with_checksum(payload)
        self._count(site, tuple(x.shape), x.dtype, payload.numel())
        if self._observers:
            self._notify(key, "send", x, compressed)
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
                require_finite(
                    biggest <= MAX_MAGNITUDE,
                    f"{self.codec.name}: input or reconstruction not finite or beyond "
                    f"{MAX_MAGNITUDE:g}",
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
        payload's first bytes (see ``decode_header``). With ``checksum`` the payload's
        trailer is verified first (one host read) and a mismatch raises ``PayloadError``.

        The header is validated before anything is stored: a payload that is not a contiguous
        1-D ``uint8`` tensor, of another codec, with other codec parameters or of the wrong
        size raises :class:`PayloadError` (a misaligned one is copied first, see
        ``codecs.base.aligned_payload``). ``out`` must have the payload's shape, dtype and
        device (``ValueError``).
        """
        self._claim()
        payload = aligned_payload(payload)
        wire_nbytes = payload.numel()
        if self._trailer:
            payload = self._verified(key, payload)
        codec_id, dtype, shape, params, hdr = decode_header(payload, header)
        codec = self._raw if codec_id == self._raw.codec_id else self.codec
        if codec_id != codec.codec_id:
            raise PayloadError(
                f"site {key!r}: payload of codec id {codec_id} but this compressor uses "
                f"{self.codec.name!r} (id {self.codec.codec_id}); configs differ across ranks"
            )
        if params != codec.header_params():
            raise PayloadError(
                f"site {key!r}: {codec.name} payload with header parameters {params}, but this "
                f"compressor's are {codec.header_params()}; configs differ across ranks"
            )
        if payload.numel() != codec.payload_nbytes(shape, dtype):
            raise PayloadError(
                f"site {key!r}: {codec.name} payload for {shape} {dtype} must be "
                f"{codec.payload_nbytes(shape, dtype)} bytes, got {payload.numel()}"
            )
        if out is not None:
            _check_out(key, out, shape, dtype, payload.device)
        site = self._site_of(key, "recv")
        if codec is self._raw:
            nbytes = math.prod(shape) * dtype.itemsize
            value = payload[hdr : hdr + nbytes].view(dtype).reshape(shape).clone()
            if out is not None:
                out.copy_(value)
                value = out
            restarted = site.base is None or (
                tuple(site.base.shape) != tuple(shape) or site.base.dtype != dtype
            )
            site.base = value  # kept as stored by the BaseStore; ``value`` is returned
            site.calls = 1 if restarted else site.calls + 1
            site.stats.raw_sends += 1
        else:
            if site.base is None and self.config.residual:
                raise PayloadError(f"site {key!r}: compressed payload arrived before any base")
            # the header was validated above: no second read of it
            value = self._decode_compressed(site, payload, shape, dtype, out)
            site.base = value
            site.calls += 1
        self._count(site, tuple(shape), dtype, wire_nbytes)
        if self._observers:
            self._notify(key, "recv", value, codec_id != self._raw.codec_id)
        return value

    def _verified(self, key: Hashable, payload: torch.Tensor) -> torch.Tensor:
        """The body of a payload whose checksum trailer matches; ``PayloadError`` otherwise."""
        if payload.numel() <= CHECKSUM_NBYTES:  # a 1-D uint8 tensor (aligned_payload)
            raise PayloadError(
                f"site {key!r}: a payload with a checksum must be a 1-D uint8 tensor of more "
                f"than {CHECKSUM_NBYTES} bytes"
            )
        body, bad = checksum_mismatch(payload)
        if bool(bad):
            raise PayloadError(
                f"site {key!r}: the payload's checksum does not match its data (corrupted in "
                "transit, or the sender does not use checksum=True)"
            )
        return body

    def _decode_compressed(self, site, payload, shape, dtype, out):
        """Decode a compressed payload whose header the caller has validated (``decode``) or
        built from the agreed layout (``receive``): it is not read back here."""
        if not self.config.residual:
            value = self.codec.decode_known(payload, shape, dtype)
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
        return self.codec.decode_residual(payload, base, out, check_header=False)

    # --- exchanges without host reads (the compressed collectives) ----------------------------
    def exchange_compressed(
        self,
        group: Hashable,
        keys: list[Hashable],
        shape: tuple[int, ...],
        dtype: torch.dtype,
    ) -> bool:
        """Whether the next exchange of ``group`` (this rank's sites ``keys`` of it, sent and
        received, all of ``shape``/``dtype``) uses compressed payloads. Every rank of the
        collective gets the same answer from state they share (calls, shapes, flags)."""
        self._claim()
        g = self._groups.get(group)
        if g is not None and g.raw_next:
            return False
        return all(self.will_compress(k, shape, dtype) for k in keys)

    def exchange_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype, compressed: bool) -> int:
        """Size of every payload of an exchange decided by :meth:`exchange_compressed`
        (checksum trailer included)."""
        codec = self.codec if compressed else self._raw
        return codec.payload_nbytes(shape, dtype) + self._trailer

    def send(
        self, group: Hashable, items: list[tuple[Hashable, torch.Tensor]], compressed: bool
    ) -> list[torch.Tensor]:
        """Sender side of an exchange: encode each ``(key, x)`` (compressed or raw, as
        :meth:`exchange_compressed` decided) and update its base, without a host read.

        The status of all items (not finite, or a raw value out of range) is OR-ed and written
        into every payload's flags byte, so each receiver learns about any of them; when a
        value was not finite, every compressed base of ``items`` keeps its previous value,
        exactly as the receivers' do. With ``checksum`` each payload ends with its checksum
        trailer (computed after the flags are written)."""
        self._claim()
        device = items[0][1].device
        payloads, updates, status = [], [], None
        for key, x in items:
            site = self._site(key, "send", x)
            self._join(group, key, device)
            if compressed:
                with deferred_checks() as checks:
                    payload, new_base = self._encode_compressed(site, x)
                item_status = checks.failed(device).to(torch.uint8) * NOT_FINITE
                updates.append((site, new_base))
            else:
                payload = self._raw.encode(x)
                item_status = (~(_max_abs(x) <= MAX_MAGNITUDE)).to(torch.uint8) * OUT_OF_RANGE
                _store_value(site, x)
                site.stats.raw_sends += 1
            site.calls += 1
            status = item_status if status is None else status | item_status
            payloads.append(payload)
            self._count(site, tuple(x.shape), x.dtype, payload.numel() + self._trailer)
        for payload in payloads:
            payload[FLAGS_OFFSET : FLAGS_OFFSET + 1].copy_(status.reshape(1))
        if self._trailer:
            payloads = [with_checksum(p) for p in payloads]
        if updates:
            failed = (status & NOT_FINITE) != 0
            for site, new_base in updates:
                _keep_unless(site, failed, new_base.reshape(site.base.shape))
        own = (status & NOT_FINITE) * (OWN_NOT_FINITE // NOT_FINITE)
        self._record(group, status | own)
        if self._observers:
            for key, x in items:
                self._notify(key, "send", x, compressed)
        return payloads

    def receive(
        self,
        group: Hashable,
        key: Hashable,
        payload: torch.Tensor,
        out: torch.Tensor,
        compressed: bool,
    ) -> None:
        """Receiver side of an exchange: decode ``payload`` (of the layout
        :meth:`exchange_compressed` decided, for a tensor shaped like ``out``) into ``out`` and
        update the site's base, without a host read. A payload flagged not finite is decoded
        into ``out`` as it is (its non-finite values stay visible) but leaves the base alone.
        With ``checksum`` a payload whose trailer does not match is decoded as well, leaves a
        compressed base alone and makes ``end_step`` raise ``PayloadError``."""
        self._claim()
        shape, dtype, device = tuple(out.shape), out.dtype, out.device
        site = self._site_of(key, "recv")
        self._join(group, key, device)
        wire_nbytes = payload.numel()
        corrupt = None
        if self._trailer:
            payload, corrupt = checksum_mismatch(payload)
        codec = self.codec if compressed else self._raw
        mismatch = header_mismatch(payload, codec.device_header(shape, dtype, device))
        flags = payload_flags(payload)
        status = flags | mismatch.to(torch.uint8) * HEADER_MISMATCH
        if corrupt is not None:
            mismatch = mismatch | corrupt  # keep the base, as for a header mismatch
            status = status | corrupt.to(torch.uint8) * CORRUPT
        if compressed:
            base = site.base  # as stored (a tensor, or a CompactBase with base_storage)
            if base is None or tuple(base.shape) != shape or base.dtype != dtype:
                raise PayloadError(
                    f"site {key!r}: a compressed exchange of {shape} {dtype} but the base is "
                    f"{None if base is None else (tuple(base.shape), base.dtype)}; configs or "
                    "call order differ across ranks"
                )
            self._decode_compressed(site, payload, shape, dtype, out)
            keep = ((flags & NOT_FINITE) != 0) | mismatch
            _keep_unless(site, keep, out)
            site.calls += 1
        else:
            data = self._raw.payload_data(payload, shape, dtype)
            out.copy_(data.view(dtype).reshape(shape))
            restarted = site.base is None or (
                tuple(site.base.shape) != shape or site.base.dtype != dtype
            )
            _store_value(site, out)
            site.calls = 1 if restarted else site.calls + 1
            site.stats.raw_sends += 1
        self._record(group, status)
        self._count(site, shape, dtype, wire_nbytes)
        if self._observers:
            self._notify(key, "recv", out, compressed)

    def count_plain(self, key: Hashable, role: str, x: torch.Tensor) -> None:
        """Count a plain (uncompressed, headerless) transfer at site ``key`` in the statistics:
        ``x`` is the tensor sent (``role="send"``) or received (``"recv"``); no base is kept.
        The collectives send this way when the codec is lossless (``raw``): there is nothing
        to compress against."""
        self._claim()
        site = self._site_of(key, role)
        site.stats.raw_sends += 1
        self._count(site, tuple(x.shape), x.dtype, x.numel() * x.element_size())
        if self._observers:
            self._notify(key, role, x, False)

    def end_step(self) -> bool:
        """Apply the status flags of this step's exchanges: one device-to-host read per device
        that had exchanges (none otherwise; returns whether it read). Call it once per
        denoising step on every rank.

        Groups that carried non-finite values restart with raw payloads (on every rank: the
        flags travelled in the payloads), groups whose raw bases are out of range stay raw
        until they are not, and a header that differed from the agreed layout or a payload
        that failed its checksum raises :class:`PayloadError`. With ``timeout_s`` the read
        waits for a GPU's work at most that long (``CollectiveTimeout``)."""
        self._claim()
        for device, vec in self._flags.items():
            wait_device(device, "step's compressed exchanges (end_step)", self.config.timeout_s)
            values = vec.tolist()  # the step's one host read
            vec.zero_()
            for group, value in zip(self._slots[device], values, strict=True):
                if value:
                    self._apply_status(group, value)
                else:
                    self._groups[group].raw_next = False
        return bool(self._flags)

    def _apply_status(self, group: Hashable, value: int) -> None:
        g = self._groups[group]
        if value & CORRUPT:
            raise PayloadError(
                f"exchange {group!r}: a received payload failed its checksum (corrupted in "
                "transit); this step's output on this rank may be wrong"
            )
        if value & HEADER_MISMATCH:
            raise PayloadError(
                f"exchange {group!r}: a received payload header differs from the layout the "
                "ranks agreed on; configs or call order differ across ranks"
            )
        if value & OWN_NOT_FINITE:
            for key in g.keys:
                site = self._sites[key]
                if site.stats.role == "send":
                    site.stats.nonfinite += 1
            self._warn_once(
                "nonfinite",
                f"non-finite (or out-of-range) values in exchange {group!r}: bases kept, "
                "the exchange restarts raw",
            )
        if value & NOT_FINITE:
            for key in g.keys:
                site = self._sites[key]
                site.base, site.codec_state, site.calls = None, None, 0
        g.raw_next = bool(value & OUT_OF_RANGE)

    def _join(self, group: Hashable, key: Hashable, device: torch.device) -> None:
        g = self._groups.get(group)
        if g is None:
            slots = self._slots.setdefault(device, [])
            g = self._groups[group] = _Group(device, len(slots))
            slots.append(group)
            old = self._flags.get(device)
            vec = torch.zeros(len(slots), dtype=torch.uint8, device=device)
            if old is not None:
                vec[: old.numel()] = old
            self._flags[device] = vec
        elif g.device != device:
            raise ValueError(f"exchange {group!r} moved from {g.device} to {device}")
        g.keys.add(key)

    def _record(self, group: Hashable, status: torch.Tensor) -> None:
        g = self._groups[group]
        self._flags[g.device][g.slot : g.slot + 1].bitwise_or_(status.reshape(1))

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
        """Forget all bases, codec states, budget decisions and pending exchange flags (keeps
        the statistics)."""
        self._claim()
        for site in self._sites.values():
            site.base, site.codec_state, site.calls = None, None, 0
        self.store.reset()
        for vec in self._flags.values():
            vec.zero_()
        for g in self._groups.values():
            g.raw_next = False

    def base_items(self) -> list[tuple[Hashable, torch.Tensor]]:
        """``(key, base)`` of every site that holds a base (for cross-rank checks)."""
        return [(k, s.full_base()) for k, s in self._sites.items() if s.base is not None]

    def restart(self, keys: list[Hashable]) -> None:
        """Forget the bases (and codec states) of ``keys``: their next call is sent raw. Every
        holder of a site must restart it together."""
        self._claim()
        for key in keys:
            site = self._sites.get(key)
            if site is not None:
                site.base, site.codec_state, site.calls = None, None, 0

    def set_process_group(self, group: Hashable, name: str) -> None:
        """Record which process group exchange ``group`` runs over (a name the same on all
        its ranks): sites of equal keys in different process groups are different sites."""
        g = self._groups.get(group)
        if g is not None:
            g.process_group = name

    def process_group_of(self, key: Hashable) -> str:
        """The process group name recorded for the exchange that ``key`` belongs to ("" if
        none was recorded, e.g. sites used only through ``encode``/``decode``)."""
        for g in self._groups.values():
            if key in g.keys:
                return g.process_group
        return ""

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
        out["codec"] = self.codec.as_dict()
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

    def _site_of(self, key: Hashable, role: str) -> _Site:
        """The site of ``key``, created (with ``role`` for its statistics) on first use."""
        site = self._sites.get(key)
        if site is None:
            site = self._sites[key] = _Site(key, SiteStats(role), self.store)
        return site

    def _site(self, key: Hashable, role: str, x: torch.Tensor) -> _Site:
        site = self._site_of(key, role)
        if site.base is not None and (
            tuple(site.base.shape) != tuple(x.shape) or site.base.dtype != x.dtype
        ):
            site.base, site.codec_state, site.calls = None, None, 0  # restart with a raw send
        return site

    def _count(
        self, site: _Site, shape: tuple[int, ...], dtype: torch.dtype, payload_nbytes: int
    ) -> None:
        """One call of ``site``: a ``shape``/``dtype`` tensor carried in ``payload_nbytes``."""
        st = site.stats
        st.shape, st.dtype = shape, str(dtype).replace("torch.", "")
        st.calls += 1
        st.raw_bytes += math.prod(shape) * dtype.itemsize
        st.payload_bytes += payload_nbytes

    def _warn_once(self, tag: str, message: str) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            logger.warning("compactfusion: %s", message)


def _check_out(
    key: Hashable,
    out: Any,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """``out`` of :meth:`ResidualCompressor.decode` must be a tensor of the payload's shape,
    dtype and device: it becomes the site's base (``TypeError`` for a non-tensor,
    ``ValueError`` otherwise, as the codecs' own ``out`` checks)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"site {key!r}: out must be a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"site {key!r}: out must hold the payload's {tuple(shape)} {dtype} on {device} "
            f"(it becomes the base), got {tuple(out.shape)} {out.dtype} on {out.device}"
        )


def _store_value(site: _Site, value: torch.Tensor) -> None:
    """Make ``value`` (the caller's tensor) the site's base: copied into the stored tensor when
    it has the same layout (the base keeps its storage, as CUDA graphs need), else stored
    through the ``BaseStore`` (which may refuse it or round it to compact storage)."""
    base = site.base
    if (
        isinstance(base, torch.Tensor)
        and base.shape == value.shape
        and base.dtype == value.dtype
        and base.device == value.device
    ):
        base.copy_(value)
    else:
        site.keep_copy(value.detach())


def _keep_unless(site: _Site, keep: torch.Tensor, new_base: torch.Tensor) -> None:
    """``base <- base if keep else new_base`` with the device-side flag ``keep`` (no host
    read): in place for a full-precision base, through the ``BaseStore`` for a compact one
    (both sides round the same value, so bases stay bit-identical)."""
    base = site.base
    if isinstance(base, torch.Tensor):
        torch.where(keep, base, new_base, out=base)
    else:
        site.base = torch.where(keep, site.full_base(), new_base)
