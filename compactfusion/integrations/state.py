"""Per-pipeline state shared by every framework adapter.

One :class:`PipelineState` is attached to each patched pipeline (``STATE_ATTR``). It holds the
residual compressor (the bases), the persistent gathered K/V buffers, the outstanding stale
gathers, the step counter and the per-step statistics. Nothing per pipeline lives anywhere
else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..backend import requested_backend
from ..collectives import check_consistent
from ..config import CompactConfig
from ..memory import CompactBase, exchange_footprint, storage_bytes
from ..policy import codec_throughput_gbps
from ..residual import ResidualCompressor

STATE_ATTR = "_compactfusion_state"


@dataclass
class PipelineState:
    """Everything compactfusion keeps for one patched pipeline."""

    config: CompactConfig
    compressor: ResidualCompressor | None = None  # None: a new one for ``config``
    # Undo information (what the adapter changed).
    original_class: type | None = None
    hooks: list = field(default_factory=list)
    # The adapter's context manager that installs this pipeline's own replacements of the
    # framework's functions while one of its generations runs (compiled graphs specialise
    # to them; see xdit's ``_Bound``); None when the adapter has none.
    bind: Callable[[], AbstractContextManager] | None = None
    # Parallel layout, read once at patch time.
    ring_world: int = 1
    ulysses_world: int = 1
    # Per-generation state.
    step: int = 0  # transformer calls in this generation
    branch: str | None = None  # diffusers cache_context name ("cond"/"uncond") while entered
    layer: str | None = None  # the attention module running now (set by tracking's hooks)
    layer_exchanges: int = 0  # Ulysses exchanges so far in the running layer
    kv_buffers: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    stale: dict[str, dict[str, Any]] = field(default_factory=dict)
    checked: bool = False  # config hash exchanged with the other ranks
    handle: str = ""  # the compressor's name for compactfusion.ops (set in __post_init__)
    # Statistics.
    generations: int = 0
    step_bytes: list[int] = field(default_factory=list)  # payload bytes sent per step
    step_raw_bytes: list[int] = field(default_factory=list)
    step_branches: list[str | None] = field(default_factory=list)  # branch of each call
    step_seconds: list[float] = field(default_factory=list)
    stale_bytes: int = 0
    # Bookkeeping of the step in progress.
    _step_start: float = 0.0
    _step_marks: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.compressor is None:
            self.compressor = ResidualCompressor(self.config)
        # K/V sites travel over the ring group, all-to-alls over the Ulysses group: that is
        # how many blocks of each logical site this rank keeps (for max_base_bytes).
        self.compressor.set_footprint(
            exchange_footprint(
                self.ring_world, self.ulysses_world, self.config.mode, self.config.base_storage
            )
        )
        from ..ops import register

        self.handle = register(self.compressor)

    def pipeline_states(self) -> list[PipelineState]:
        """The states behind this patched object: itself (an xfuser runner model's state
        lists its pipelines' states)."""
        return [self]

    def retains_gathered(self, site: Hashable) -> bool:
        """Whether the gathered K/V buffer of ``site`` must persist to the next step: only
        when peers' bases live in it (full storage, site admitted). Refused, compact or
        never-compressed sites keep no buffer, so their memory is released after the call."""
        return self.config.base_storage == "full" and self.compressor.store.admitted(site)

    def new_generation(self) -> None:
        """Forget bases, buffers and per-step statistics (outstanding gathers are waited for).
        Raises ``ConcurrentUseError`` (changing nothing) while another thread holds the
        compressor, e.g. runs a generation of this pipeline."""
        with self.compressor.held():
            self._new_generation()

    def _new_generation(self) -> None:
        from .strategies import wait_stale

        self.compressor.reset()
        self.compressor.reset_stats()  # stats(pipe) describes the latest generation
        self.stale_bytes = 0
        self.step = 0
        self.branch = None
        self.layer, self.layer_exchanges = None, 0
        self.kv_buffers.clear()
        for entry in self.stale.values():
            wait_stale(self, entry)
        self.stale.clear()
        self.generations += 1
        self.step_bytes.clear()
        self.step_raw_bytes.clear()
        self.step_branches.clear()
        self.step_seconds.clear()

    def ensure_checked(self) -> None:
        """Exchange a hash of config, payload layout, parallel layout and the backend asked for
        (``COMPACTFUSION_BACKEND`` included) over the whole world, once per patched pipeline:
        differently configured ranks fail together, never hang."""
        if self.checked:
            return
        codec = self.compressor.codec.as_dict()
        backend = requested_backend(self.config.backend)  # raises for a bad environment value
        layout = f"ring={self.ring_world},ulysses={self.ulysses_world},backend={backend}"
        policy = ""
        if self.config.policy == "auto":  # decisions depend on the codec speed assumed
            policy = f"|{codec_throughput_gbps('cuda')},{codec_throughput_gbps('cpu')}"
        check_consistent(
            f"{self.config.fingerprint()}|{codec}|{layout}{policy}",
            timeout_s=self.config.timeout_s,
        )
        self.checked = True

    # Step accounting: bytes this rank sent (compressed payloads + stale raw gathers).
    def _sent(self) -> tuple[int, int]:
        payload, raw = self.compressor.sent_bytes()
        return payload + self.stale_bytes, raw + self.stale_bytes

    def begin_step(self) -> None:
        self._step_marks = self._sent()
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        """The step's one host read: the compressed exchanges' flags (see
        ``ResidualCompressor.end_step``), which also waits for the step's GPU work, so the
        step is timed and not only its launches (a plain synchronisation when nothing was
        exchanged)."""
        if not self.compressor.end_step():
            _sync_device()
        sent, raw = self._sent()
        self.step_bytes.append(sent - self._step_marks[0])
        self.step_raw_bytes.append(raw - self._step_marks[1])
        self.step_branches.append(self.branch)
        self.step_seconds.append(time.perf_counter() - self._step_start)
        self.step += 1
        self.compressor.store.report()  # logs sites newly sent raw by max_base_bytes, once

    def _after_warmup(self) -> tuple[list[int], list[int]]:
        """Bytes and raw bytes of the calls after each branch's warm-up calls (with guidance
        as two calls per step, the first ``warmup_steps`` calls of *each* branch are raw)."""
        seen: dict[str | None, int] = {}
        after, raw_after = [], []
        for sent, raw, branch in zip(
            self.step_bytes, self.step_raw_bytes, self.step_branches, strict=True
        ):
            seen[branch] = seen.get(branch, 0) + 1
            if seen[branch] > self.config.warmup_steps:
                after.append(sent)
                raw_after.append(raw)
        return after, raw_after

    def stats(self) -> dict[str, Any]:
        st = self.compressor.stats()
        after, raw_after = self._after_warmup()
        st.update(
            mode=self.config.mode,
            config=self.config.as_dict(),
            ring_world=self.ring_world,
            ulysses_world=self.ulysses_world,
            generations=self.generations,
            steps=self.step,
            bytes_per_step=list(self.step_bytes),
            raw_bytes_per_step=list(self.step_raw_bytes),
            seconds_per_step=list(self.step_seconds),
            ratio_after_warmup=(sum(raw_after) / sum(after)) if sum(after) else math.nan,
            held_bytes=self.held_bytes(),
        )
        return st

    def held_tensors(self) -> list[torch.Tensor]:
        """Every tensor compactfusion keeps between steps: the bases, the gathered K/V
        buffers and the stale mode's in-flight gathers (payloads or full K/V)."""
        tensors: list[torch.Tensor] = []
        for stored in self.compressor.stored_bases().values():
            tensors.extend(stored.tensors() if isinstance(stored, CompactBase) else [stored])
        tensors.extend(self.kv_buffers.values())
        for entry in self.stale.values():
            if "buffer" in entry:
                tensors.append(entry["buffer"])
            payloads = getattr(entry.get("work"), "payloads", None)
            if payloads is not None:
                tensors.append(payloads)
        return tensors

    def held_bytes(self) -> int:
        """Bytes of the distinct storages behind :meth:`held_tensors` (a gathered buffer
        counts once, with the rank's own block in it; codec states are not included)."""
        return storage_bytes(self.held_tensors())


def _sync_device() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
