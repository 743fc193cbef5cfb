"""Backend choice: the environment override is validated, and CUDA tensors falling back to
the torch codecs because the kernels cannot be imported is said loudly, once."""

import logging

import pytest
import torch

from compactfusion import backend


def test_environment_override(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    assert backend.resolve_backend("triton", torch.device("cpu")) == "torch"
    monkeypatch.setenv(backend.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=backend.ENV_VAR):
        backend.resolve_backend("auto", torch.device("cpu"))


def test_gpu_without_kernels_warns_once(monkeypatch, caplog):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.setattr(backend, "triton_available", lambda: False)
    monkeypatch.setattr(backend, "kernels_import_error", lambda: "ImportError: no triton")
    backend._warn_slow_path_on_gpu.cache_clear()
    with caplog.at_level(logging.WARNING, logger="compactfusion.backend"):
        for _ in range(3):
            assert backend.resolve_backend("auto", torch.device("cuda")) == "torch"
    warnings = [r for r in caplog.records if "cannot be imported" in r.getMessage()]
    assert len(warnings) == 1 and "no triton" in warnings[0].getMessage()
    backend._warn_slow_path_on_gpu.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compactfusion.backend"):
        assert backend.resolve_backend("auto", torch.device("cpu")) == "torch"  # CPU: expected
    assert not caplog.records
