"""Per-pipeline state shared by every framework adapter.

One :class:`PipelineState` is attached to each patched pipeline (``STATE_ATTR``). It holds the
residual compressor (the bases), the persistent gathered K/V buffers, the outstanding stale
gathers, the step counter and the per-step statistics. Nothing per pipeline lives anywhere
else.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collectives import check_consistent
from ..config import CompactConfig
from ..policy import codec_throughput_gbps
from ..residual import ResidualCompressor

STATE_ATTR = "_compactfusion_state"


@dataclass
class PipelineState:
    """Everything compactfusion keeps for one patched pipeline."""

    config: CompactConfig
    compressor: ResidualCompressor
    # Undo information (what the adapter changed).
    original_class: type | None = None
    hooks: list = field(default_factory=list)
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
    step_seconds: list[float] = field(default_factory=list)
    stale_bytes: int = 0
    # Bookkeeping of the step in progress.
    _step_start: float = 0.0
    _step_marks: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        from ..ops import register

        self.handle = register(self.compressor)

    def new_generation(self) -> None:
        """Forget bases, buffers and per-step statistics (outstanding gathers are waited for)."""
        self.compressor.reset()
        self.compressor.reset_stats()  # stats(pipe) describes the latest generation
        self.stale_bytes = 0
        self.step = 0
        self.branch = None
        self.layer, self.layer_exchanges = None, 0
        self.kv_buffers.clear()
        for entry in self.stale.values():
            work = entry.get("work")
            if work is not None:
                work.wait()
        self.stale.clear()
        self.generations += 1
        self.step_bytes.clear()
        self.step_raw_bytes.clear()
        self.step_seconds.clear()

    def ensure_checked(self) -> None:
        """Exchange a hash of config, payload layout and parallel layout over the whole world,
        once per patched pipeline: differently configured ranks fail together, never hang."""
        if self.checked:
            return
        codec = self.compressor.codec.describe()
        layout = f"ring={self.ring_world},ulysses={self.ulysses_world}"
        policy = ""
        if self.config.policy == "auto":  # decisions depend on the codec speed assumed
            policy = f"|{codec_throughput_gbps('cuda')},{codec_throughput_gbps('cpu')}"
        check_consistent(f"{self.config.fingerprint()}|{codec}|{layout}{policy}")
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
        self.step_seconds.append(time.perf_counter() - self._step_start)
        self.step += 1

    def stats(self) -> dict[str, Any]:
        st = self.compressor.stats()
        after = self.step_bytes[self.config.warmup_steps :]
        raw_after = self.step_raw_bytes[self.config.warmup_steps :]
        st.update(
            mode=self.config.mode,
            config=self.config.to_dict(),
            ring_world=self.ring_world,
            ulysses_world=self.ulysses_world,
            generations=self.generations,
            steps=self.step,
            bytes_per_step=list(self.step_bytes),
            raw_bytes_per_step=list(self.step_raw_bytes),
            seconds_per_step=list(self.step_seconds),
            ratio_after_warmup=(sum(raw_after) / sum(after)) if sum(after) else math.nan,
        )
        return st


def _sync_device() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
