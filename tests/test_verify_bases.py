"""verify_bases on 3 gloo ranks, driving the shared strategies directly (no xfuser): bases agree
after int2 exchanges in every mode (the stale mode's payloads still in flight are decoded
first), and a base changed on one rank is reported by every rank, naming the site."""

import math
from types import SimpleNamespace

import pytest
import torch

from compactfusion import BaseDivergenceError, CompactConfig, verify_bases
from compactfusion.integrations.state import STATE_ATTR, PipelineState
from compactfusion.integrations.strategies import kv_attention, ulysses_all_to_all
from compactfusion.testing import spawn_ranks
from compactfusion.verify import base_checksum, check_bases


def attend(q, k, v, with_joint):
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores, -1) @ v.float()).to(q.dtype), torch.logsumexp(scores, -1)


def _run(mode, rank, world, steps=3):
    cfg = CompactConfig(codec="int2", mode=mode, min_numel=0)
    state = PipelineState(config=cfg)
    pipe = SimpleNamespace(**{STATE_ATTR: state})
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 2, 8, 32, generator=g, dtype=torch.bfloat16) for _ in range(3))
    x = torch.randn(world * 4, 64, generator=g, dtype=torch.bfloat16)
    for step in range(steps):
        state.begin_step()
        state.layer, state.layer_exchanges = "blocks.0.attn", 0
        kv_attention(state, state.layer, attend, q, k + 0.1 * step, v, None)
        ulysses_all_to_all(state, state.layer, x + 0.1 * step, None)
        state.end_step()
    return pipe, state


def _rank(rank, world):
    res = {}
    for mode in ("allgather", "ring", "stale"):
        pipe, _ = _run(mode, rank, world)
        res[mode] = verify_bases(pipe)
    # Change one element of one base on rank 1 only: every rank reports that site.
    pipe, state = _run("allgather", rank, world)
    if rank == 1:
        state.compressor.base(("blocks.0.attn/kv", 0))[0, 0] += 1
    try:
        check_bases(pipe)
        res["error"] = None
    except BaseDivergenceError as exc:
        res["error"] = str(exc)
    res["diverged"] = verify_bases(pipe)
    return res


def test_verify_bases_on_three_ranks():
    results = spawn_ranks(_rank, 3, timeout=180)
    for res in results:
        for mode in ("allgather", "ring", "stale"):
            verdict = res[mode]
            # allgather/ring/stale: 3 kv sites held by all; Ulysses: 6 (src, dst) pairs.
            assert verdict["agree"] and verdict["mismatched"] == [], (mode, verdict)
            assert verdict["sites_checked"] == 9 and verdict["world"] == 3, (mode, verdict)
        assert res["error"] is not None and "1 of 9 bases differ" in res["error"]
        (bad,) = res["diverged"]["mismatched"]
        assert bad["site"] == repr(("blocks.0.attn/kv", 0)) and bad["ranks"] == [0, 1, 2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_checksum_sees_one_bit_and_order(dtype):
    t = torch.randn(7, 33).to(dtype)
    flipped = t.clone()
    flipped.view(torch.int16 if dtype != torch.float32 else torch.int32)[3, 5] ^= 1
    swapped = t.clone()
    swapped[0], swapped[1] = t[1], t[0]
    same = base_checksum(t.clone())
    assert torch.equal(base_checksum(t), same)
    assert not torch.equal(base_checksum(flipped), same)
    assert not torch.equal(base_checksum(swapped), same)


def test_verify_config_needs_error_feedback_and_pipe_must_be_patched():
    with pytest.raises(ValueError, match="verify"):
        CompactConfig(verify=True, error_feedback=False)
    with pytest.raises(ValueError, match="verify"):
        CompactConfig(verify=1)
    with pytest.raises(ValueError, match="not patched"):
        verify_bases(object())
