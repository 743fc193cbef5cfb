"""The auto policy's formula and backend selection."""

import pytest
import torch

from compactfusion import CompactConfig, ResidualCompressor, backend, get_codec
from compactfusion.backend import resolve_backend
from compactfusion.policy import compression_times, worth_compressing

SHAPE = (4096, 3072)  # a FLUX K at 1024x1024


def test_formula_hand_computed(monkeypatch):
    monkeypatch.setenv("COMPACTFUSION_CODEC_GBPS", "100")
    codec = get_codec("int1")
    numel = 4096 * 3072
    payload = codec.payload_nbytes(SHAPE, torch.bfloat16)
    t_raw, t_comp = compression_times(codec, SHAPE, torch.bfloat16, 10.0, "cuda")
    assert t_raw == pytest.approx(numel * 2 / 10e9)
    work = numel * 5 * 2 + 2 * payload  # encode 3 + decode 2 passes over bf16, payload twice
    assert t_comp == pytest.approx(payload / 10e9 + work / 100e9)


def test_auto_skips_fast_links_and_compresses_slow_ones():
    codec = get_codec("int2")
    assert worth_compressing(codec, SHAPE, torch.bfloat16, 1.25, "cuda")  # 10 GbE
    assert worth_compressing(codec, SHAPE, torch.bfloat16, 25.0, "cuda")  # PCIe 4
    assert not worth_compressing(codec, SHAPE, torch.bfloat16, 4000.0, "cuda")
    # The torch reference on a CPU is slow: only very slow links are worth it.
    assert not worth_compressing(codec, SHAPE, torch.bfloat16, 25.0, "cpu")
    assert worth_compressing(codec, SHAPE, torch.bfloat16, 0.0125, "cpu")  # 100 Mbit/s
    assert worth_compressing(codec, SHAPE, torch.bfloat16, None)


def test_auto_policy_in_the_residual_state():
    x = torch.randn(64, 256)
    for link, expect_compressed in ((0.001, True), (1e6, False)):
        comp = ResidualCompressor(
            CompactConfig(codec="int2", policy="auto", link=link, warmup_steps=1, min_numel=0)
        )
        comp.encode("s", x)
        assert comp.will_compress("s", (64, 256), torch.float32) is expect_compressed


def test_bad_codec_throughput_env(monkeypatch):
    monkeypatch.setenv("COMPACTFUSION_CODEC_GBPS", "-1")
    with pytest.raises(ValueError, match="COMPACTFUSION_CODEC_GBPS"):
        compression_times(get_codec("int2"), SHAPE, torch.bfloat16, 1.0, "cuda")


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("COMPACTFUSION_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    monkeypatch.setenv("COMPACTFUSION_BACKEND", "torch")
    assert resolve_backend("triton", cpu) == "torch"
    monkeypatch.setenv("COMPACTFUSION_BACKEND", "gpu")
    with pytest.raises(ValueError, match="COMPACTFUSION_BACKEND"):
        resolve_backend("auto", cpu)
    monkeypatch.delenv("COMPACTFUSION_BACKEND")
    # Not TRITON_INTERPRET itself: kernels imported without it would stay compiled-mode.
    monkeypatch.setattr(backend, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", cpu)
