"""The cross-rank check of a patched pipeline's state (no xfuser needed): ranks that differ
only in their site_policy function, or in COMPACTFUSION_BACKEND, raise ConfigMismatchError on
every rank before any payload moves; an invalid COMPACTFUSION_BACKEND raises ValueError."""

import os

import pytest

from compactfusion import CompactConfig, ConfigMismatchError
from compactfusion.backend import ENV_VAR
from compactfusion.integrations.state import PipelineState
from compactfusion.testing import spawn_ranks


def _check(cfg):
    state = PipelineState(config=cfg, ring_world=2)
    try:
        state.ensure_checked()
    except ConfigMismatchError as exc:
        return f"mismatch: {exc}"
    return "ok"


def _rank(rank, world):
    out = {}
    if rank == 0:
        policy = lambda key, step: step > 1  # noqa: E731
    else:
        policy = lambda key, step: step > 2  # noqa: E731
    out["policy"] = _check(CompactConfig(site_policy=policy))
    os.environ[ENV_VAR] = "torch" if rank == 0 else "auto"
    out["backend"] = _check(CompactConfig())
    os.environ[ENV_VAR] = "torch"
    out["same"] = _check(CompactConfig(site_policy=lambda key, step: step > 1))
    return out


def test_policy_and_backend_mismatch_raise_on_every_rank():
    results = spawn_ranks(_rank, 2, timeout=120)
    for res in results:
        assert res["policy"].startswith("mismatch"), res
        assert res["backend"].startswith("mismatch"), res
        assert res["same"] == "ok", res


def test_invalid_backend_environment_is_refused(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "cuda")
    cfg = CompactConfig()
    state = PipelineState(config=cfg)
    with pytest.raises(ValueError, match=ENV_VAR):
        state.ensure_checked()
