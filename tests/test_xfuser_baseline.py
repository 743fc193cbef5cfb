"""Uncompressed xfuser baselines on spawned gloo ranks: the harness every compression test uses.

Each parallel configuration of a tiny seeded pipeline must reproduce the single-process output
(plain diffusers, no xfuser) to ~1e-5 relative error, on every rank, and must actually have gone
through the collective it claims to exercise (ring attention, Ulysses all-to-all, CFG
all-gather): a configuration that silently fell back to local computation fails.

Spawning ranks and importing xfuser costs most of the time (~5-10 s per spawn on two cores), so
all 2-rank configurations share one spawn and all 4-rank ones another.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time

import pytest
import torch

# Presence is checked with find_spec rather than pytest.importorskip: xfuser cannot be imported
# on a CPU-only machine before prepare_xfuser_cpu() (it raises NotImplementedError, not
# ImportError), and importing diffusers here would slow down every spawned rank, since each rank
# imports this module to find its worker function.
_MISSING = [
    name for name in ("xfuser", "yunchang", "diffusers") if not importlib.util.find_spec(name)
]
if _MISSING:
    pytest.skip(
        f"{', '.join(_MISSING)} not installed (pip install 'compactfusion[xdit]')",
        allow_module_level=True,
    )
if torch.cuda.is_available():
    pytest.skip(
        "these tests run xfuser on CPU ranks with gloo; on a CUDA machine xfuser would use "
        "its GPU paths instead",
        allow_module_level=True,
    )

from compactfusion.testing import spawn_ranks  # noqa: E402

pytestmark = pytest.mark.xfuser

RTOL = 1e-5  # relative Frobenius error allowed against the single-process output
STEPS = 3
ENV = {"LOG_LEVEL": "error"}  # xfuser logs every wrapped layer at INFO

# (id, kind, parallel degrees, generate() kwargs, collectives that must run).
# One spawn per world size.
TWO_RANK_CASES = [
    ("flux-ring2", "flux", {"ring": 2}, {}, "ring"),
    ("flux-ulysses2", "flux", {"ulysses": 2}, {}, "all_to_all"),
    ("cogvideox-ring2", "cogvideox", {"ring": 2}, {}, "ring"),
    ("cogvideox-cfg2", "cogvideox", {"cfg": 2}, {}, "cfg_all_gather"),
    ("sd3-ring2", "sd3", {"ring": 2}, {}, "ring"),
    # 7 text tokens cannot be split over 2 ranks: SD3 then replicates the text and passes it to
    # ring attention as joint K/V (joint_strategy="rear"), a different code path.
    ("sd3-ring2-text7", "sd3", {"ring": 2}, {"text_len": 7}, "ring"),
    ("pixart-ring2", "pixart", {"ring": 2}, {}, "ring"),
]
# A known xfuser 0.7.0 bug, pinned so that a fix (or a harness change) is noticed.
FLUX_TEXT7 = ("flux-ring2-text7", "flux", {"ring": 2}, {"text_len": 7}, "ring")
FOUR_RANK_CASES = [
    ("flux-ring2-ulysses2", "flux", {"ring": 2, "ulysses": 2}, {}, "ring+all_to_all"),
]
COLLECTIVES = ("ring", "all_to_all", "cfg_all_gather")


@contextlib.contextmanager
def _counting(owner, name: str, counts: dict[str, int], key: str):
    """Count calls of ``owner.name`` (a module or instance attribute) under ``key``."""
    original = getattr(owner, name)
    own_attribute = name in vars(owner)  # False for a method looked up on the class

    def counted(*args, **kwargs):
        counts[key] += 1
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield
    finally:
        if own_attribute:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


def _run_cases(rank: int, world_size: int, cases) -> dict[str, dict]:
    """Rank body: for each case, the reference, the parallel output and collective counts."""
    from compactfusion.testing import (
        build_pipeline,
        destroy_xfuser_distributed,
        generate,
        prepare_xfuser_cpu,
    )

    prepare_xfuser_cpu()
    from xfuser.core.distributed import get_cfg_group
    from xfuser.model_executor.layers import usp

    results = {}
    try:
        for case_id, kind, degrees, generate_kwargs, _expected in cases:
            reference = generate(build_pipeline(kind), kind, steps=STEPS, **generate_kwargs)
            pipe = build_pipeline(kind, **degrees)
            counts = dict.fromkeys(COLLECTIVES, 0)
            start = time.perf_counter()
            with (
                _counting(usp, "ring_attn", counts, "ring"),
                _counting(usp, "_sdpa_all_to_all_single", counts, "all_to_all"),
                _counting(get_cfg_group(), "all_gather", counts, "cfg_all_gather"),
            ):
                output = generate(pipe, kind, steps=STEPS, **generate_kwargs)
            results[case_id] = {
                "reference": reference,
                "output": output,
                "counts": counts,
                "seconds": time.perf_counter() - start,
            }
    finally:
        destroy_xfuser_distributed()
    return results


def _check_case(per_rank: list[dict], case) -> None:
    case_id, _kind, _degrees, _generate_kwargs, expected = case
    reference = per_rank[0][case_id]["reference"]
    for rank, results in enumerate(per_rank):
        result = results[case_id]
        assert torch.equal(result["reference"], reference), f"rank {rank}: references differ"
        output = result["output"]
        assert output.shape == reference.shape, f"rank {rank}: {output.shape} vs {reference.shape}"
        error = ((output - reference).norm() / reference.norm()).item()
        assert error < RTOL, f"rank {rank}: relative error {error:.3g} >= {RTOL}"
        counts = result["counts"]
        for collective in COLLECTIVES:
            if collective in expected.split("+"):
                assert counts[collective] > 0, f"rank {rank}: no {collective} call ({counts})"
            else:
                assert counts[collective] == 0, f"rank {rank}: unexpected {collective} ({counts})"


@pytest.fixture(scope="module")
def two_rank_results():
    return spawn_ranks(_run_cases, 2, [*TWO_RANK_CASES, FLUX_TEXT7], timeout=240, env=ENV)


@pytest.fixture(scope="module")
def four_rank_results():
    return spawn_ranks(_run_cases, 4, FOUR_RANK_CASES, timeout=300, env=ENV)


@pytest.mark.parametrize("case", TWO_RANK_CASES, ids=[case[0] for case in TWO_RANK_CASES])
def test_two_ranks_match_single_process(two_rank_results, case):
    _check_case(two_rank_results, case)


def test_flux_with_indivisible_text_is_wrong_in_xfuser(two_rank_results):
    """xfuser 0.7.0 bug: FLUX text that cannot be split over the SP ranks stays whole on every
    rank *inside* the local Q/K/V, so ring attention attends to it once per rank."""
    for results in two_rank_results:
        result = results[FLUX_TEXT7[0]]
        reference = result["reference"]
        error = ((result["output"] - reference).norm() / reference.norm()).item()
        assert error > 100 * RTOL, f"FLUX with 7 text tokens now matches ({error:.3g})"
        assert result["counts"]["ring"] > 0


@pytest.mark.parametrize("case", FOUR_RANK_CASES, ids=[case[0] for case in FOUR_RANK_CASES])
def test_four_ranks_match_single_process(four_rank_results, case):
    _check_case(four_rank_results, case)


def test_cfg_parallel_gathers_once_per_step(two_rank_results):
    """Each CFG rank computes one branch; the noise predictions are all-gathered every step."""
    outputs = [results["cogvideox-cfg2"]["output"] for results in two_rank_results]
    assert torch.equal(outputs[0], outputs[1])
    counts = two_rank_results[0]["cogvideox-cfg2"]["counts"]
    assert counts["cfg_all_gather"] == STEPS  # one all-gather of the noise prediction per step


# spawn_ranks must fail loudly and quickly, never hang: these run without xfuser.


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("deliberate failure")
    time.sleep(60)  # would hang the test if the failure were not propagated


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(60)


def _all_reduce_rank(rank: int, world_size: int) -> float:
    value = torch.tensor([float(rank)])
    torch.distributed.all_reduce(value)
    return value.item()


def test_spawn_ranks_returns_results_in_rank_order():
    assert spawn_ranks(_all_reduce_rank, 2, timeout=60) == [1.0, 1.0]


def test_spawn_ranks_reports_the_failing_rank():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed:(.|\n)*deliberate failure"):
        spawn_ranks(_fail_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 30


def _rank_one_fails_then_rank_zero_dies(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("connection closed by peer (stand-in)")
    time.sleep(0.5)
    os._exit(7)


def test_spawn_ranks_reports_what_the_other_ranks_did():
    """The first failure to arrive is often a consequence (a peer died): the error also
    carries the other ranks' reports and exit codes."""
    with pytest.raises(RuntimeError) as info:
        spawn_ranks(_rank_one_fails_then_rank_zero_dies, 2, timeout=60)
    message = str(info.value)
    assert "rank 1 of 2 failed" in message and "stand-in" in message
    assert "rank 0 exited with code 7 without reporting" in message


def test_spawn_ranks_times_out():
    with pytest.raises(TimeoutError, match="did not finish within 3 s"):
        spawn_ranks(_sleep, 2, timeout=3)
