"""max_base_bytes and base_storage on real xfuser pipelines: 2 gloo ranks, tiny FLUX (ring and
allgather) and tiny CogVideoX (Ulysses), one spawn for everything (starting ranks costs ~15 s).
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

INT2_BOUND = 0.05  # tests/test_xdit_patch.py's documented int2 bound for the tiny models
EXACT = 1e-6
STEPS = 4


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _bases(comp):
    """Every stored base of this rank, by site, as plain tensors (compact: codes and scales)."""
    from compactfusion.memory import CompactBase

    out = {}
    for key, stored in comp.stored_bases().items():
        if isinstance(stored, CompactBase):
            out[repr(key)] = (stored.codes.view(torch.uint8).clone(), stored.scales.clone())
        else:
            out[repr(key)] = (stored.clone(),)
    return out


def _run(pipe, kind, config, generations=1):
    import compactfusion as cf
    from compactfusion.memory import storage_bytes
    from compactfusion.testing.tiny_pipelines import generate

    with cf.patched(pipe, config):
        for _ in range(generations):
            out = generate(pipe, kind, steps=STEPS)
        state = pipe._compactfusion_state
        st = cf.stats(pipe)
        held = storage_bytes(state.held_tensors())
        base_storages = storage_bytes(
            t
            for stored in state.compressor.stored_bases().values()
            for t in (stored.tensors() if hasattr(stored, "tensors") else [stored])
        )
        buffers = sum(b.numel() * b.element_size() for b in state.kv_buffers.values())
        return {
            "out": out,
            "stats": {k: v for k, v in st.items() if k != "sites"},
            "held_storage": held,
            "base_storages": base_storages,
            "buffers": buffers,
            "bases": _bases(state.compressor),
        }


def _memory_checks(rank, world, device):
    import logging

    from compactfusion.testing import prepare_xfuser_cpu

    prepare_xfuser_cpu()
    from compactfusion import CompactConfig
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("compactfusion")
    logger.addHandler(Collect(logging.INFO))
    logger.setLevel(logging.INFO)

    res = {}
    pipe = build_pipeline("flux", ring=2, device=device)
    res["flux_plain"] = generate(pipe, "flux", steps=STEPS)
    int2 = CompactConfig(codec="int2", min_numel=0, mode="ring")
    res["flux_ring"] = _run(pipe, "flux", int2)
    budget = res["flux_ring"]["stats"]["reserved_base_bytes"] // 2
    records.clear()
    res["flux_ring_budget"] = _run(pipe, "flux", int2.replace(max_base_bytes=budget), 2)
    res["flux_ring_budget_logs"] = [r for r in records if "max_base_bytes" in r]
    records.clear()
    res["flux_ring_tiny_budget"] = _run(pipe, "flux", int2.replace(max_base_bytes=1))
    res["flux_ring_tiny_budget_logs"] = [r for r in records if "max_base_bytes" in r]
    res["flux_ring_int8"] = _run(pipe, "flux", int2.replace(base_storage="int8"))
    gathered = int2.replace(mode="allgather")
    res["flux_allgather"] = _run(pipe, "flux", gathered)
    budget_ag = res["flux_allgather"]["stats"]["reserved_base_bytes"] // 2
    res["flux_allgather_budget"] = _run(pipe, "flux", gathered.replace(max_base_bytes=budget_ag))
    res["flux_allgather_int8"] = _run(pipe, "flux", gathered.replace(base_storage="int8"))

    pipe = build_pipeline("cogvideox", ulysses=2, device=device)
    res["cog_plain"] = generate(pipe, "cogvideox", steps=STEPS)
    res["cog_ulysses"] = _run(pipe, "cogvideox", int2)
    budget_cog = res["cog_ulysses"]["stats"]["reserved_base_bytes"] // 2
    res["cog_ulysses_budget"] = _run(pipe, "cogvideox", int2.replace(max_base_bytes=budget_cog))
    return res


def _same_bases(a, b):
    assert a.keys() == b.keys(), "both ranks must hold bases of the same sites"
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            assert torch.equal(x, y), f"bases of {key} differ across ranks"


@pytest.mark.timeout(400)
def test_budget_and_compact_storage_on_two_ranks():
    from compactfusion.memory import ModelShape, estimate

    r0, r1 = spawn_ranks(_memory_checks, 2, "cpu", timeout=380)
    for name in [k for k in r0 if isinstance(r0[k], dict) and "bases" in r0[k]]:
        _same_bases(r0[name]["bases"], r1[name]["bases"])  # every configuration: bases agree
        assert bool(r0[name]["bases"]) == (name != "flux_ring_tiny_budget"), name
    for res in (r0, r1):
        flux_plain, cog_plain = res["flux_plain"], res["cog_plain"]

        # Unbudgeted ring: the bases are separate tensors, their storage is base_bytes, and
        # the estimator's arithmetic gives the same figure (tiny FLUX: 4 attention layers,
        # 64 image + 8 text tokens, 4 x 16 channels, float32).
        ring = res["flux_ring"]
        st = ring["stats"]
        tiny = ModelShape("tiny", "tiny", layers=4, tokens=72, hidden=64, itemsize=4)
        assert st["base_bytes"] == ring["base_storages"] == ring["held_storage"]
        assert st["base_bytes"] == st["peak_base_bytes"] == estimate(tiny, "ring", 2).base_bytes
        assert st["raw_by_budget"] == [] and 0 < rel(ring["out"], flux_plain) < INT2_BOUND

        # Half the footprint: half the layers raw, the rest compressed; the output stays
        # within int2's bound; decisions identical in both generations, logged once.
        bud = res["flux_ring_budget"]
        st = bud["stats"]
        limit = st["max_base_bytes"]
        assert st["base_bytes"] == bud["held_storage"] <= limit
        assert st["peak_base_bytes"] <= limit and st["generations"] == 2
        assert len(st["raw_by_budget"]) == 2  # of 4 layers
        assert 1 < st["ratio_after_warmup"] < ring["stats"]["ratio_after_warmup"]
        assert 0 < rel(bud["out"], flux_plain) < INT2_BOUND
        assert len(res["flux_ring_budget_logs"]) == 1, res["flux_ring_budget_logs"]
        assert "2 site(s) sent raw" in res["flux_ring_budget_logs"][0]

        # A budget below one site: everything raw (exact), no base, one warning.
        tb = res["flux_ring_tiny_budget"]
        assert tb["stats"]["base_bytes"] == tb["held_storage"] == 0
        assert rel(tb["out"], flux_plain) < EXACT
        warned = [r for r in res["flux_ring_tiny_budget_logs"] if "smaller than" in r]
        assert len(warned) == 1

        # int8 storage: a quarter of float32 bases (+ scales), output within the bound.
        i8 = res["flux_ring_int8"]
        assert i8["stats"]["base_bytes"] == i8["held_storage"]
        assert i8["stats"]["base_bytes"] == estimate(tiny, "ring", 2, "int8").base_bytes
        assert i8["stats"]["base_bytes"] < 0.3 * ring["stats"]["base_bytes"]
        assert 0 < rel(i8["out"], flux_plain) < INT2_BOUND

        # allgather: the gathered K/V are a temporary of each call; the bases are separate
        # (the rank's own block as sender, the peers' as receiver), each storage counted once.
        ag = res["flux_allgather"]
        st = ag["stats"]
        assert ag["buffers"] == 0  # no persistent gathered buffer
        assert ag["held_storage"] == st["held_bytes"] == st["base_bytes"]
        assert st["held_bytes"] == estimate(tiny, "allgather", 2).held_bytes
        assert st["reserved_base_bytes"] == st["held_bytes"]
        agb = res["flux_allgather_budget"]
        assert agb["stats"]["held_bytes"] <= agb["stats"]["max_base_bytes"]
        assert len(agb["stats"]["raw_by_budget"]) == 2
        assert 0 < rel(agb["out"], flux_plain) < INT2_BOUND
        ag8 = res["flux_allgather_int8"]
        assert ag8["buffers"] == 0  # compact bases: no persistent gathered buffer
        assert ag8["stats"]["held_bytes"] == ag8["stats"]["base_bytes"] == i8["stats"]["base_bytes"]
        assert 0 < rel(ag8["out"], flux_plain) < INT2_BOUND

        # CogVideoX through Ulysses all-to-alls (q, k, v, output: 4 sites per layer).
        cog, cogb = res["cog_ulysses"], res["cog_ulysses_budget"]
        assert cog["stats"]["base_bytes"] == cog["held_storage"] > 0
        st = cogb["stats"]
        assert st["base_bytes"] == cogb["held_storage"] <= st["max_base_bytes"]
        assert st["peak_base_bytes"] <= st["max_base_bytes"]
        assert 0 < len(st["raw_by_budget"]) < 8 and st["ratio_after_warmup"] > 1
        assert 0 < rel(cogb["out"], cog_plain) < INT2_BOUND
