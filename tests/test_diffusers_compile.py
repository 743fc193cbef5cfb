"""compactfusion on diffusers' context parallelism under torch.compile (2 gloo ranks, tiny
models, one spawned world: compiling on a CPU is slow).

- Graph breaks and graphs of the compiled transformer (``transformer.compile``, aot_eager:
  the backend does not matter for breaks), patched vs unpatched, for ring and Ulysses on FLUX,
  and for Qwen-Image with classifier-free guidance (its two branches are separate sites, so the
  patched model compiles one graph per branch: at most one graph more than unpatched).
- Exact: with aot_eager the compiled patched output equals the eager patched output bit for
  bit, also when the model was compiled (and run) before ``patch``; an unpatched pipeline
  compiled in the same process keeps diffusers' own exchange.
- Inductor (default mode, bf16): ``verify_bases`` finds every receiver's base equal to its
  sender's and the int2 error stays within 2x of the eager int2 error.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compactfusion.testing import spawn_ranks

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="needs diffusers==0.42.1"
)

STEPS = 3


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _compiled(pipe, backend="aot_eager"):
    pipe.transformer.compile(backend=backend)
    return pipe


def _uncompiled(pipe):
    pipe.transformer._compiled_call_impl = None  # nn.Module.compile's in-place wrapper
    return pipe


def _counted(run):
    """(output, graph breaks, graphs) of ``run()`` after a dynamo reset."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    out = run()
    return out, sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


def _world(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    from compactfusion.testing import (
        build_diffusers_pipeline,
        enable_context_parallel,
        generate_diffusers,
        prepare_diffusers_cpu,
    )

    prepare_diffusers_cpu()
    import compactfusion as cf

    int2 = cf.CompactConfig(codec="int2", min_numel=0)
    res: dict = {}
    cases = (("flux", {"ring": 2}), ("flux", {"ulysses": 2}), ("qwenimage", {"ulysses": 2}))
    for kind, layout in cases:
        name = f"{kind}_{'_'.join(layout)}"
        cfg = kind == "qwenimage"
        pipe = enable_context_parallel(build_diffusers_pipeline(kind), **layout)

        def generate(p=pipe, kind=kind, cfg=cfg):
            return generate_diffusers(p, kind, steps=STEPS, cfg=cfg)

        with cf.patched(pipe, int2):
            eager = generate()
        _compiled(pipe)
        _, *res[f"{name}_unpatched"] = _counted(generate)
        with cf.patched(pipe, int2):  # patched after the model was compiled and run
            out, *res[f"{name}_patched"] = _counted(generate)
        res[f"{name}_exact"] = torch.equal(out, eager)
        _uncompiled(pipe)

    # A patched and an unpatched pipeline of the same class, both compiled in one process.
    torch._dynamo.reset()
    ring = {"ring": 2}
    patched = enable_context_parallel(build_diffusers_pipeline("flux"), **ring)
    plain = enable_context_parallel(build_diffusers_pipeline("flux"), **ring)
    reference = generate_diffusers(plain, "flux", steps=STEPS)
    with cf.patched(patched, int2):
        eager = generate_diffusers(patched, "flux", steps=STEPS)
        _compiled(patched)
        _compiled(plain)
        res["two_pipes"] = [
            torch.equal(generate_diffusers(patched, "flux", steps=STEPS), eager),
            torch.equal(generate_diffusers(plain, "flux", steps=STEPS), reference),
            torch.equal(generate_diffusers(patched, "flux", steps=STEPS), eager),
        ]

    # Inductor, bf16: bases agree and the error stays close to eager's.
    torch._dynamo.reset()
    pipe = enable_context_parallel(build_diffusers_pipeline("flux", dtype=torch.bfloat16), **ring)
    reference = generate_diffusers(pipe, "flux", steps=STEPS)
    with cf.patched(pipe, int2):
        res["eager_int2"] = rel(generate_diffusers(pipe, "flux", steps=STEPS), reference)
    cf.patch(pipe, int2.replace(verify=True))  # verify=True: raises if any base differs
    _compiled(pipe, backend="inductor")
    res["inductor_int2"] = rel(generate_diffusers(pipe, "flux", steps=STEPS), reference)
    res["inductor_verify"] = cf.verify_bases(pipe)
    cf.unpatch(pipe)
    return res


def test_compiled_diffusers_context_parallelism():
    results = spawn_ranks(_world, 2, timeout=900)
    for res in results:
        for name in ("flux_ring", "flux_ulysses", "qwenimage_ulysses"):
            (breaks, graphs), (plain_breaks, plain_graphs) = (
                res[f"{name}_patched"],
                res[f"{name}_unpatched"],
            )
            extra = 1 if name.startswith("qwenimage") else 0  # one graph per guidance branch
            assert breaks <= plain_breaks and graphs <= plain_graphs + extra, (name, res)
            assert res[f"{name}_exact"], name
        assert res["two_pipes"] == [True] * 3, res["two_pipes"]
        verdict = res["inductor_verify"]
        assert verdict["agree"] and verdict["sites_checked"] > 0, verdict
        assert 0 < res["inductor_int2"] <= 2 * res["eager_int2"], res
