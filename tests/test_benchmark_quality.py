"""Smoke run of benchmarks/quality.py: 2 gloo CPU ranks, tiny FLUX, int2 and its ablations
(all-gather and stale mode)."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_MISSING = [n for n in ("xfuser", "yunchang", "diffusers") if not importlib.util.find_spec(n)]


def _load():
    spec = importlib.util.spec_from_file_location(
        "cf_bench_quality", os.path.join(ROOT, "benchmarks", "quality.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


quality = _load()

SUMMARY_COLUMNS = {
    "workload", "codec", "variant", "steps", "final_kv_rel_err", "mean_kv_rel_err",
    "final_kv_rel_err_vs_ref", "psnr_db", "ssim", "out_rel_err", "wire_ratio", "fid", "lpips",
    "device", "torch", "xfuser", "note",
}  # fmt: skip
STEP_COLUMNS = {"workload", "codec", "variant", "step", "kv_rel_err", "kv_rel_err_vs_ref"}


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return set(reader.fieldnames), list(reader)


@pytest.mark.xfuser
@pytest.mark.skipif(bool(_MISSING), reason=f"{', '.join(_MISSING)} not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny benchmark runs on CPU ranks")
@pytest.mark.parametrize("mode", ["allgather", "stale"])
def test_quality_smoke(tmp_path, mode):
    env = {**os.environ, "LOG_LEVEL": "error", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), "--smoke",
         "--mode", mode, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=400, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tag = "tiny_flux" if mode == "allgather" else f"tiny_flux_{mode}"
    columns, summary = _read(tmp_path / f"quality_{tag}.csv")
    assert columns == SUMMARY_COLUMNS
    step_columns, steps = _read(tmp_path / f"quality_{tag}_steps.csv")
    assert step_columns == STEP_COLUMNS
    for name in (f"quality_{tag}.md", f"quality_{tag}.png"):
        assert (tmp_path / name).stat().st_size > 0

    assert {(r["codec"], r["variant"]) for r in summary} == {
        ("raw", "uncompressed"), ("int2", "naive"), ("int2", "no_feedback"), ("int2", "feedback")
    }  # fmt: skip
    raw = next(r for r in summary if r["codec"] == "raw")
    assert raw["psnr_db"] == "inf"
    if mode == "allgather":
        # The probe sees the exact K/V in the uncompressed run: zero error, identical output.
        assert float(raw["final_kv_rel_err"]) == 0.0
        assert all(float(r["kv_rel_err"]) == 0.0 for r in steps if r["codec"] == "raw")
    else:  # full-precision stale K/V do not go through the compressor
        assert raw["final_kv_rel_err"] == "n/a" and not [r for r in steps if r["codec"] == "raw"]

    last = max(int(r["step"]) for r in steps)
    final = {
        r["variant"]: float(r["kv_rel_err"])
        for r in steps
        if r["codec"] == "int2" and int(r["step"]) == last
    }
    assert final["naive"] > final["no_feedback"] > final["feedback"] > 0, final
    # Step 0 is the raw warm-up: exact for every variant.
    assert all(float(r["kv_rel_err"]) == 0.0 for r in steps if r["step"] == "0")
    int2 = [r for r in summary if r["codec"] == "int2"]
    assert all(float(r["wire_ratio"]) > 5 for r in int2)
    assert all(0 < float(r["ssim"]) <= 1 for r in int2)


def test_trajectory_smoke(tmp_path):
    """``--trajectory --smoke``: the synthetic K/V trajectory, every scheme and ablation, on a
    256 x 256 shard (no model, no ranks; 256 tokens: the fewest with channel scales)."""
    paths = quality.main(
        ["--trajectory", "--smoke", "--codecs", "int2,fp8", "--out", str(tmp_path)]
    )
    columns, rows = _read(paths["csv"])
    assert columns == set(quality.TRAJ_FIELDS)
    step_columns, steps = _read(paths["steps_csv"])
    assert step_columns == set(quality.TRAJ_STEP_FIELDS)
    for name in ("md", "png"):
        assert os.path.getsize(paths[name]) > 0
    keys = {(r["data"], r["codec"], r["scheme"], r["variant"]) for r in rows}
    for data in ("outliers", "channel_scales_only"):
        for scheme in ("mean", "none"):
            for variant in ("naive", "no_feedback", "feedback"):
                assert (data, "int2", scheme, variant) in keys
        assert (data, "int2", "derived_base", "feedback") in keys
        assert (data, "fp8", "default", "feedback") in keys
    assert all(r["device"] and r["torch"] == torch.__version__ for r in rows)
    final = {
        (r["data"], r["scheme"], r["variant"]): float(r["final_rel_err"])
        for r in rows
        if r["codec"] == "int2"
    }
    for data in ("outliers", "channel_scales_only"):
        assert final[(data, "mean", "naive")] > final[(data, "mean", "feedback")]
        assert final[(data, "mean", "feedback")] < final[(data, "none", "feedback")]
    ok = [r["bases_identical"] for r in rows if r["variant"] != "no_feedback"]
    assert set(ok) <= {"yes", "n/a"}
    assert all(float(r["rel_err"]) == 0.0 for r in steps if r["step"] == "0")
