"""compactfusion.patch on diffusers' unified context parallelism (ring_degree=2 x
ulysses_degree=2, 4 gloo ranks): the Ulysses all-to-alls around the ring (SeqAllToAllDim) and
the ring's K/V are both compressed. Tiny FLUX.1, one spawned world."""

from __future__ import annotations

import ast
import importlib.util

import pytest
import torch

from compactfusion.testing import spawn_ranks

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="needs diffusers==0.42.1"
)

EXACT = 1e-5
LOSSY_INT2 = 0.02  # as in test_diffusers_cp.py


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _unified_checks(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    from compactfusion.testing import (
        build_diffusers_pipeline,
        enable_context_parallel,
        generate_diffusers,
        prepare_diffusers_cpu,
    )

    prepare_diffusers_cpu()
    import compactfusion as cf
    from compactfusion import CompactConfig

    pipe = enable_context_parallel(build_diffusers_pipeline("flux"), ring=2, ulysses=2)
    plain = generate_diffusers(pipe, "flux")
    res = {}
    with cf.patched(pipe, CompactConfig(codec="raw")):
        res["raw"] = rel(generate_diffusers(pipe, "flux"), plain)
    with cf.patched(pipe, CompactConfig(codec="int2", min_numel=0)):
        res["int2"] = rel(generate_diffusers(pipe, "flux"), plain)
        st = cf.stats(pipe)
    res["layout"] = (st["ring_world"], st["ulysses_world"])
    kinds = [ast.literal_eval(k)[0].rsplit("/", 1)[1] for k in st["sites"]]  # "<layer>/<kind>"
    res["a2a_per_layer"] = sorted({int(k[3:]) for k in kinds if k.startswith("a2a")})
    res["kv_sites"] = sum(1 for k in kinds if k == "kv")
    res["ratio"] = st["ratio_after_warmup"]
    res["unpatched_equal"] = torch.equal(generate_diffusers(pipe, "flux"), plain)
    return res


@pytest.mark.timeout(240)
def test_unified_ring_and_ulysses_four_ranks():
    for res in spawn_ranks(_unified_checks, 4, timeout=220):
        assert res["raw"] < EXACT, res
        assert 1e-6 < res["int2"] < LOSSY_INT2, res
        assert res["layout"] == (2, 2)
        assert res["a2a_per_layer"] == [0, 1, 2, 3], res  # q, k, v and the output
        assert res["kv_sites"] > 0 and res["ratio"] > 7, res  # fp32 activations: ~15x
        assert res["unpatched_equal"] is True
