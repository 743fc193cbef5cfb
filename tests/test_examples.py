"""The torchrun examples run end to end: ``examples/flux_example.py``, ``cogvideox_example.py``.

Each example is launched as a user would (``python -m torch.distributed.run --standalone
--nproc_per_node=2``, which picks a free port) in a seconds-long smoke configuration: the tiny
random model, 2 steps. The checks read what rank 0 wrote: the image or frames and ``stats.json``,
which must show compression after the warm-up step. On a machine with fewer than two GPUs the
ranks run on CPU with gloo (CUDA is hidden from them). Each launch costs ~15-20 s, mostly
``import xfuser`` in both ranks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compactfusion import CompactConfig
from compactfusion.testing import free_port

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


def _config_only_checkpoint(directory: Path, pipeline: str, transformer: dict, vae: dict) -> Path:
    """A checkpoint directory with the JSON configs and no weights at all: anything that tried
    to load it would fail, so an error about the arguments proves they were checked first."""
    for name, config in (("transformer", transformer), ("vae", vae)):
        (directory / name).mkdir(parents=True)
        (directory / name / "config.json").write_text(json.dumps(config))
    (directory / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return directory


# Config excerpts of the real checkpoints (what the checks read).
COGVIDEOX_2B = dict(
    transformer=dict(num_attention_heads=30, patch_size=2, max_text_seq_length=226,
                     use_rotary_positional_embeddings=False),
    vae=dict(block_out_channels=[128, 256, 256, 512]),
)  # fmt: skip
COGVIDEOX_5B = dict(
    transformer=dict(num_attention_heads=48, patch_size=2, max_text_seq_length=226,
                     use_rotary_positional_embeddings=True),
    vae=dict(block_out_channels=[128, 256, 256, 512]),
)  # fmt: skip
FLUX_1 = dict(
    transformer=dict(num_attention_heads=24, patch_size=1),
    vae=dict(block_out_channels=[128, 256, 512, 512]),
)


def test_arguments_checked_before_loading(tmp_path):
    """The README's old 4-rank CogVideoX command (default 480 px high) on a checkpoint with
    configs but no weights: exit 2 with the nearest valid heights, before any process group
    (a 4-rank world with one process would wait for the others) and any weight is read."""
    model = _config_only_checkpoint(tmp_path / "cogvideox-2b", "CogVideoXPipeline", **COGVIDEOX_2B)
    env = _env(tmp_path)
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="4",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, "examples/cogvideox_example.py", "--model", str(model),
             "--ring_degree", "2", "--ulysses_degree", "2", "--compact-codec", "int1"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the arguments were not checked before the process group was set up")
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "cannot run as given" in proc.stderr
    assert "height 480 px does not split across 4" in proc.stderr
    assert "--height 448 or --height 512" in proc.stderr
    assert "Traceback" not in proc.stderr


# xfuser's own height check, run on a grid of sizes in a subprocess (it imports xfuser).
_XFUSER_ROWS_ORACLE = """
import itertools, json, sys, types
import torch
from compactfusion.testing import prepare_xfuser_cpu
if not torch.cuda.is_available():
    prepare_xfuser_cpu()
from xfuser.core.distributed import runtime_state as rs
sys.path.insert(0, "examples")
from _validation import xfuser_accepts_rows
methods = {"flux": rs.DiTRuntimeState._calc_patches_metadata,
           "cogvideox": rs.DiTRuntimeState._calc_cogvideox_patches_metadata}
rs.get_sequence_parallel_rank = lambda: 0
checked, differ = 0, []
for kind, sp, patch, patches in itertools.product(methods, (1, 2, 3, 4, 8), (1, 2), (1, 2, 3)):
    rs.get_sequence_parallel_world_size = lambda sp=sp: sp
    for height in range(8, 1032, 8):
        state = types.SimpleNamespace(
            backbone_patch_size=patch, vae_scale_factor=8, vae_scale_factor_spatial=8,
            vae_scale_factor_temporal=4,
            input_config=types.SimpleNamespace(height=height, width=64, num_frames=9),
            parallel_config=types.SimpleNamespace(
                pp_config=types.SimpleNamespace(num_pipeline_patch=patches)))
        try:
            methods[kind](state)
            accepted = True
        except Exception:
            accepted = False
        checked += 1
        if accepted != xfuser_accepts_rows(height // 8, sp, patch, patches):
            differ.append([kind, sp, patch, patches, height, accepted])
print(json.dumps({"checked": checked, "differ": differ}))
"""


def test_row_rule_agrees_with_xfuser(tmp_path):
    """:func:`_validation.xfuser_accepts_rows` accepts exactly the sizes xfuser 0.7.0's
    ``DiTRuntimeState`` accepts (FLUX and CogVideoX paths, with and without PipeFusion)."""
    proc = subprocess.run(
        [sys.executable, "-c", _XFUSER_ROWS_ORACLE], cwd=REPO, env=_env(tmp_path),
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["checked"] == 2 * 5 * 2 * 3 * 128
    assert result["differ"] == []


# ---- in-process checks of the shared helpers (no xfuser import, no process group) ----------


@contextlib.contextmanager
def example_modules():
    """The example scripts as modules (``flux``, ``cogvideox``, ``common``, ``validation``),
    imported from ``examples/`` without running them (nothing imports xfuser)."""
    import types

    names = ("_common", "_validation", "flux_example", "cogvideox_example")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    path = str(REPO / "examples")
    sys.path.insert(0, path)
    try:
        import _common
        import _validation
        import cogvideox_example
        import flux_example

        yield types.SimpleNamespace(
            common=_common, validation=_validation, flux=flux_example, cogvideox=cogvideox_example
        )
    finally:
        while path in sys.path:
            sys.path.remove(path)
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def examples():
    with example_modules() as modules:
        yield modules


@pytest.fixture(scope="module")
def common(examples):
    return examples.common


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
    assert cfg == CompactConfig.preset("lowrank", warmup_steps=2)  # the codec's preset
    assert cfg.make_codec().as_dict()["factor_dtype"] == "int8"
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


@pytest.mark.parametrize("old, new", [("sparse", "nm_sparse"), ("off", "raw")])
def test_deprecated_preset_names_as_compact_codec(common, old, new):
    with pytest.warns(DeprecationWarning, match=f"preset '{old}' is deprecated, use '{new}'"):
        cfg = common.compact_config(_flags(compact_codec=old, compact_mode="ring"), _Parser())
    assert cfg == CompactConfig.preset(new, mode="ring")


def test_diffusers_cp_example_preset_flag():
    spec = importlib.util.spec_from_file_location(
        "diffusers_cp_example", REPO / "examples" / "diffusers_cp_example.py"
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.parse_args(["--preset", "nm_sparse"]).preset == "nm_sparse"
    with pytest.warns(DeprecationWarning, match="preset 'off' is deprecated, use 'raw'"):
        assert example.parse_args(["--preset", "off"]).preset == "raw"
    with pytest.raises(SystemExit):
        example.parse_args(["--preset", "int3"])


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


# ---- argument checks (examples/_validation.py and the examples' own rules) -----------------


def _args(ring=1, ulysses=1, **overrides):
    """The parsed xfuser arguments the checks read (xfuser's defaults otherwise)."""
    import argparse

    values = dict(
        ring_degree=ring, ulysses_degree=ulysses, use_cfg_parallel=False, data_parallel_degree=1,
        pipefusion_parallel_degree=1, num_pipeline_patch=None, tensor_parallel_degree=1,
        use_parallel_vae=False, dit_parallel_size=0, enable_model_cpu_offload=False,
        enable_sequential_cpu_offload=False, enable_group_cpu_offload=False,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def _problems(examples, example, model, args, world, device_type="cpu", compressing=True, **inputs):
    module = getattr(examples, example)
    geometry = module.geometry(model["transformer"], model["vae"])
    inputs = {**module.EXAMPLE.defaults, **inputs}
    return examples.validation.problems(
        args, inputs, geometry, world=world, device_type=device_type, compressing=compressing,
        check=module.check,
    )  # fmt: skip


def test_cogvideox_height_names_the_nearest_valid_heights(examples):
    # 480 px = 60 latent rows; 4 ranks x 2-row patches need a multiple of 8 rows (64 px).
    found = _problems(examples, "cogvideox", COGVIDEOX_2B, _args(2, 2), world=4)
    assert len(found) == 1, found
    assert "height 480 px does not split across 4" in found[0]
    assert "multiple of 64 px" in found[0] and "--height 448 or --height 512" in found[0]
    assert _problems(examples, "cogvideox", COGVIDEOX_2B, _args(2, 2), world=4, height=512) == []
    assert _problems(examples, "cogvideox", COGVIDEOX_2B, _args(2), world=2) == []  # 60 % 4 == 0
    cfg = _args(2, use_cfg_parallel=True)  # 4 ranks: CFG 2 x ring 2 keeps 480 px
    assert _problems(examples, "cogvideox", COGVIDEOX_2B, cfg, world=4) == []
    found = _problems(examples, "cogvideox", COGVIDEOX_2B, _args(2), world=2, width=712)
    assert found == [
        "width 712 px is not a multiple of 16 px (8 px per latent column x 2-column patches). "
        "Nearest valid: --width 704 or --width 720"
    ]


def test_flux_height_rule_counts_packed_rows(examples):
    geometry = examples.flux.geometry(FLUX_1["transformer"], FLUX_1["vae"])
    assert geometry == examples.validation.Geometry(row_pixels=16, patch_size=1, heads=24)
    assert _problems(examples, "flux", FLUX_1, _args(2), world=2) == []  # 1024 px, 64 rows
    found = _problems(examples, "flux", FLUX_1, _args(4, 2), world=8, height=1000)
    assert len(found) == 1 and "multiple of 128 px" in found[0]
    assert "--height 896 or --height 1024" in found[0]


def test_xfuser_row_rule_with_pipeline_patches(examples):
    accepts = examples.validation.xfuser_accepts_rows
    assert accepts(64, 4, 2) and not accepts(60, 4, 2) and accepts(60, 2, 2)
    assert not accepts(0, 1, 1) and not accepts(6, 4, 1)  # rows not divisible by sp
    # 3 PipeFusion patches of 40 rows (rounded to 8-row bands) -> 40, 40, 40: fine; 100 rows ->
    # patches of 40, 40 and 20, and 20 is not a whole number of 8-row bands.
    assert accepts(120, 4, 2, 3) and not accepts(100, 4, 2, 3)


def test_flux_text_length_must_split_across_sequence_ranks(examples):
    found = _problems(examples, "flux", FLUX_1, _args(3), world=3, height=1008)
    assert len(found) == 1 and "max_sequence_length 512 must be divisible by" in found[0]
    assert found[0].endswith("Nearest valid: --max_sequence_length 510")  # 513 > 512
    found = _problems(examples, "flux", FLUX_1, _args(2), world=2, max_sequence_length=15)
    assert "--max_sequence_length 14 or --max_sequence_length 16" in found[0]
    found = _problems(examples, "flux", FLUX_1, _args(2), world=2, max_sequence_length=600)
    assert found == ["max_sequence_length 600 must be in 1..512"]
    assert _problems(examples, "flux", FLUX_1, _args(2), world=2, max_sequence_length=16) == []


def test_cogvideox_text_length_fixed_by_sincos_positions(examples):
    found = _problems(
        examples, "cogvideox", COGVIDEOX_2B, _args(2), world=2, max_sequence_length=100
    )
    assert len(found) == 1 and "embeds exactly 226 text positions" in found[0]
    assert (
        _problems(examples, "cogvideox", COGVIDEOX_5B, _args(2), world=2, max_sequence_length=100)
        == []
    )


def test_cpu_offload_refused_without_a_gpu(examples):
    for flag in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        args = _args(2, **{flag: True})
        found = _problems(examples, "flux", FLUX_1, args, world=2)
        assert len(found) == 1 and found[0].startswith(f"--{flag} needs a GPU")
        assert _problems(examples, "flux", FLUX_1, args, world=2, device_type="cuda") == []
    found = _problems(examples, "flux", FLUX_1, _args(2, enable_group_cpu_offload=True), world=2)
    assert "--enable_group_cpu_offload is not supported" in found[0]


def test_parallel_degrees_checked(examples):
    found = _problems(examples, "cogvideox", COGVIDEOX_2B, _args(1, 4), world=4, height=512)
    assert found == [
        "--ulysses_degree 4 must divide the model's 30 attention heads (Ulysses gives each rank "
        "whole heads); possible degrees: [1, 2, 3, 5, 6, 10, 15, 30]"
    ]
    found = _problems(examples, "flux", FLUX_1, _args(2), world=4)
    assert found == [
        "the parallel degrees (ring_degree 2 = 2) must multiply to the number of ranks "
        "(4; torchrun --nproc_per_node)"
    ]
    found = _problems(examples, "flux", FLUX_1, _args(1, use_cfg_parallel=True), world=2)
    assert len(found) == 1 and "refuses CFG parallelism" in found[0]
    pp = _args(1, pipefusion_parallel_degree=2)
    assert "refuses PipeFusion" in _problems(examples, "flux", FLUX_1, pp, world=2)[0]
    assert _problems(examples, "flux", FLUX_1, pp, world=2, compressing=False) == []


def test_check_arguments_reads_configs_not_weights(examples, tmp_path, monkeypatch):
    """A checkpoint is judged by its JSON configs; a wrong or incomplete one is named."""
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's
    common, cogvideox = examples.common, examples.cogvideox
    model = _config_only_checkpoint(tmp_path / "2b", "CogVideoXPipeline", **COGVIDEOX_2B)
    inputs = dict(cogvideox.EXAMPLE.defaults)
    found = common.check_arguments(cogvideox.EXAMPLE, _args(2, 2), inputs, str(model), True, "cpu")
    assert found and "--height 448 or --height 512" in found[0]
    flux = _config_only_checkpoint(tmp_path / "flux", "FluxPipeline", **FLUX_1)
    found = common.check_arguments(cogvideox.EXAMPLE, _args(2, 2), inputs, str(flux), True, "cpu")
    assert found == [
        f"--model {flux} holds a FluxPipeline checkpoint (model_index.json); this example loads "
        "a CogVideoXPipeline"
    ]
    (model / "vae" / "config.json").unlink()
    found = common.check_arguments(cogvideox.EXAMPLE, _args(2, 2), inputs, str(model), True, "cpu")
    assert len(found) == 1 and "cannot read" in found[0] and "vae/config.json" in found[0]
    # No weights found (a path that does not exist): the tiny model's rules apply.
    path, _ = common.resolve_weights(str(tmp_path / "missing"), None)
    tiny = dict(cogvideox.EXAMPLE.tiny_defaults, height=30)
    found = common.check_arguments(cogvideox.EXAMPLE, _args(4), tiny, path, True, "cpu")
    assert len(found) == 1 and "--height 16 or --height 32" in found[0]
