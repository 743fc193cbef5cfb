"""Synthetic K/V-like trajectories for codec fidelity tests and benchmarks.

Attention K/V of diffusion transformers are not i.i.d.: a few channels are ~10x larger than
the rest (outlier or "massive" channels), a few tokens are larger (attention sinks), rare
entries spike, and from one denoising step to the next the tensor drifts by a few percent,
partly along a slowly turning low-rank subspace and partly as dense noise. This module makes
such trajectories, seeded and deterministic, and measures a codec along one.

Model (``N`` tokens x ``C`` channels, step ``t = 0 .. steps-1``)::

    X_t = dtype( (tok[:, None] * Z_t * chan[None, :]) * spike )
    Z_0 = randn(N, C)
    Z_{t+1} = Z_t + ||Z_t|| * d_t * ( sqrt(f) * L_t / ||L_t|| + sqrt(1 - f) * G_t / ||G_t|| )

* ``chan``: lognormal(0, ``channel_sigma``), and ``outlier_channels`` random channels
  multiplied by ``outlier_scale``;
* ``tok``: lognormal(0, ``token_sigma``), and ``sink_tokens`` random tokens multiplied by
  ``sink_scale``;
* ``spike``: 1, except a random ``spike_fraction`` of the entries (fixed positions, like
  massive activations) that are multiplied by ``spike_scale``;
* ``d_t``: the relative drift of step ``t``, uniform in ``drift`` (drawn per step);
* ``L_t = U_t diag(a_t) V_t^T``: rank ``drift_rank``, ``a_t`` Gaussian, with orthonormal
  ``U_t``, ``V_t`` that turn by about ``rotation`` radians per step
  (``U_{t+1} = orth(U_t + rotation * randn / sqrt(N))``, the same for ``V``);
* ``G_t``: dense Gaussian noise; ``f = lowrank_fraction`` of the drift's energy is low-rank.

The defaults are the statistics of issue 9 (1024 x 3072 bf16, 28 steps, 4-11 % drift of a
rotating rank-8 part plus dense noise, channel scales lognormal(0, 0.5) with 32 channels x10,
token scales lognormal(0, 0.25) with 4 sink tokens x4, 0.02 % of the entries x10);
:meth:`TrajectoryConfig.channel_scales_only` keeps only the lognormal channel scales.

:func:`run_trajectory` sends a trajectory through a sender and a receiver
:class:`~compactfusion.residual.ResidualCompressor` (step 0 raw) and reports the receiver's
relative error per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TrajectoryConfig", "TrajectoryResult", "kv_trajectory", "run_trajectory"]


@dataclass(frozen=True)
class TrajectoryConfig:
    """Statistics of a synthetic K/V trajectory (see the module docstring for the model).

    Attributes:
        tokens: rows ``N`` (tokens of one rank's shard).
        channels: columns ``C`` (heads x head dim of K or V).
        steps: denoising steps.
        dtype: dtype of the produced activations (float32, float16 or bfloat16).
        drift: ``(low, high)`` relative Frobenius change of ``Z`` per step, drawn uniformly.
        drift_rank: rank of the low-rank part of the drift.
        lowrank_fraction: share of each step's drift energy in the low-rank part, in [0, 1].
        rotation: how far (radians, roughly) the low-rank subspace turns per step.
        channel_sigma: sigma of the lognormal channel scales (0: all 1).
        outlier_channels: number of channels multiplied by ``outlier_scale``.
        outlier_scale: factor of the outlier channels.
        token_sigma: sigma of the lognormal token scales (0: all 1).
        sink_tokens: number of tokens multiplied by ``sink_scale``.
        sink_scale: factor of the sink tokens.
        spike_fraction: fraction of the entries multiplied by ``spike_scale`` (fixed positions).
        spike_scale: factor of the spiking entries.
        seed: seed of every random draw (same seed, same trajectory, on any machine).
    """

    tokens: int = 1024
    channels: int = 3072
    steps: int = 28
    dtype: torch.dtype = torch.bfloat16
    drift: tuple[float, float] = (0.04, 0.11)
    drift_rank: int = 8
    lowrank_fraction: float = 0.5
    rotation: float = 0.1
    channel_sigma: float = 0.5
    outlier_channels: int = 32
    outlier_scale: float = 10.0
    token_sigma: float = 0.25
    sink_tokens: int = 4
    sink_scale: float = 4.0
    spike_fraction: float = 2e-4
    spike_scale: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tokens", "channels", "steps", "drift_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be a positive int, got {v!r}")
        for name, limit in (("outlier_channels", self.channels), ("sink_tokens", self.tokens)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limit:
                raise ValueError(f"{name}: must be an int in [0, {limit}], got {v!r}")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: must be float32, float16 or bfloat16, got {self.dtype}")
        lo, hi = self.drift
        if not 0 <= lo <= hi:
            raise ValueError(f"drift: need 0 <= low <= high, got {self.drift}")
        for name in ("lowrank_fraction", "spike_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("rotation", "channel_sigma", "token_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("outlier_scale", "sink_scale", "spike_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    @classmethod
    def channel_scales_only(cls, **overrides: Any) -> TrajectoryConfig:
        """The variant with lognormal channel scales only: no outlier channels, no token
        scales or sinks, no spikes."""
        base = dict(outlier_channels=0, token_sigma=0.0, sink_tokens=0, spike_fraction=0.0)
        return cls(**{**base, **overrides})

    def replace(self, **changes: Any) -> TrajectoryConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _orth(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(m, mode="reduced").Q


def kv_trajectory(config: TrajectoryConfig | None = None) -> Iterator[torch.Tensor]:
    """Yield the ``config.steps`` activations ``X_t`` (``tokens x channels``, ``config.dtype``,
    CPU). Deterministic for a given config: all draws come from one seeded generator."""
    cfg = TrajectoryConfig() if config is None else config
    g = torch.Generator().manual_seed(cfg.seed)
    n, c, k = cfg.tokens, cfg.channels, min(cfg.drift_rank, cfg.tokens, cfg.channels)

    chan = torch.exp(torch.randn(c, generator=g) * cfg.channel_sigma)
    chan[torch.randperm(c, generator=g)[: cfg.outlier_channels]] *= cfg.outlier_scale
    tok = torch.exp(torch.randn(n, generator=g) * cfg.token_sigma)
    tok[torch.randperm(n, generator=g)[: cfg.sink_tokens]] *= cfg.sink_scale
    scale = tok[:, None] * chan[None, :]
    nspikes = round(cfg.spike_fraction * n * c)
    if nspikes:
        scale.view(-1)[torch.randperm(n * c, generator=g)[:nspikes]] *= cfg.spike_scale

    z = torch.randn(n, c, generator=g)
    u = _orth(torch.randn(n, k, generator=g))
    v = _orth(torch.randn(c, k, generator=g))
    lo, hi = cfg.drift
    f = cfg.lowrank_fraction
    for step in range(cfg.steps):
        yield (z * scale).to(cfg.dtype)
        if step == cfg.steps - 1:
            break
        d = lo + (hi - lo) * float(torch.rand((), generator=g))
        low = (u * torch.randn(k, generator=g)) @ v.T
        noise = torch.randn(n, c, generator=g)
        delta = math.sqrt(f) * low / low.norm().clamp_min(1e-30)
        delta += math.sqrt(1.0 - f) * noise / noise.norm()
        z = z + delta * (d * float(z.norm()))
        u = _orth(u + cfg.rotation * torch.randn(n, k, generator=g) / math.sqrt(n))
        v = _orth(v + cfg.rotation * torch.randn(c, k, generator=g) / math.sqrt(c))


@dataclass
class TrajectoryResult:
    """What :func:`run_trajectory` measured along one trajectory."""

    errors: list[float]
    """Receiver's relative error ``||recon - x|| / ||x||`` (Frobenius) per step (step 0: raw)."""
    bases_identical: bool
    """Sender and receiver bases were bit-identical after every step."""
    payload_bytes: list[int]
    """Bytes sent per step (headers included)."""


def run_trajectory(config, trajectory) -> TrajectoryResult:
    """Send every activation of ``trajectory`` from a sender to a receiver
    :class:`~compactfusion.residual.ResidualCompressor` built from the
    :class:`~compactfusion.CompactConfig` ``config`` (one call site; its ``warmup_steps``
    first steps are raw) and measure the receiver's reconstruction at every step."""
    from compactfusion.residual import ResidualCompressor

    sender, receiver = ResidualCompressor(config), ResidualCompressor(config)
    errors, sizes, identical = [], [], True
    for x in trajectory:
        payload = sender.encode("kv", x)
        recon = receiver.decode("kv", payload)
        sizes.append(int(payload.numel()))
        xf = x.double()
        errors.append(float((recon.double() - xf).norm() / xf.norm().clamp_min(1e-300)))
        sent = sender.base("kv")
        identical = identical and torch.equal(sent.view(torch.uint8), recon.view(torch.uint8))
    return TrajectoryResult(errors, identical, sizes)
