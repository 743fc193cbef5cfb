"""The GPU validation script (benchmarks/gpu_check.sh + gpu_check.py) without a GPU: its
verdicts catch each kind of mismatch, sync counting attributes warnings to steps, and the
shell driver rejects bad arguments, fails loudly and exports at most the tool's 8 files."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")


def _load():
    spec = importlib.util.spec_from_file_location(
        "cf_gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gc = _load()


# --------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------
def _rank_record(rank: int, kind: str, steps: int = 3) -> dict:
    """A consistent record of rank ``rank`` (2 ranks, one site per rank)."""
    hashes = {f"('kv', {r})": ["send" if r == rank else "recv", f"h{r}"] for r in range(2)}
    rec = {
        "resolved": {"torch": "torch", "triton": "triton"},
        "hashes": {"torch": dict(hashes), "triton": dict(hashes)},
        "stats": {b: {"kernel_fallbacks": 0} for b in ("torch", "triton")},
        "bases_equal": True,
        "bases_max_rel": 0.0,
    }
    if kind == "collective":
        rec.update(
            payload_equal_per_step=[True] * steps,
            gathered_equal_per_step=[True] * steps,
            gathered_max_rel=0.0,
        )
    else:
        rec.update(output={"equal": True, "rel": 0.0}, same_sites=True, torch_repeatable=True)
    return rec


def _ranks(kind: str, codec: str = "int2") -> list[dict]:
    return [{f"codec:{codec}": _rank_record(r, kind)} for r in range(2)]


@pytest.mark.parametrize("kind", ["collective", "pipeline"])
def test_judge_passes_consistent_records(kind):
    assert (
        gc._judge(
            kind,
            ["int2"],
            _ranks(kind),
        )
        == []
    )


def _break(ranks, kind, what):
    rec = ranks[1]["codec:int2"]
    if what == "sender_receiver":
        rec["hashes"]["triton"]["('kv', 0)"] = ["recv", "other"]
    elif what == "resolved":
        rec["resolved"]["triton"] = "torch"
    elif what == "fallback":
        rec["stats"]["triton"]["kernel_fallbacks"] = 3
    elif what == "bases":
        rec["bases_equal"] = False
    elif what == "payload":
        rec["payload_equal_per_step"][2] = False
    elif what == "gathered":
        rec["gathered_equal_per_step"][1] = False
    elif what == "output":
        rec["output"] = {"equal": False, "rel": 1e-3}
    elif what == "missing":
        del ranks[1]["codec:int2"]


@pytest.mark.parametrize(
    ("kind", "what", "expect"),
    [
        ("collective", "sender_receiver", "differs between its sender"),
        ("pipeline", "sender_receiver", "differs between its sender"),
        ("collective", "resolved", "resolved to torch"),
        ("pipeline", "fallback", "kernel fallback"),
        ("collective", "bases", "triton != torch bases"),
        ("collective", "payload", "payloads at steps [2]"),
        ("collective", "gathered", "gathered tensors at steps [1]"),
        ("pipeline", "output", "triton != torch output"),
        ("pipeline", "missing", "not completed on every rank"),
    ],
)
def test_judge_reports_each_mismatch(kind, what, expect):
    ranks = _ranks(kind)
    _break(ranks, kind, what)
    failures = gc._judge(
        kind,
        ["int2"],
        ranks,
    )
    assert any(expect in f for f in failures), failures


def test_judge_tolerance_codec_and_unrepeatable_model():
    # lowrank: only the first compressed step's payload must match, bases may differ a little
    ranks = _ranks("collective", "lowrank")
    for r in ranks:
        rec = r["codec:lowrank"]
        rec["payload_equal_per_step"][2] = False
        rec["bases_equal"] = False
    assert (
        gc._judge(
            "collective",
            ["lowrank"],
            ranks,
        )
        == []
    )
    ranks[0]["codec:lowrank"]["payload_equal_per_step"][1] = False
    assert gc._judge(
        "collective",
        ["lowrank"],
        ranks,
    )
    # a model that is not bit-repeatable: outputs are reported, sender/receiver still checked
    ranks = _ranks("pipeline")
    _break(ranks, "pipeline", "output")
    ranks[0]["codec:int2"]["torch_repeatable"] = False
    assert gc._judge("pipeline", ["int2"], ranks) == []
    _break(ranks, "pipeline", "sender_receiver")
    assert gc._judge("pipeline", ["int2"], ranks)


# --------------------------------------------------------------------------------------------
# Sync counting, targets, junit
# --------------------------------------------------------------------------------------------
class _Step(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.syncs = {1: 2}  # call index -> warnings to raise inside it

    def forward(self, x, call):
        for _ in range(self.syncs.get(call, 0)):
            warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
        return x


def test_sync_recorder_attributes_warnings_to_calls():
    module = _Step()
    with gc.SyncRecorder(module, cuda=False) as rec:
        for call in range(3):
            module(torch.zeros(1), call)
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
    summary = rec.summary(steady_step=1)
    assert summary["per_step"] == [0, 2, 0]
    assert summary["outside_steps"] == 1
    assert summary["steady_step_syncs"] == 2
    (site,) = summary["steady_step_sites"]
    assert "test_gpu_check.py" in site and "forward" in site
    assert not module._forward_hooks and not module._forward_pre_hooks  # hooks removed


def test_kernel_targets(tmp_path):
    path = tmp_path / "kernels.csv"
    fields = ["codec", "size", "rows", "cols", "dtype", "op", "impl", "pct_copy_bw",
              "speedup_vs_torch", "device"]  # fmt: skip
    rows = [
        ["int2", "big", 4608, 3072, "bf16", "encode", "triton", 85, 3.5, "gpu"],
        ["int1", "big", 4608, 3072, "bf16", "decode", "triton", 70, 5.0, "gpu"],
        ["fp8", "big", 4608, 3072, "bf16", "encode", "triton", 40, 1.0, "gpu"],
        ["int2", "small", 256, 3072, "bf16", "encode", "triton", 10, 1.0, "gpu"],
        ["int2", "big", 4608, 3072, "bf16", "encode", "torch", 20, 1.0, "gpu"],
    ]
    path.write_text("\n".join(",".join(map(str, r)) for r in [fields, *rows]) + "\n")
    got = {(r["codec"], r["op"]): r["target_met"] for r in gc.kernel_targets(str(path))}
    assert got == {("int2", "encode"): True, ("int1", "decode"): False, ("fp8", "encode"): None}


def test_junit_counts(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>'
    )
    assert gc.junit_counts(str(path)) == {
        "tests": 5,
        "failures": 1,
        "errors": 0,
        "skipped": 2,
        "passed": 2,
    }
    assert gc.main(["junit", "--xml", str(path)]) == 1  # a failure fails the stage


# --------------------------------------------------------------------------------------------
# The shell driver
# --------------------------------------------------------------------------------------------
needs_bash = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash"
)


def _run(*args, env=None, timeout=120):
    full_env = {k: v for k, v in os.environ.items() if k != "OUT"}
    full_env.update(env or {})
    return subprocess.run(
        ["bash", SCRIPT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@needs_bash
@pytest.mark.parametrize(
    ("args", "message"),
    [(["--stages", "env,bogus"], "unknown stage 'bogus'"), (["--frobnicate"], "unknown argument")],
)
def test_script_rejects_bad_arguments(args, message):
    res = _run(*args)
    assert res.returncode == 2 and message in res.stderr


@needs_bash
def test_script_fails_loudly(tmp_path):
    # An interpreter that fails everything: each stage FAILs, later stages still run.
    res = _run(
        "--dry-run", "--stages", "env,tests", "--python", "false", "--out", str(tmp_path / "r")
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "GPU CHECK FAILED" in res.stderr
    lines = (tmp_path / "r" / "stages.tsv").read_text().splitlines()
    assert [line.split("\t")[:2] for line in lines] == [["env", "FAIL"], ["tests", "FAIL"]]


@needs_bash
def test_script_dry_run_env_stage_exports(tmp_path):
    res = _run(
        "--dry-run",
        "--stages",
        "env",
        "--python",
        sys.executable,
        "--out",
        str(tmp_path / "r"),
        "--export",
        str(tmp_path / "out"),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    exported = sorted(os.listdir(tmp_path / "out"))
    assert exported == ["gpu_check.tar.gz", "summary.json", "summary.txt"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dry_run"] and summary["failed"] == []
    assert [s["stage"] for s in summary["stages"]] == ["env"]
    env = json.loads((tmp_path / "r" / "env.json").read_text())
    assert env["torch"] == torch.__version__


@needs_bash
def test_script_refuses_to_empty_a_foreign_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("not a gpu_check result")
    res = _run("--dry-run", "--stages", "env", "--out", str(tmp_path))
    assert res.returncode == 2 and "non-empty folder" in res.stderr
    assert (tmp_path / "keep.txt").exists()
