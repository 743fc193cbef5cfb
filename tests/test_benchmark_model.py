"""The GPU time model (benchmarks/model.py) against cases computed by hand, and its CLI."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import sys

import pytest
import torch

from compactfusion.codecs import get_codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "cf_bench_model", os.path.join(ROOT, "benchmarks", "model.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


model = _load()

# A 2-layer workload small enough to follow by hand: hidden 2 x 128 = 256, 4096 tokens.
TOY = model.Workload(
    "toy", "toy", layers=2, tokens=4096, text_tokens=0, heads=2, head_dim=128, batch=1,
    steps=10, a2a_calls=2,
)  # fmt: skip
# 1 GB/s, no latency; the auto policy is told the same 1 GB/s.
SLOW = model.LinkModel("slow", "slow", nominal_gbps=1.0, gbps=1.0, latency_us=0.0, policy_link=1.0)
# 10 ms of compute per step and rank on 2 GPUs: 8 ms linear + 2 ms attention.
COMPUTE = model.Compute(linear_s=0.016, attn_s=0.004, source="test")


@pytest.fixture(autouse=True)
def _no_codec_override(monkeypatch):
    monkeypatch.delenv("COMPACTFUSION_CODEC_GBPS", raising=False)


def _by_method(preds):
    return {p.method: p for p in preds}


def test_hand_computed_two_gpu_case():
    # One rank's K and V of one layer: 2048 tokens x 2 x 256 channels x 2 bytes = 2 MiB.
    m = 2048 * 2 * 256 * 2
    assert TOY.kv_numel(2) * 2 == m == 2_097_152
    timing = model.CodecTiming(default_gbps=100.0)
    p = _by_method(model.predict(TOY, 2, SLOW, COMPUTE, timing))

    # allgather: 10 ms + 2 layers x (1 peer x 2.097152 ms).
    assert p["allgather"].step_s == pytest.approx(0.014194304, rel=1e-12)
    assert p["allgather"].bytes_per_step == 2 * m
    # ring: attention block = 2 ms / (2 layers x 2 blocks) = 0.5 ms, hidden under the 2.097 ms
    # hop; per layer 2.097152 + 0.5 ms; plus 8 ms of linear layers.
    assert p["ring"].step_s == pytest.approx(0.008 + 2 * (0.002097152 + 0.0005), rel=1e-12)
    # Ulysses on 2 GPUs: 4 tensors of 1 MiB, half of it leaves the rank: 2 MiB per layer.
    assert p["ulysses"].step_s == pytest.approx(0.014194304, rel=1e-12)
    # stale: 4.19 ms of transfers hide under 10 ms of compute; warm-up step is synchronous.
    assert p["stale"].step_s == pytest.approx(0.010, rel=1e-12)
    assert p["stale"].image_s(10) == pytest.approx(0.014194304 + 9 * 0.010, rel=1e-12)

    # cf-int2 at 100 GB/s codec throughput: encode moves 3 x 2 MiB + payload, decode 2 x 2 MiB
    # + payload, 5 us launch each; the payload crosses the 1 GB/s link once.
    # the K/V matrix is token-major: 2048 tokens x (K, V) x 256 channels
    payload = get_codec("int2").payload_nbytes((2048, 512), torch.bfloat16)
    assert 7 < m / payload < 8  # 2 bits + a bf16 scale per 256 values + channel scales + header
    t_enc = 5e-6 + (3 * m + payload) / 100e9
    t_dec = 5e-6 + (2 * m + payload) / 100e9
    expect = 0.010 + 2 * (t_enc + payload / 1e9 + t_dec)
    assert p["cf-int2"].step_s == pytest.approx(expect, rel=1e-12)
    assert p["cf-int2"].warmup_step_s == pytest.approx(0.014194304, rel=1e-12)
    assert p["cf-int2"].image_s(10) == pytest.approx(0.014194304 + 9 * expect, rel=1e-12)
    # int2 in stale mode: the 2 x 0.27 ms of payload transfers hide under the compute, the
    # codec work does not.
    assert p["cf-int2-stale"].step_s == pytest.approx(0.010 + 2 * (t_enc + t_dec), rel=1e-12)
    assert p["cf-int2-stale"].comm_s == pytest.approx(0.0, abs=1e-15)
    assert p["cf-int2-stale"].bytes_per_step == p["cf-int2"].bytes_per_step
    # On a link 100x slower the transfers dominate: step = 2 layers x payload / 10 MB/s.
    crawl = model.LinkModel("crawl", "crawl", 0.01, 0.01, 0.0, 0.01)
    q = _by_method(model.predict(TOY, 2, crawl, COMPUTE, timing))
    assert q["cf-int2-stale"].step_s == pytest.approx(2 * payload / 1e7, rel=1e-12)
    # auto at 1 GB/s: 2.1 ms raw vs ~0.27 ms + ~4 us of codec work -> compress.
    assert p["auto"].choice == "int2"
    assert p["auto"].step_s == p["cf-int2"].step_s


def test_auto_sends_raw_on_a_fast_link():
    # At 1000 GB/s the raw transfer (2.1 us) is cheaper than the codec work (~4.4 us at the
    # 2400 GB/s planning throughput): the policy keeps raw.
    fast = model.LinkModel("fast", "fast", 1000.0, 1000.0, 0.0, 1000.0)
    p = _by_method(model.predict(TOY, 2, fast, COMPUTE, model.CodecTiming()))
    assert p["auto"].choice == "raw"
    assert p["auto"].step_s == p["allgather"].step_s
    assert p["allgather"].step_s == pytest.approx(0.010 + 2 * 2_097_152 / 1e12, rel=1e-12)


def test_four_gpus_latency_and_ulysses_divisibility():
    link = model.LinkModel("l", "l", 10.0, 10.0, latency_us=10.0, policy_link=10.0)
    m = 1024 * 2 * 256 * 2  # 1024 tokens per rank
    assert model.t_allgather(m, 4, link) == pytest.approx(3 * (1e-5 + m / 1e10), rel=1e-12)
    assert model.t_all_to_all(m, 4, link, calls=2) == pytest.approx(
        2 * 3 * 1e-5 + 0.75 * m / 1e10, rel=1e-12
    )
    p = _by_method(model.predict(TOY, 4, link, COMPUTE, model.CodecTiming()))
    assert math.isnan(p["ulysses"].step_s)  # 2 heads cannot be split 4 ways
    assert "not divisible" in p["ulysses"].note
    assert p["allgather"].step_s == pytest.approx(0.005 + 2 * 3 * (1e-5 + m / 1e10), rel=1e-12)


def test_workload_shapes_and_flops():
    flux, cog = model.WORKLOADS["flux"], model.WORKLOADS["cogvideox"]
    # FLUX: (4096 image + 512 text) / 2 tokens x K,V x 3072 channels.
    assert flux.kv_numel(2) == 2304 * 2 * 3072
    assert flux.kv_matrix_shape(2) == (2304, 6144)
    # The same matrix the integrations hand every codec (meta tensors: shapes only).
    from compactfusion.integrations.strategies import local_kv

    k = torch.empty(1, flux.heads, flux.local_tokens(2), flux.head_dim, device="meta")
    assert tuple(local_kv(None, k, k).shape) == flux.kv_matrix_shape(2)
    # CogVideoX-2b: CFG batch 2 x ceil(17550 / 4) tokens x K,V x 1920; text not sent.
    assert cog.kv_numel(4) == 2 * 4388 * 2 * 1920
    f_lin, f_attn = flux.flops_per_layer()
    assert f_lin == 24 * 3072**2 * 4608 == 1_043_677_052_928
    assert f_attn == 4 * 4608**2 * 3072 == 260_919_263_232
    c = model.derived_compute(flux, peak_tflops=1000.0, mfu=0.5)
    assert c.total_s == pytest.approx(57 * 1_304_596_316_160 / 5e14, rel=1e-12)
    with pytest.raises(ValueError):
        model.derived_compute(flux, peak_tflops=1000.0, mfu=0.0)


def test_measured_kernel_rows_are_used_and_cpu_rows_ignored(tmp_path):
    path = tmp_path / "kernels.csv"
    fields = ["codec", "size", "rows", "cols", "dtype", "op", "impl", "median_us", "gbps", "device"]
    rows = [
        ["int2", "a", 1024, 3072, "bf16", "encode", "triton", "30", "1000", "NVIDIA H100"],
        ["int2", "b", 4608, 3072, "bf16", "encode", "triton", "90", "2000", "NVIDIA H100"],
        ["int2", "a", 1024, 3072, "bf16", "encode", "torch", "300", "10", "NVIDIA H100"],
        ["int1", "a", 1024, 3072, "bf16", "encode", "triton", "9e5", "0.01", "cpu (x86_64)"],
    ]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        w.writerows(rows)
    timing = model.CodecTiming.from_csvs([str(path)])
    gbps, source = timing.gbps("int2", "encode", 1100 * 3072)  # nearest size: 1024 x 3072
    assert gbps == 1000.0 and source.startswith("measured")
    assert timing.gbps("int2", "encode", 5000 * 3072)[0] == 2000.0
    assert timing.gbps("int1", "encode", 1024 * 3072)[1].startswith("planning")
    assert timing.gbps("int2", "decode", 1024 * 3072)[0] == timing.default_gbps
    t, _ = timing.seconds("int2", "encode", 1000, 2, 100)
    assert t == pytest.approx(5e-6 + (3 * 1000 * 2 + 100) / 1e12, rel=1e-12)


def test_measured_compute_uses_per_rank_shapes_on_cpu():
    tiny = model.Workload("t", "t", 3, 64, 8, 2, 16, 1, 2, 2)
    lin, attn = model.measure_layer_seconds(tiny, 2, device="cpu", reps=2)
    assert lin > 0 and attn > 0
    c = model.measured_compute(tiny, [2], device="cpu", reps=2)
    assert c.source.startswith("measured")
    assert c.per_rank(2) == c.by_n[2] and all(t > 0 for t in c.by_n[2])
    assert c.per_rank(4) == (c.linear_s / 4, c.attn_s / 4)  # not measured: perfect split


def test_cli_fast_mode(tmp_path):
    out = tmp_path / "out"
    empty = tmp_path / "no_kernels"
    empty.mkdir()
    paths = model.main(["--fast", "--out", str(out), "--kernels-dir", str(empty)])
    for key in ("csv", "md", "png"):
        assert os.path.getsize(paths[key]) > 0
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == set(model.FIELDS)
    methods = {r["method"] for r in rows if r["gpus"] == "2"}
    assert methods == {"allgather", "ring", "ulysses", "stale", "auto"} | {
        f"cf-{c}" for c in model.CODECS
    } | {f"cf-{c}-stale" for c in model.STALE_CODECS}
    assert {r["link"] for r in rows if r["gpus"] == "2"} == {"nvlink4", "25gbe"}
    assert all("not measured" in r["compute_source"] for r in rows)
    text = open(paths["md"]).read()
    assert "planning figure" in text and "FLUX.1-dev" in text and "CogVideoX-2b" in text
    # The base-memory table: every model, mode and storage for the GPU counts asked for.
    with open(paths["memory_csv"], newline="") as f:
        mem = list(csv.DictReader(f))
    assert set(mem[0]) == set(model.MEMORY_FIELDS) and {r["gpus"] for r in mem} == {"2"}
    assert len(mem) == len(model.MODELS) * (2 * (len(model.MEMORY_MODES) - 1) + 1)
    assert "computed" in open(paths["memory_md"]).read()


def test_memory_rows_follow_the_estimator():
    from compactfusion.memory import MODELS, estimate

    rows = model.memory_rows([2, 8])
    wan = MODELS["wan21_14b"]
    r = next(
        r for r in rows
        if (r["model"], r["mode"], r["gpus"], r["storage"]) == (wan.label, "ulysses", 8, "full")
    )  # fmt: skip
    assert float(r["base_gb_per_rank"]) == pytest.approx(
        estimate(wan, "ulysses", 8).base_bytes / 1e9, abs=0.005
    )
    # Both guidance branches keep bases: twice the ~27 GB one branch holds on 8 ranks.
    assert float(r["base_gb_per_rank"]) == pytest.approx(2 * 27.1, rel=0.01)
    flux = next(r for r in rows if r["model"] == MODELS["flux1"].label and r["mode"] == "ring")
    assert flux["base_gb_per_rank"] == "3.23" and flux["held_gb_per_rank"] == "3.23"
