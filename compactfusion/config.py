"""``CompactConfig``: every knob of compactfusion in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .codecs import available_codecs, get_codec
from .timeouts import validate_timeout

MODES = ("allgather", "ring", "stale")
BASE_STORAGES = ("full", "int8", "fp8")  # compactfusion.memory implements them
POLICIES = ("always", "auto")
BACKENDS = ("auto", "torch", "triton")
LINK_HINTS: dict[str, float] = {
    # Effective per-direction bandwidth in GB/s used by the ``auto`` policy.
    "nvlink": 450.0,  # NVLink 4 (H100 SXM), ~450 GB/s per direction
    "pcie": 25.0,  # PCIe Gen4 x16 as measured in practice
    "pcie5": 50.0,  # PCIe Gen5 x16 in practice
    "ethernet": 1.25,  # 10 GbE
}

SitePolicy = Callable[[Hashable, int], bool]


class FrozenParams(Mapping):
    """A read-only, hashable copy of ``codec_params`` (a frozen config must stay as it was
    validated: a dict mutated later would change the fingerprint behind the ranks' backs)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any]):
        object.__setattr__(self, "_items", dict(items))

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            "codec_params is read-only; use CompactConfig.replace(codec_params=...)"
        )

    def __hash__(self) -> int:
        return hash(json.dumps(self._items, sort_keys=True, default=repr))

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self):
        return (FrozenParams, (self._items,))


def callable_fingerprint(fn: Callable[..., Any]) -> str:
    """A description of ``fn`` that differs when its code, constants, defaults or captured
    values differ (two ranks passing different ``site_policy`` functions of the same name
    must not pass the cross-rank check)."""
    parts = [getattr(fn, "__module__", ""), getattr(fn, "__qualname__", type(fn).__name__)]
    code = getattr(fn, "__code__", None)
    if code is None:  # a callable object: its class and state
        parts.append(repr(sorted(vars(fn).items())) if hasattr(fn, "__dict__") else repr(fn))
        code = getattr(type(fn).__call__, "__code__", None)
    if code is not None:
        parts += [code.co_code.hex(), repr(code.co_consts), repr(code.co_names)]
    parts.append(repr(getattr(fn, "__defaults__", None)))
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            parts.append(repr(cell.cell_contents))
        except ValueError:  # an empty cell
            parts.append("<empty>")
    # Object addresses differ between processes: they must not make equal policies differ.
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", "|".join(parts))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CompactConfig:
    """How compactfusion compresses the activations that ranks exchange.

    Attributes:
        codec: codec name: ``"raw"``, ``"fp8"``, ``"int2"``, ``"int1"``, ``"nm_sparse"`` or
            ``"lowrank"``. ``"raw"`` sends everything uncompressed (the baseline).
        codec_params: parameters for the codec, e.g. ``{"group_size": 128}`` for ``int2``,
            ``{"n": 2, "m": 8}`` for ``nm_sparse``, ``{"rank": 8}`` for ``lowrank``.
        warmup_steps: number of first calls of every call site that are sent raw (the base is
            then the exact activation). At least 1 is recommended: the first residual against
            a zero base is the whole activation.
        residual: compress ``x - base`` (True) or ``x`` itself (False, the naive ablation).
        error_feedback: the base is the receiver's reconstruction (True). False keeps
            ``base <- x`` on the sender: sender and receiver bases then drift apart, so this
            is only an ablation for measuring what error feedback buys.
        min_numel: call sites whose tensor has fewer elements are sent raw.
        site_policy: optional ``f(site_key, call_index) -> bool``; False sends that call raw
            (per-layer or per-step overrides). ``call_index`` counts the site's calls since
            its base (re)started, i.e. the denoising step for a per-layer site in a patched
            pipeline. Must give the same answer on every rank.
        mode: ring attention / patch parallel strategy of the xDiT integration:
            ``"allgather"`` (compressed patch parallel), ``"ring"`` (compressed ring
            attention with overlapped point-to-point relays) or ``"stale"`` (DistriFusion:
            the previous step's K/V of the other ranks, gathered asynchronously; full
            precision with codec ``raw``, compressed residuals otherwise).
        compress_ulysses: also compress Ulysses all-to-all traffic (q, k, v and output).
        policy: ``"always"`` compresses every eligible site; ``"auto"`` skips compression
            when, for the given ``link``, the codec would cost more than the transfer saves.
        link: link hint for ``policy="auto"``: ``"nvlink"``, ``"pcie"``, ``"pcie5"``,
            ``"ethernet"`` or a bandwidth in GB/s.
        backend: ``"auto"`` (Triton kernels for CUDA tensors, torch otherwise), ``"torch"``
            or ``"triton"``. The environment variable ``COMPACTFUSION_BACKEND`` overrides it.
        max_base_bytes: per-rank cap on the memory the bases hold (None: no cap). Logical
            sites (one attention layer's K/V exchange, one Ulysses all-to-all) are admitted in
            order of first use while their whole footprint on this rank fits; the others are
            sent raw and keep no base. Decided identically on every rank, again each
            generation (same order, same result); the raw sites are logged once and listed
            in ``stats()["raw_by_budget"]``. See ``compactfusion.memory``.
        base_storage: how bases are stored: ``"full"`` (the activation's dtype, exact),
            ``"int8"`` or ``"fp8"`` (8-bit codes, one power-of-two scale per 256 values:
            about half of bf16). Sender and receivers round the reconstruction identically,
            so bases stay bit-identical and the rounding is corrected at the next step; the
            attention reads the reconstruction before rounding.
        verify: after each generation, compare every receiver's bases with their senders'
            (``compactfusion.verify_bases``: one checksum exchange over all ranks) and raise
            ``BaseDivergenceError`` on every rank if any differ. Needs
            ``error_feedback=True`` (without it bases differ by design).
        timeout_s: the longest compactfusion waits for one of its own collectives (compressed
            all-gather / all-to-all, ring relay transfers, the cross-rank configuration check,
            ``verify_bases``; on GPUs the step's status read) before raising
            ``CollectiveTimeout`` naming the exchange. None (default): the process group's own
            timeout (torch's default is 30 minutes for gloo, 10 for NCCL). Need not match
            across ranks. See ``compactfusion.timeouts`` and the README section "Timeouts".
        checksum: append a 16-byte checksum of every payload, verified by each receiver on
            the device; a corrupt payload raises ``PayloadError`` on the receiving rank at the
            step's status read (``end_step``; in the ``ring`` and ``stale`` modes at once).
            Off by default (it costs a pass over each payload on both sides). Needs a lossy
            codec: with ``"raw"`` plain collectives run and there is no payload to check.
    """

    codec: str = "int2"
    codec_params: Mapping[str, Any] = field(default_factory=dict)
    warmup_steps: int = 1
    residual: bool = True
    error_feedback: bool = True
    min_numel: int = 1024
    site_policy: SitePolicy | None = None
    mode: str = "allgather"
    compress_ulysses: bool = True
    policy: str = "always"
    link: str | float | None = None
    backend: str = "auto"
    max_base_bytes: int | None = None
    base_storage: str = "full"
    verify: bool = False
    timeout_s: float | None = None
    checksum: bool = False

    def __post_init__(self) -> None:
        if self.codec not in available_codecs():
            raise ValueError(
                f"codec: unknown codec {self.codec!r}; choose one of {available_codecs()}"
            )
        if not isinstance(self.codec_params, Mapping):
            raise ValueError("codec_params: must be a mapping of parameter names to values")
        object.__setattr__(self, "codec_params", FrozenParams(self.codec_params))
        self.make_codec()  # validates codec_params (raises ValueError naming the parameter)
        for name in ("warmup_steps", "min_numel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be a non-negative integer, got {value!r}")
        for name in ("residual", "error_feedback", "compress_ulysses", "verify", "checksum"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be a bool, got {getattr(self, name)!r}")
        if self.site_policy is not None and not callable(self.site_policy):
            raise ValueError("site_policy: must be callable (site_key, call_index) -> bool")
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {self.mode!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: must be one of {POLICIES}, got {self.policy!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {BACKENDS}, got {self.backend!r}")
        if self.policy == "auto" and self.link is None:
            raise ValueError('link: policy="auto" needs a link hint (e.g. "pcie" or 25.0 GB/s)')
        if self.link is not None:
            self.link_bandwidth_gbps()  # validates
        if self.max_base_bytes is not None and (
            isinstance(self.max_base_bytes, bool)
            or not isinstance(self.max_base_bytes, int)
            or self.max_base_bytes <= 0
        ):
            raise ValueError(
                f"max_base_bytes: must be a positive integer (bytes per rank) or None, got "
                f"{self.max_base_bytes!r}"
            )
        if self.base_storage not in BASE_STORAGES:
            raise ValueError(
                f"base_storage: must be one of {BASE_STORAGES}, got {self.base_storage!r}"
            )
        if self.verify and not self.error_feedback:
            raise ValueError(
                "verify: needs error_feedback=True (without error feedback the sender keeps "
                "the exact activation, so its bases differ from the receivers' by design)"
            )
        object.__setattr__(self, "timeout_s", validate_timeout(self.timeout_s))
        if self.checksum and self.codec == "raw":
            raise ValueError(
                'checksum: codec "raw" runs the plain collectives (no payloads, nothing to '
                "check); use a lossy codec or checksum=False"
            )
        if not self.residual and not self.error_feedback:
            raise ValueError(
                "error_feedback: must stay True when residual=False (there is no base to "
                "feed the error back into)"
            )

    # --- derived --------------------------------------------------------------------------
    def make_codec(self):
        """A fresh codec instance for this config."""
        try:
            return get_codec(self.codec, **self.codec_params)
        except ValueError as exc:
            raise ValueError(f"codec_params: {exc}") from None

    def link_bandwidth_gbps(self) -> float | None:
        """The link hint as a bandwidth in GB/s (None when no hint is given)."""
        if self.link is None:
            return None
        if isinstance(self.link, str):
            if self.link not in LINK_HINTS:
                raise ValueError(
                    f"link: unknown hint {self.link!r}; use one of {sorted(LINK_HINTS)} "
                    "or a bandwidth in GB/s"
                )
            return LINK_HINTS[self.link]
        if isinstance(self.link, bool) or not isinstance(self.link, (int, float)):
            raise ValueError(f"link: must be a hint name or a number of GB/s, got {self.link!r}")
        if not math.isfinite(self.link) or self.link <= 0:
            raise ValueError(f"link: bandwidth must be positive and finite, got {self.link}")
        return float(self.link)

    def replace(self, **changes: Any) -> CompactConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (``site_policy`` shown by its qualified name and a hash of its code,
        constants and captured values)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["codec_params"] = dict(sorted(self.codec_params.items()))
        policy = self.site_policy
        if policy is not None:
            name = getattr(policy, "__qualname__", type(policy).__name__)
            d["site_policy"] = f"{name}#{callable_fingerprint(policy)}"
        return d

    def to_dict(self) -> dict[str, Any]:
        """Deprecated name of :meth:`as_dict` (removed in the next release)."""
        warnings.warn(
            "CompactConfig.to_dict() is deprecated, use CompactConfig.as_dict()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.as_dict()

    def fingerprint(self) -> str:
        """A short hash of everything that must match across ranks (``timeout_s`` need not:
        each rank bounds its own waits)."""
        d = self.as_dict()
        del d["timeout_s"]
        text = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    # --- presets ----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CompactConfig:
        """The preset named after a codec (``"int1"``, ``"int2"``, ``"fp8"``, ``"lowrank"``,
        ``"nm_sparse"``, ``"raw"``): that codec with its default parameters. Keyword overrides
        change fields of it. The old names ``"sparse"`` and ``"off"`` still work and raise a
        ``DeprecationWarning`` naming the new one."""
        name = preset_name(name, stacklevel=2)
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# One preset per codec, named after it: the codec with its default parameters. int1/int2:
# per-channel scales times per-token scales of groups of 256 channels ({"channel_scale":
# "none"} in codec_params selects group scales only); lowrank: rank 16, int8 factors, 2
# subspace iterations (96x on a 1024x3072 bf16 FLUX shard); nm_sparse: 1 of every 4 values.
PRESETS: dict[str, dict[str, Any]] = {
    "int1": {"codec": "int1"},
    "int2": {"codec": "int2"},
    "fp8": {"codec": "fp8"},
    "lowrank": {"codec": "lowrank"},
    "nm_sparse": {"codec": "nm_sparse"},
    "raw": {"codec": "raw"},
}

# Old preset names, accepted (with a DeprecationWarning) for one release.
DEPRECATED_PRESETS: dict[str, str] = {"sparse": "nm_sparse", "off": "raw"}


def preset_name(name: str, stacklevel: int = 2) -> str:
    """``name``, or the new name of a deprecated preset alias (``"sparse"`` -> ``"nm_sparse"``,
    ``"off"`` -> ``"raw"``) after a ``DeprecationWarning`` naming it. ``stacklevel`` is that of
    ``warnings.warn`` as if the function calling this one had called it (2: its caller)."""
    new = DEPRECATED_PRESETS.get(name) if isinstance(name, str) else None
    if new is None:
        return name
    warnings.warn(
        f"preset {name!r} is deprecated, use {new!r} (presets are named after their codec); "
        f"{name!r} will be removed in the next release",
        DeprecationWarning,
        stacklevel=stacklevel + 1,
    )
    return new
