"""compactfusion.patch on diffusers' own context parallelism (enable_parallelism), no xfuser.

Tiny random FLUX.1, Wan 2.1, Qwen-Image and FLUX.2 pipelines on 2 spawned gloo ranks, each with
ring_degree=2 and with ulysses_degree=2; Wan and Qwen-Image always run classifier-free guidance
(two transformer calls per step, inside cache_context("cond") / ("uncond")). All multi-rank
checks share one spawned world (starting ranks costs ~15 s on the CI machine); the unified mode
(both degrees > 1, 4 ranks) is in test_diffusers_cp_unified.py.
"""

from __future__ import annotations

import ast
import importlib.util
import json

import pytest
import torch

from compactfusion.testing import spawn_ranks

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="needs diffusers==0.42.1"
)

# Relative L2 error of the final latents against unpatched context parallelism.
EXACT = 1e-5  # codec raw: Ulysses is bit-exact; ring attends once over the gathered K/V
LOSSY_INT2 = 0.02  # int2, 3 steps, tiny fp32 models: measured 2e-4 .. 3e-3
LAYOUTS = ({"ring": 2}, {"ulysses": 2})
KINDS = ("flux", "wan", "qwenimage", "flux2")
CFG_KINDS = ("wan", "qwenimage")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def _run_example(out_dir: str) -> dict:
    """examples/diffusers_cp_example.py in this (already initialised) world, 2 steps."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "diffusers_cp_example.py"
    spec = importlib.util.spec_from_file_location("diffusers_cp_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example.main(["--ring", "2", "--steps", "2", "--compare", "--output-dir", out_dir])


def _two_rank_checks(rank, world, out_dir):
    _quiet()
    from compactfusion.testing import (
        build_diffusers_pipeline,
        enable_context_parallel,
        generate_diffusers,
        prepare_diffusers_cpu,
    )

    prepare_diffusers_cpu()
    import compactfusion as cf
    from compactfusion import CompactConfig
    from compactfusion.testing.wire import counting_sent_bytes

    raw, int2 = CompactConfig(codec="raw"), CompactConfig(codec="int2", min_numel=0)
    res: dict = {}

    # Every model x layout: raw == unpatched, int2 close but not exact, unpatch exact.
    pipes, plains = {}, {}
    for kind in KINDS:
        for layout in LAYOUTS:
            name = f"{kind}_{'_'.join(layout)}"
            pipe = enable_context_parallel(build_diffusers_pipeline(kind), **layout)
            pipes[name] = pipe
            cfg = kind in CFG_KINDS
            plain = plains[name] = generate_diffusers(pipe, kind, cfg=cfg)
            with cf.patched(pipe, raw):
                res[f"{name}/raw"] = rel(generate_diffusers(pipe, kind, cfg=cfg), plain)
            with cf.patched(pipe, int2):
                res[f"{name}/int2"] = rel(generate_diffusers(pipe, kind, cfg=cfg), plain)
                st = cf.stats(pipe)
            res[f"{name}/unpatched_equal"] = torch.equal(
                generate_diffusers(pipe, kind, cfg=cfg), plain
            )
            res[f"{name}/calls"] = st["steps"]
            # site keys: ("<layer>/kv", src) or ("<layer>/a2a<n>", src, dst)
            sites = [ast.literal_eval(k)[0].rsplit("/", 1) for k in st["sites"]]
            res[f"{name}/layers"] = sorted({layer for layer, _ in sites})
            res[f"{name}/site_kinds"] = sorted({kind.rstrip("0123456789") for _, kind in sites})

    # Wan 2.2-style two-stage pipeline: both transformers patched, layer names prefixed.
    pipe = enable_context_parallel(build_diffusers_pipeline("wan", two_stage=True), ring=2)
    plain = generate_diffusers(pipe, "wan", steps=4, cfg=True)
    with cf.patched(pipe, raw):
        res["wan22_raw"] = rel(generate_diffusers(pipe, "wan", steps=4, cfg=True), plain)
    with cf.patched(pipe, int2):
        res["wan22_int2"] = rel(generate_diffusers(pipe, "wan", steps=4, cfg=True), plain)
        layers = {ast.literal_eval(k)[0].rsplit("/", 1)[0] for k in cf.stats(pipe)["sites"]}
    res["wan22_components"] = sorted({layer.split(".")[0] for layer in layers})

    # Ring relay and stale modes on FLUX ring=2.
    pipe = pipes["flux_ring"]
    plain = generate_diffusers(pipe, "flux")
    for mode in ("ring", "stale"):
        for codec in ("raw", "int2"):
            with cf.patched(pipe, CompactConfig(codec=codec, mode=mode, min_numel=0)):
                res[f"mode_{mode}_{codec}"] = rel(generate_diffusers(pipe, "flux"), plain)

    # Two generations in a row, the second at another resolution.
    plain_48 = generate_diffusers(pipe, "flux", height=48, width=48)
    for config in (raw, int2):
        with cf.patched(pipe, config):
            a = generate_diffusers(pipe, "flux")
            b = generate_diffusers(pipe, "flux", height=48, width=48)
            res[f"two_gens_{config.codec}_generations"] = cf.stats(pipe)["generations"]
        res[f"two_gens_{config.codec}"] = (rel(a, plain), rel(b, plain_48))

    # Bytes on the wire, bf16 models: int2 payloads after the warm-up call of each site against
    # the raw bf16 K/V (ring) or q/k/v/output (Ulysses) they replace.
    for layout in LAYOUTS:
        name = "_".join(layout)
        pipe = enable_context_parallel(
            build_diffusers_pipeline("flux", dtype=torch.bfloat16, head_dim=64), **layout
        )
        with cf.patched(pipe, CompactConfig(codec="int2")):
            with counting_sent_bytes() as sent:
                generate_diffusers(pipe, "flux", steps=4)
            st = cf.stats(pipe)
        res[f"bytes_{name}"] = {
            "payload": st["bytes_per_step"],
            "raw_bf16": st["raw_bytes_per_step"],
            "counted": sent.bytes,
            "min_site_numel": min(s["raw_bytes"] // 2 // 4 for s in st["sites"].values()),
        }

    # A transformer patched on its own, driven inside compactfusion.generation().
    pipe = pipes["wan_ulysses"]
    plain = generate_diffusers(pipe, "wan", cfg=True)
    cf.patch(pipe.transformer, int2)
    try:
        generate_diffusers(pipe, "wan", cfg=True)
        res["model_outside_generation"] = None
    except RuntimeError as exc:
        res["model_outside_generation"] = str(exc)
    try:
        cf.patch(pipe, int2)
        res["pipe_over_patched_model"] = None
    except ValueError as exc:
        res["pipe_over_patched_model"] = str(exc)
    with cf.generation(pipe.transformer):
        out = generate_diffusers(pipe, "wan", cfg=True)
    res["model_int2"] = rel(out, plain)
    layers = {ast.literal_eval(k)[0].rsplit("/", 1)[0] for k in cf.stats(pipe.transformer)["sites"]}
    res["model_branches"] = sorted({layer.split("@")[-1] for layer in layers})
    cf.unpatch(pipe.transformer)
    res["model_unpatched_equal"] = torch.equal(generate_diffusers(pipe, "wan", cfg=True), plain)

    # Two pipelines patched at once share the swapped classes (reference counted); a third,
    # unpatched pipeline in the same process runs diffusers' own code path; unpatch restores
    # diffusers' classes, the pipeline class and the transformer.
    from diffusers.models import attention_dispatch

    names = ("TemplatedRingAttention", "TemplatedUlyssesAttention", "SeqAllToAllDim")
    originals = [getattr(attention_dispatch, n) for n in names]
    a, b = pipes["flux_ring"], pipes["flux_ulysses"]
    pipe_class = type(a)
    cf.patch(a, int2)
    cf.patch(b, raw)
    res["swapped"] = all(
        getattr(attention_dispatch, n) is not o for n, o in zip(names, originals, strict=True)
    )
    res["other_pipe_untouched"] = torch.equal(
        generate_diffusers(pipes["flux2_ring"], "flux2"), plains["flux2_ring"]
    )
    cf.unpatch(a)
    out = generate_diffusers(b, "flux")
    res["second_still_patched"] = (rel(out, plains["flux_ulysses"]), cf.stats(b)["steps"])
    cf.unpatch(b)
    res["restored"] = (
        [getattr(attention_dispatch, n) for n in names] == originals
        and type(a) is pipe_class
        and not any(hasattr(p.transformer, "_compactfusion_owner") for p in (a, b))
        and not any("cache_context" in vars(p.transformer) for p in (a, b))
    )

    # Ranks configured differently fail with the same clear error on every rank.
    pipe = pipes["qwenimage_ring"]
    try:
        with cf.patched(pipe, CompactConfig(codec="int2" if rank == 0 else "int1")):
            generate_diffusers(pipe, "qwenimage")
        res["mismatch"] = None
    except cf.ConfigMismatchError as exc:
        res["mismatch"] = str(exc)

    res["example"] = _run_example(out_dir)
    return res


@pytest.mark.timeout(300)
def test_diffusers_context_parallel_two_ranks(tmp_path):
    results = spawn_ranks(_two_rank_checks, 2, str(tmp_path), timeout=280)
    for res in results:
        for kind in KINDS:
            for layout in LAYOUTS:
                name = f"{kind}_{'_'.join(layout)}"
                assert res[f"{name}/raw"] < EXACT, (name, res[f"{name}/raw"])
                assert 1e-6 < res[f"{name}/int2"] < LOSSY_INT2, (name, res[f"{name}/int2"])
                assert res[f"{name}/unpatched_equal"] is True, name
                expected = {"kv"} if "ring" in layout else {"a2a"}
                assert res[f"{name}/site_kinds"] == sorted(expected), (name, res)
                steps = 6 if kind in CFG_KINDS else 3
                assert res[f"{name}/calls"] == steps, (name, res[f"{name}/calls"])
                if kind in CFG_KINDS:  # each guidance branch keeps its own bases
                    branches = {layer.split("@")[-1] for layer in res[f"{name}/layers"]}
                    assert branches == {"cond", "uncond"}, (name, res[f"{name}/layers"])
        assert res["flux_ulysses/raw"] == 0.0  # same values in the same layout
        assert res["wan22_raw"] < EXACT and 1e-6 < res["wan22_int2"] < LOSSY_INT2, res
        assert res["wan22_components"] == ["transformer", "transformer_2"], res
        assert res["mode_ring_raw"] < EXACT and res["mode_stale_raw"] > 1e-4, res  # stale K/V
        assert 1e-6 < res["mode_ring_int2"] < LOSSY_INT2, res
        assert 0 < res["mode_stale_int2"] < 0.05 + LOSSY_INT2, res
        assert max(res["two_gens_raw"]) < EXACT, res
        assert max(res["two_gens_int2"]) < LOSSY_INT2, res
        assert res["two_gens_raw_generations"] == 2 == res["two_gens_int2_generations"]
        for layout in LAYOUTS:
            b = res[f"bytes_{'_'.join(layout)}"]
            assert b["min_site_numel"] >= 1024, b  # every site compressible (min_numel)
            after = list(zip(b["raw_bf16"][1:], b["payload"][1:], strict=True))
            assert all(raw / payload >= 7.0 for raw, payload in after), b
            # What reached torch.distributed: the stats' payloads plus the 32-byte config hash
            # (an all-to-all buffer also has a row for the rank itself, which stays local).
            rows = 2 if "ulysses" in layout else 1
            assert b["counted"] == rows * sum(b["payload"]) + 32, b
        assert "compactfusion.generation" in res["model_outside_generation"]
        assert "already patched" in res["pipe_over_patched_model"]
        assert 1e-6 < res["model_int2"] < LOSSY_INT2
        assert res["model_branches"] == ["cond", "uncond"]
        assert res["model_unpatched_equal"] is True
        assert res["swapped"] and res["other_pipe_untouched"] and res["restored"], res
        assert res["second_still_patched"] == (0.0, 3), res  # raw Ulysses: bit-exact
        assert "differs across ranks" in res["mismatch"]
        example = res["example"]  # tiny bf16 FLUX, 4 heads x 64, 64x64 px, 2 steps
        assert example["ring"] == 2 and example["ratio_after_warmup"] >= 7.0, example
        assert 0 < example["relative_l2_vs_uncompressed"] < LOSSY_INT2, example
    written = json.loads((tmp_path / "stats.json").read_text())  # by rank 0
    assert written["bytes_per_step"] == results[0]["example"]["bytes_per_step"]


# --------------------------------------------------------------------------------------------
# In-process checks (no process group needed)
# --------------------------------------------------------------------------------------------
def test_plain_diffusers_pipeline_error_names_both_routes():
    import compactfusion as cf
    from compactfusion.testing import build_diffusers_pipeline

    pipe = build_diffusers_pipeline("flux")
    for target in (pipe, pipe.transformer):
        with pytest.raises(TypeError) as info:
            cf.patch(target)
        assert "enable_parallelism" in str(info.value) and "xfuser" in str(info.value)


def test_generation_needs_a_patched_model():
    import compactfusion as cf

    with pytest.raises(ValueError, match="not patched"):
        with cf.generation(torch.nn.Linear(2, 2)):
            pass


def test_prepare_diffusers_cpu_refuses_cuda(monkeypatch):
    from compactfusion.testing import prepare_diffusers_cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CPU-only"):
        prepare_diffusers_cpu()
