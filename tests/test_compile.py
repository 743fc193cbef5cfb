"""compactfusion under torch.compile on real xfuser 0.7.0 pipelines (tiny bf16 FLUX, 2 gloo
ranks, one spawned world for all checks: compiling on a CPU is slow).

- Graph breaks of the compiled transformer, patched vs unpatched, for ring attention in the
  ``allgather`` mode and for Ulysses (dynamo's counters; the backend does not matter for
  breaks, so ``aot_eager`` keeps it fast).
- Exact under inductor: with xfuser's own ``use_torch_compile`` (the transformer is compiled
  when the pipeline is wrapped, *before* ``patch``) and with ``torch.compile(transformer)``
  (*after* ``patch``), ``verify_bases`` finds every receiver's base equal to its sender's and
  the int2 error stays within 2x of the eager int2 error.
- Two pipelines of the same transformer class, one patched and one not, compiled in one
  process: each keeps its own graph (the patched pipeline's exchange is not baked into the
  other's, nor skipped in its own).
- ``CompactConfig(verify=True)``: a base changed on one rank during a generation makes the
  pipeline call raise ``BaseDivergenceError`` on every rank.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compactfusion.testing import spawn_ranks

pytestmark = [
    pytest.mark.xfuser,
    pytest.mark.skipif(
        importlib.util.find_spec("xfuser") is None, reason="needs the xdit extra (xfuser==0.7.0)"
    ),
]

STEPS = 3
SIZES = {"num_layers": 1, "num_single_layers": 1}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _build(ring, ulysses, use_torch_compile=False):
    """A tiny bf16 xfuser FLUX pipeline; with ``use_torch_compile`` xfuser compiles the
    transformer's forward itself while wrapping the pipeline, as its runner does."""
    import xfuser

    from compactfusion.testing import tiny_pipelines as tp

    if not use_torch_compile:
        return tp.build_pipeline("flux", ring=ring, ulysses=ulysses, dtype=torch.bfloat16, **SIZES)
    engine_config = tp.build_engine_config(ring, ulysses, dtype=torch.bfloat16)
    engine_config.runtime_config.use_torch_compile = True
    tp.init_xfuser_distributed(engine_config)
    return xfuser.xFuserFluxPipeline(tp.tiny_flux(dtype=torch.bfloat16, **SIZES), engine_config)


def _graph_breaks(pipe, config):
    """(graph breaks, graphs) of the transformer compiled with aot_eager, over one generation
    (patched with ``config`` unless it is None)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import compactfusion as cf
    from compactfusion.testing.tiny_pipelines import generate

    torch._dynamo.reset()
    counters.clear()
    transformer = pipe.module.transformer
    eager_forward = transformer.forward
    transformer.forward = torch.compile(eager_forward, backend="aot_eager")
    try:
        if config is None:
            generate(pipe, "flux", steps=STEPS)
        else:
            with cf.patched(pipe, config):
                generate(pipe, "flux", steps=STEPS)
    finally:
        transformer.forward = eager_forward
    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def _world(rank, world):
    from compactfusion.testing import prepare_xfuser_cpu

    prepare_xfuser_cpu()
    import compactfusion as cf
    from compactfusion import CompactConfig
    from compactfusion.integrations.state import STATE_ATTR
    from compactfusion.testing.tiny_pipelines import generate

    res = {}
    int2 = CompactConfig(codec="int2", min_numel=0)
    # Graph breaks: Ulysses, then ring attention (allgather mode).
    pipe = _build(1, 2)
    res["ulysses_unpatched"] = _graph_breaks(pipe, None)
    res["ulysses_patched"] = _graph_breaks(pipe, int2)
    pipe = _build(2, 1)
    res["ring_unpatched"] = _graph_breaks(pipe, None)
    res["ring_patched"] = _graph_breaks(pipe, int2)
    # Eager references on the same world.
    reference = generate(pipe, "flux", steps=STEPS)
    with cf.patched(pipe, int2):
        eager_int2 = generate(pipe, "flux", steps=STEPS)
    res["eager_int2"] = rel(eager_int2, reference)
    # An unpatched and a patched pipeline compiled in one process keep separate graphs (the
    # same transformer code): each compiled output equals its eager output (aot_eager).
    other = _build(2, 1)
    cf.patch(other, int2)
    torch._dynamo.reset()
    for p in (pipe, other):
        p.module.transformer.forward = torch.compile(
            p.module.transformer.forward, backend="aot_eager"
        )
    res["two_pipes"] = [
        torch.equal(generate(pipe, "flux", steps=STEPS), reference),
        torch.equal(generate(other, "flux", steps=STEPS), eager_int2),
        torch.equal(generate(pipe, "flux", steps=STEPS), reference),
    ]
    cf.unpatch(other)
    del pipe.module.transformer.forward  # back to the class's forward (eager)
    # torch.compile(transformer), default inductor, compiled after patch.
    torch._dynamo.reset()
    cf.patch(pipe, int2.replace(verify=True))
    pipe.module.transformer = torch.compile(pipe.module.transformer)
    out = generate(pipe, "flux", steps=STEPS)  # verify=True: raises if any base differs
    res["module_int2"] = rel(out, reference)
    res["module_verify"] = cf.verify_bases(pipe)
    res["module_repeat"] = torch.equal(generate(pipe, "flux", steps=STEPS), out)
    cf.unpatch(pipe)
    # xfuser's use_torch_compile: compiled when wrapped, then patched.
    torch._dynamo.reset()
    pipe = _build(2, 1, use_torch_compile=True)
    cf.patch(pipe, int2)
    res["xfuser_int2"] = rel(generate(pipe, "flux", steps=STEPS), reference)
    res["xfuser_verify"] = cf.verify_bases(pipe)
    cf.unpatch(pipe)
    # verify=True catches a base that differs (changed after the last step, on rank 1 only).
    pipe = _build(2, 1)
    cf.patch(pipe, int2.replace(verify=True))
    state = getattr(pipe, STATE_ATTR)

    def corrupt(module, args, output):
        if rank == 1 and state.step == STEPS:
            key, base = state.compressor.base_items()[0]
            base.view(-1)[0] += 1

    pipe.module.transformer.register_forward_hook(corrupt)
    try:
        generate(pipe, "flux", steps=STEPS)
        res["verify_error"] = None
    except cf.BaseDivergenceError as exc:
        res["verify_error"] = str(exc)
    return res


def test_compiled_patched_transformer():
    results = spawn_ranks(_world, 2, timeout=900)
    for res in results:
        for par in ("ulysses", "ring"):
            breaks, graphs = res[f"{par}_patched"]
            assert breaks <= res[f"{par}_unpatched"][0], (par, res)
            assert graphs <= res[f"{par}_unpatched"][1], (par, res)
        for entry in ("module", "xfuser"):
            verdict = res[f"{entry}_verify"]
            assert verdict["agree"] and verdict["sites_checked"] > 0, verdict
            assert 0 < res[f"{entry}_int2"] <= 2 * res["eager_int2"], res
        assert res["module_repeat"] and res["two_pipes"] == [True] * 3, res["two_pipes"]
        assert (
            res["verify_error"] is not None
            and "differ between sender and receivers" in (res["verify_error"])
        )
