"""The torchrun examples run end to end: ``examples/flux_example.py``, ``cogvideox_example.py``.

Each example is launched as a user would (``python -m torch.distributed.run --standalone
--nproc_per_node=2``, which picks a free port) in a seconds-long smoke configuration: the tiny
random model, 2 steps. The checks read what rank 0 wrote: the image or frames and ``stats.json``,
which must show compression after the warm-up step. On a machine with fewer than two GPUs the
ranks run on CPU with gloo (CUDA is hidden from them). Each launch costs ~15-20 s, mostly
``import xfuser`` in both ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compactfusion import CompactConfig

pytestmark = [
    pytest.mark.xfuser,
    pytest.mark.skipif(
        importlib.util.find_spec("xfuser") is None, reason="needs the xdit extra (xfuser==0.7.0)"
    ),
]

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240  # a smoke run takes ~20 s; a hang must not stall CI


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache: no weights can be found
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["LOG_LEVEL"] = "error"
    if torch.cuda.device_count() < 2:  # NCCL needs a GPU per rank; use CPU + gloo instead
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _run(tmp_path: Path, args: list[str], nproc: int | None = 2):
    """Run an example (under torchrun when ``nproc``); return the completed process."""
    launcher = [sys.executable]
    if nproc is not None:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    try:
        proc = subprocess.run(
            launcher + args,
            cwd=REPO,
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{' '.join(args)} did not finish in {TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}"
        )
    return proc


def _ok(proc) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


def _check_compressed(run: dict, min_ratio: float, steps: int = 2) -> None:
    """Step 0 is the raw warm-up; later steps send a fraction of the raw bytes on every rank."""
    sent, raw = run["bytes_per_step"], run["raw_bytes_per_step"]
    assert run["warmup_steps"] == 1
    assert len(sent) == len(raw) == len(run["seconds_per_step"]) == steps
    assert sent[0] >= raw[0] > 0  # raw payload plus its header
    assert all(s * min_ratio < r for s, r in zip(sent[1:], raw[1:], strict=True))
    assert run["ratio_after_warmup"] > min_ratio
    assert run["bytes_per_step_per_rank"] == [sent, sent]  # both ranks send equal shards
    assert all(t > 0 for t in run["seconds_per_step"])


def test_flux_example_torchrun(tmp_path):
    """Default --model (not cached) -> tiny FLUX; int2 with an uncompressed reference run."""
    out = tmp_path / "flux"
    proc = _run(
        tmp_path,
        ["examples/flux_example.py", "--num_inference_steps", "2", "--height", "32",
         "--width", "32", "--compact-codec", "int2", "--compact-compare",
         "--output-dir", str(out)],
    )  # fmt: skip
    stdout = _ok(proc)
    assert "no local weights for 'black-forest-labs/FLUX.1-dev'" in stdout
    assert "using --ring_degree 2" in stdout

    from PIL import Image

    for name in ("flux.png", "flux_reference.png"):
        with Image.open(out / name) as image:
            assert image.size == (32, 32)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["model"]["tiny"] and stats["model"]["weights"] is None
    assert stats["parallel"]["world_size"] == 2 and stats["parallel"]["ring_degree"] == 2
    assert stats["compactfusion"]["codec"] == "int2"
    assert stats["compactfusion"]["mode"] == "allgather"
    assert stats["versions"]["xfuser"] == "0.7.0" and stats["versions"]["torch"]
    assert stats["machine"]["backend"] in ("gloo", "nccl")
    _check_compressed(stats["runs"]["compressed"], min_ratio=6.0)  # int2 on bf16: ~7.7x
    assert stats["runs"]["reference"]["bytes_per_step"] is None  # nothing patched
    assert len(stats["runs"]["reference"]["seconds_per_step"]) == 2
    assert 30.0 < stats["psnr_db_vs_uncompressed"] < 200.0  # lossy, but close


def test_cogvideox_example_torchrun(tmp_path):
    """--model tiny, int1 over the point-to-point ring relay; frames, GIF and stats saved."""
    out = tmp_path / "cogvideox"
    proc = _run(
        tmp_path,
        ["examples/cogvideox_example.py", "--model", "tiny", "--num_inference_steps", "2",
         "--ring_degree", "2", "--compact-codec", "int1", "--compact-mode", "ring",
         "--output-dir", str(out)],
    )  # fmt: skip
    stdout = _ok(proc)
    assert "using the tiny random model" in stdout

    from PIL import Image

    frames = sorted((out / "cogvideox_frames").glob("frame_*.png"))
    assert frames, "no frames written"
    with Image.open(frames[0]) as frame:
        assert frame.size == (32, 32)
    with Image.open(out / "cogvideox.gif") as gif:
        assert 1 <= gif.n_frames <= len(frames)  # Pillow merges identical consecutive frames
    stats = json.loads((out / "stats.json").read_text())
    assert stats["model"]["tiny"]
    assert stats["compactfusion"]["codec"] == "int1"
    assert stats["compactfusion"]["mode"] == "ring"
    assert stats["inputs"]["num_frames"] == 5
    _check_compressed(stats["runs"]["compressed"], min_ratio=12.0)  # int1 on bf16: ~15x


def test_example_rejects_bad_compact_flags(tmp_path):
    """Flag errors are reported before any process group exists (plain python, no torchrun)."""
    proc = _run(
        tmp_path,
        ["examples/flux_example.py", "--compact-codec", "lowrank", "--compact-codec-params",
         '{"rank": 0}'],
        nproc=None,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "compactfusion:" in proc.stderr and "rank" in proc.stderr


# ---- in-process checks of the shared helpers (no xfuser import, no process group) ----------


@pytest.fixture(scope="module")
def common():
    """``examples/_common.py`` loaded under a private name (it is no package module)."""
    spec = importlib.util.spec_from_file_location("_examples_common", REPO / "examples/_common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


class _Parser:
    """Stands in for the argparse parser: ``error`` raises instead of exiting."""

    def error(self, message):
        raise SystemExit(message)


def _flags(**overrides):
    import argparse

    values = dict(
        compact_off=False, compact_compare=False, compact_codec=None, compact_codec_params=None,
        compact_mode="allgather", compact_warmup=None, compact_policy="always", compact_link=None,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def test_compact_flags_map_to_config(common):
    cfg = common.compact_config(_flags(), _Parser())
    assert (cfg.codec, cfg.mode, cfg.warmup_steps) == ("int2", "allgather", 1)
    cfg = common.compact_config(_flags(compact_codec="lowrank", compact_warmup=2), _Parser())
    preset = CompactConfig.preset("lowrank")  # a preset name brings the preset's parameters
    assert cfg.codec == "lowrank" and cfg.codec_params == preset.codec_params
    assert cfg.warmup_steps == 2
    cfg = common.compact_config(
        _flags(compact_codec="nm_sparse", compact_codec_params='{"n": 2, "m": 8}'), _Parser()
    )
    assert cfg.codec == "nm_sparse" and cfg.codec_params == {"n": 2, "m": 8}
    cfg = common.compact_config(_flags(compact_mode="stale"), _Parser())
    assert cfg.codec == "int2" and cfg.mode == "stale"  # compressed DistriFusion
    cfg = common.compact_config(
        _flags(compact_codec="int1", compact_policy="auto", compact_link="12.5"), _Parser()
    )
    assert cfg.policy == "auto" and cfg.link == 12.5
    cfg = common.compact_config(_flags(compact_policy="auto", compact_link="pcie"), _Parser())
    assert cfg.link == "pcie"
    assert common.compact_config(_flags(compact_off=True), _Parser()) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(compact_policy="auto"), "link"),
        (dict(compact_warmup=-1), "warmup_steps"),
        (dict(compact_codec="int3"), "codec"),
        (dict(compact_codec_params="[1]"), "JSON object"),
        (dict(compact_off=True, compact_codec="int1"), "--compact-off"),
        (dict(compact_off=True, compact_compare=True), "--compact-compare"),
    ],
)
def test_bad_compact_flags_are_errors(common, overrides, message):
    with pytest.raises(SystemExit, match=message):
        common.compact_config(_flags(**overrides), _Parser())


def test_resolve_weights_never_downloads(common, tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-flux" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (cache / "models--acme--tiny-flux" / "refs").mkdir()
    (cache / "models--acme--tiny-flux" / "refs" / "main").write_text("abc123")

    path, note = common.resolve_weights("acme/tiny-flux", str(cache))
    assert path == str(snapshot) and "local Hugging Face cache" in note
    path, note = common.resolve_weights("acme/not-cached", str(cache))
    assert path is None and "no local weights for 'acme/not-cached'" in note
    assert "tiny random model" in note
    path, note = common.resolve_weights(str(snapshot), None)
    assert path == str(snapshot) and "local directory" in note
    assert common.resolve_weights("tiny", None)[0] is None
