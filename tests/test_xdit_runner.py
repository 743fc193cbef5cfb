"""compactfusion.patch on xfuser 0.7's model runner: plain diffusers pipelines around xfuser's
transformer wrappers (Wan 2.1/2.2, HunyuanVideo, FLUX.2, Qwen-Image), the runner's own model
classes, and the ``compactfusion-xdit`` launcher. Tiny random models on spawned gloo ranks;
each spawn groups many checks (starting ranks and importing xfuser costs ~15 s).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compactfusion.testing import spawn_ranks

pytestmark = [
    pytest.mark.xfuser,
    pytest.mark.skipif(
        importlib.util.find_spec("xfuser") is None, reason="needs the xdit extra (xfuser==0.7.0)"
    ),
]

ROOT = Path(__file__).resolve().parents[1]
EXACT = 1e-5  # codec raw vs the unpatched run (relative L2)
INT2 = 0.05  # documented bound for int2 on the tiny models (relative L2)
MODELS = ("wan2.1", "hunyuanvideo", "flux2", "qwen-image")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def layer_names(stats: dict) -> list[str]:
    """The layer names in ``stats["sites"]`` (keys are reprs of ``("<layer>/<kind>", ...)``)."""
    import ast

    return sorted({ast.literal_eval(key)[0].rsplit("/", 1)[0] for key in stats["sites"]})


def _setup():
    if not torch.cuda.is_available():
        from compactfusion.testing import prepare_xfuser_cpu

        prepare_xfuser_cpu()


def _modes(pipe, kind, gen):
    """(raw vs plain, int2 vs plain, int2 ratio after warm-up, unpatched again == plain)."""
    import compactfusion as cf
    from compactfusion import CompactConfig

    plain = gen(pipe)
    with cf.patched(pipe, "raw"):
        raw = gen(pipe)
    with cf.patched(pipe, CompactConfig(codec="int2", min_numel=0)):
        lossy = gen(pipe)
        ratio = cf.stats(pipe)["ratio_after_warmup"]
    return rel(raw, plain), rel(lossy, plain), ratio, torch.equal(gen(pipe), plain)


# --------------------------------------------------------------------------------------------
def _pipeline_checks(rank, world):
    _setup()
    import compactfusion as cf
    from compactfusion import CompactConfig
    from compactfusion.testing.tiny_runner_models import runner_generate, runner_pipeline

    res: dict = {}
    for kind in MODELS:
        for degrees in ({"ulysses": 2}, {"ring": 2}):
            pipe = runner_pipeline(kind, **degrees)
            res[f"{kind} {degrees}"] = _modes(pipe, kind, lambda p, k=kind: runner_generate(p, k))

    # Wan 2.1 with classifier-free guidance: two transformer calls per step, one base per branch.
    pipe = runner_pipeline("wan2.1", ring=2)
    int2 = CompactConfig(codec="int2", min_numel=0)
    for name, guidance in (("cfg_off", 1.0), ("cfg_on", 5.0)):
        plain = runner_generate(pipe, "wan2.1", steps=4, guidance_scale=guidance)
        with cf.patched(pipe, "raw"):
            raw = runner_generate(pipe, "wan2.1", steps=4, guidance_scale=guidance)
        with cf.patched(pipe, int2):
            lossy = runner_generate(pipe, "wan2.1", steps=4, guidance_scale=guidance)
            sites = layer_names(cf.stats(pipe))
        res[name] = (rel(raw, plain), rel(lossy, plain), sites)
    # Two generations in a row, the second at another resolution.
    gen = lambda size: runner_generate(pipe, "wan2.1", height=size, width=size)  # noqa: E731
    plain_32, plain_48 = gen(32), gen(48)
    with cf.patched(pipe, "raw"):
        res["two_gens_raw"] = max(rel(gen(32), plain_32), rel(gen(48), plain_48))
    with cf.patched(pipe, int2):
        a, b = gen(32), gen(48)
        res["two_gens_generations"] = cf.stats(pipe)["generations"]
    res["two_gens_int2"] = (rel(a, plain_32), rel(b, plain_48))

    # Wan 2.2: two experts, their sites never collide.
    pipe = runner_pipeline("wan2.2", ulysses=2)
    res["wan2.2"] = _modes(pipe, "wan2.2", lambda p: runner_generate(p, "wan2.2", steps=4))
    with cf.patched(pipe, int2):
        runner_generate(pipe, "wan2.2", steps=4)
        res["wan2.2_layers"] = layer_names(cf.stats(pipe))

    # Bytes on the wire (bf16, shards of >= 64K elements): ring and Ulysses.
    for degrees in ({"ring": 2}, {"ulysses": 2}):
        pipe = runner_pipeline("wan2.1", dtype=torch.bfloat16, heads=4, head_dim=64, **degrees)
        per_step = {}
        for codec in ("raw", "int2"):
            with cf.patched(pipe, CompactConfig(codec=codec, warmup_steps=1)):
                runner_generate(pipe, "wan2.1", steps=3, height=128, width=128)
                per_step[codec] = cf.stats(pipe)["bytes_per_step"]
        res[f"bytes {degrees}"] = per_step

    # Step caching (xfuser's in-tree FBCache for FLUX.2, applied after patching as the runner
    # does): cached steps skip the blocks, so their sites skip those steps on every rank alike.
    from xfuser.model_executor.cache.adapters import apply_cache

    steps = 8
    for degrees in ({"ring": 2}, {"ulysses": 2}):
        pipe = runner_pipeline("flux2", **degrees)
        with cf.patched(pipe, int2):
            lossy_uncached = runner_generate(pipe, "flux2", steps=steps)
        uncached = runner_generate(pipe, "flux2", steps=steps)
        cf.patch(pipe, int2)
        apply_cache("fbcache", num_steps=steps, pipe=pipe)
        lossy = runner_generate(pipe, "flux2", steps=steps)
        calls = sorted({site["calls"] for site in cf.stats(pipe)["sites"].values()})
        cf.unpatch(pipe)
        plain = runner_generate(pipe, "flux2", steps=steps)
        with cf.patched(pipe, "raw"):
            raw = runner_generate(pipe, "flux2", steps=steps)
        res[f"fbcache {degrees}"] = dict(
            raw=rel(raw, plain),
            int2=rel(lossy, plain),
            int2_uncached=rel(lossy_uncached, uncached),
            cache_effect=rel(plain, uncached),
            calls=calls,
        )

    # Refusals: xfuser's own FP8 communication.
    from xfuser.core.distributed import get_runtime_state

    runtime = get_runtime_state().runtime_config
    runtime.use_fp8_comms = True
    try:
        cf.patch(pipe)
        res["fp8_error"] = None
    except ValueError as exc:
        res["fp8_error"] = str(exc)
    finally:
        runtime.use_fp8_comms = False
    res["is_patched_after_refusal"] = cf.is_patched(pipe)
    return res


@pytest.mark.timeout(400)
def test_runner_pipelines_two_ranks():
    results = spawn_ranks(_pipeline_checks, 2, timeout=380)
    for res in results:
        for kind in MODELS:
            for degrees in ({"ulysses": 2}, {"ring": 2}):
                raw, lossy, ratio, unpatched_equal = res[f"{kind} {degrees}"]
                assert raw < EXACT, (kind, degrees, raw)
                assert 0 < lossy < INT2, (kind, degrees, lossy)
                assert ratio > 3 and unpatched_equal, (kind, degrees, ratio)
        # CFG: raw stays exact; int2 error with guidance stays close to the one without.
        raw_off, int2_off, sites_off = res["cfg_off"]
        raw_on, int2_on, sites_on = res["cfg_on"]
        assert raw_off < EXACT and raw_on < EXACT
        assert 0 < int2_on < INT2 and int2_on < 3 * int2_off, (int2_on, int2_off)
        # WanPipeline marks even the single call with cache_context("cond").
        assert {s.rsplit("@", 1)[-1] for s in sites_off} == {"cond"}, sites_off
        assert {s.rsplit("@", 1)[-1] for s in sites_on} == {"cond", "uncond"}, sites_on
        assert res["two_gens_raw"] < EXACT and res["two_gens_generations"] == 2
        assert all(0 < e < INT2 for e in res["two_gens_int2"]), res["two_gens_int2"]
        raw, lossy, _, unpatched_equal = res["wan2.2"]
        assert raw < EXACT and 0 < lossy < INT2 and unpatched_equal
        layers = res["wan2.2_layers"]
        assert any(s.startswith("transformer_2.blocks.") for s in layers), layers
        assert any(s.startswith("blocks.") for s in layers), layers
        for degrees in ({"ring": 2}, {"ulysses": 2}):
            per_step = res[f"bytes {degrees}"]
            raw_bf16 = per_step["raw"][0]
            assert all(b == raw_bf16 for b in per_step["raw"]), per_step
            # Warm-up step sent raw: the raw bf16 bytes plus the payload headers (codec "raw"
            # itself travels as plain collectives, without headers).
            assert raw_bf16 <= per_step["int2"][0] <= raw_bf16 * 1.01, per_step
            assert all(raw_bf16 / b >= 7 for b in per_step["int2"][1:]), (degrees, per_step)
        for degrees in ({"ring": 2}, {"ulysses": 2}):
            fb = res[f"fbcache {degrees}"]
            assert fb["cache_effect"] > 0 and min(fb["calls"]) < max(fb["calls"]), fb  # skipped
            assert fb["raw"] < EXACT, fb
            assert 0 < fb["int2"] < INT2 and fb["int2"] < 3 * fb["int2_uncached"], fb
        assert "use_fp8_comms" in res["fp8_error"]
        assert res["is_patched_after_refusal"] is False


# --------------------------------------------------------------------------------------------
def _aot_eager_compile():
    """``torch.compile`` with the aot_eager backend while the block runs (xfuser's runner
    calls ``torch.compile(component, mode=..., dynamic=...)``)."""
    import functools
    from unittest import mock

    return mock.patch.object(
        torch, "compile", functools.partial(torch.compile, backend="aot_eager")
    )


def _runner_model_checks(rank, world, path):
    _setup()
    import compactfusion as cf
    from compactfusion import CompactConfig
    from compactfusion.integrations.xdit_runner import patch_when_initialized
    from compactfusion.testing.tiny_runner_models import local_runner_model, runner_generate

    res: dict = {}
    inputs = {"prompt": "a cat", "num_inference_steps": 4, "height": 32, "width": 32,
              "num_frames": 5, "guidance_scale": 1.0, "guidance_scale_2": 1.0,
              "seed": 1}  # fmt: skip
    # --use_torch_compile: the runner compiles the patched transformers and warms them up
    # (aot_eager instead of inductor: the same dynamo tracing of the exchange, quicker).
    compiled = local_runner_model("wan2.2", path, ulysses_degree=2, use_torch_compile=True)
    patch_when_initialized(compiled, CompactConfig(codec="int2", min_numel=0))
    with _aot_eager_compile():
        compiled.initialize(
            compiled.preprocess_args(dict(inputs, dataset_path=None, input_images=[]))
        )
    res["compiled_class"] = type(compiled.pipe.transformer).__name__
    compiled.pipe.to(torch.float32)
    with torch.no_grad():
        compiled_int2 = runner_generate(compiled.pipe, "wan2.2", steps=4)
    res["compiled_verify"] = cf.verify_bases(compiled)
    cf.unpatch(compiled)
    model = local_runner_model("wan2.2", path, ulysses_degree=2)
    patch_when_initialized(model, CompactConfig(codec="int2", min_numel=0))
    model.initialize(model.preprocess_args(dict(inputs, dataset_path=None, input_images=[])))
    pipe = model.pipe
    res["patched_after_initialize"] = (cf.is_patched(model), cf.is_patched(pipe))
    res["pipeline_class"] = type(pipe).__name__
    # The runner loads bf16: compare in float32 so that raw vs unpatched is meaningful.
    pipe.to(torch.float32)
    with torch.no_grad():
        lossy = runner_generate(pipe, "wan2.2", steps=4)
        layers = layer_names(cf.stats(model))
        # The prompt path (tokenizer + text encoder from the checkpoint) runs patched too.
        texted = pipe(prompt="a cat", num_inference_steps=2, height=32, width=32,
                      num_frames=5, guidance_scale=1.0, output_type="latent").frames  # fmt: skip
    res["layers"] = layers
    res["texted_finite"] = bool(torch.isfinite(texted).all())
    cf.unpatch(model)
    res["patched_after_unpatch"] = (cf.is_patched(model), cf.is_patched(pipe))
    plain = runner_generate(pipe, "wan2.2", steps=4)
    with cf.patched(model, "raw"):
        raw = runner_generate(pipe, "wan2.2", steps=4)
    res["raw"], res["int2"] = rel(raw, plain), rel(lossy, plain)
    res["compiled_int2"] = rel(compiled_int2, plain)
    res["unpatched_equal"] = torch.equal(runner_generate(pipe, "wan2.2", steps=4), plain)
    return res


@pytest.mark.timeout(400)
def test_runner_model_class_wan22(tmp_path):
    from compactfusion.testing.tiny_runner_models import save_tiny_checkpoint

    path = save_tiny_checkpoint("wan2.2", tmp_path / "tiny-wan2.2")
    results = spawn_ranks(_runner_model_checks, 2, str(path), timeout=380)
    for res in results:
        assert res["compiled_class"] == "OptimizedModule"
        assert res["compiled_verify"]["agree"] and res["compiled_verify"]["sites_checked"] > 0
        assert 0 < res["compiled_int2"] <= 2 * res["int2"], res
        assert res["patched_after_initialize"] == (True, True)
        assert res["pipeline_class"] == "WanPipeline"
        assert any(s.startswith("transformer_2.") for s in res["layers"]), res["layers"]
        assert res["texted_finite"]
        assert res["patched_after_unpatch"] == (False, False)
        assert res["raw"] < EXACT and 0 < res["int2"] < INT2, res
        assert res["unpatched_equal"]


# --------------------------------------------------------------------------------------------
def _four_rank_checks(rank, world):
    _setup()
    from compactfusion.testing.tiny_runner_models import runner_generate, runner_pipeline

    pipe = runner_pipeline("wan2.1", ring=2, ulysses=2, heads=4)
    return _modes(pipe, "wan2.1", lambda p: runner_generate(p, "wan2.1"))


@pytest.mark.timeout(400)
def test_four_ranks_ring_x_ulysses_wan():
    for raw, lossy, ratio, unpatched_equal in spawn_ranks(_four_rank_checks, 4, timeout=380):
        assert raw < EXACT and 0 < lossy < INT2 and ratio > 3 and unpatched_equal


# --------------------------------------------------------------------------------------------
def test_plain_pipeline_without_xfuser_attention_is_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    import compactfusion as cf
    from compactfusion.testing.tiny_runner_models import tiny_transformer

    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=tiny_transformer("wan2.1", xfuser=False),
    )  # fmt: skip
    with pytest.raises(TypeError, match="does not go through xfuser's USP"):
        cf.patch(pipe)
    with pytest.raises(TypeError, match="has no transformer"):
        cf.patch(WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None))
    assert not cf.is_patched(pipe)


def test_compactfusion_xdit_help_shows_both_flag_sets():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '\ncompactfusion-xdit = "compactfusion.cli.xdit:main"\n' in pyproject
    code = "from compactfusion.cli.xdit import main; main(['--help'])"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--ulysses_degree", "--ring_degree", "--use_torch_compile", "--cache_method",
                 "--compact-codec", "--compact-codec-params", "--compact-mode",
                 "--compact-warmup", "--compact-policy", "--compact-link", "--compact-off",
                 "--compact-compare"):  # fmt: skip
        assert flag in proc.stdout, flag
