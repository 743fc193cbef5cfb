"""compactfusion on diffusers' context parallelism under torch.compile (2 gloo ranks, tiny
models, one spawned world: compiling on a CPU is slow).

- Graph breaks and graphs of the compiled transformer (``transformer.compile``, aot_eager:
  the backend does not matter for breaks), patched vs unpatched, for ring attention on FLUX
  and for Ulysses on Qwen-Image with classifier-free guidance (its two branches are separate
  sites, so the patched model compiles one graph per branch: at most one graph more than
  unpatched).
- Exact: with aot_eager the compiled patched output equals the eager patched output bit for
  bit, also when the model was compiled (and run) before ``patch``; an unpatched pipeline
  compiled in the same process keeps diffusers' own exchange.

Inductor is checked on the xfuser path (tests/test_compile.py: the same custom ops carry the
exchange, so inductor cannot change its rounding); the diffusers numbers with inductor in the
README were measured with the same models outside the suite (compiling with inductor on a CPU
costs more than the rest of this test).
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
    cases = (("flux", {"ring": 2}), ("qwenimage", {"ulysses": 2}))
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

    return res


def test_compiled_diffusers_context_parallelism():
    results = spawn_ranks(_world, 2, timeout=900)
    for res in results:
        for name in ("flux_ring", "qwenimage_ulysses"):
            (breaks, graphs), (plain_breaks, plain_graphs) = (
                res[f"{name}_patched"],
                res[f"{name}_unpatched"],
            )
            extra = 1 if name.startswith("qwenimage") else 0  # one graph per guidance branch
            assert breaks <= plain_breaks and graphs <= plain_graphs + extra, (name, res)
            assert res[f"{name}_exact"], name
        assert res["two_pipes"] == [True] * 3, res["two_pipes"]
