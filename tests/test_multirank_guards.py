"""Peer failures on 2 gloo ranks, in one spawned world (checksum first, timeouts last: a timed-out
operation leaves the process group unusable).

- ``checksum=True`` over real compressed all-gathers and all-to-alls: outputs equal the
  ``checksum=False`` run's, ``verify_bases`` finds every base bit-identical; a byte of rank 0's
  payload flipped in transit makes rank 1's ``end_step`` raise ``PayloadError`` (rank 0 sees
  nothing wrong); with ``checksum=False`` the same corruption goes unnoticed.
- ``timeout_s``: rank 0 raises and stays alive; rank 1 gets ``CollectiveTimeout`` within a few
  seconds (instead of the process group's 30 minutes) at each of compactfusion's collectives:
  the cross-rank configuration check, a compressed all-gather, a compressed all-to-all,
  ``verify_bases`` and a ring relay transfer.
"""

import datetime
import math
import time

import torch
import torch.distributed as dist

from compactfusion import CollectiveTimeout, CompactConfig, PayloadError, ResidualCompressor
from compactfusion.collectives import (
    check_consistent,
    compressed_all_gather,
    compressed_all_to_all,
)
from compactfusion.integrations.state import PipelineState
from compactfusion.integrations.strategies import ring_relay_attention
from compactfusion.testing import spawn_ranks
from compactfusion.verify import compare_bases

TIMEOUT_S = 1.0
STEPS = 3


def shard(rank, step, rows=16):
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rank))
    return (x + 0.05 * step * torch.randn(rows, 64)).to(torch.bfloat16)


def attend(q, k, v, with_joint):
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    return (torch.softmax(scores, -1) @ v.float()).to(q.dtype), torch.logsumexp(scores, -1)


def _run_steps(cfg, rank, world):
    torch.manual_seed(0)
    comp = ResidualCompressor(cfg)
    outs = []
    for step in range(STEPS):
        outs.append(compressed_all_gather(comp, "kv", shard(rank, step)))
        outs.append(compressed_all_to_all(comp, "a2a", shard(rank, step, rows=8 * world)))
        comp.end_step()
    return comp, outs


def _corrupted_step(checksum, rank):
    """Two steps of a compressed all-gather; in the second, rank 1 receives rank 0's payload
    with one data byte flipped. Returns what end_step raised on this rank (None: nothing)."""
    cfg = CompactConfig(codec="int2", min_numel=0, checksum=checksum)
    comp = ResidualCompressor(cfg)
    compressed_all_gather(comp, "kv", shard(rank, 0))
    comp.end_step()
    real = dist.all_gather_single

    def flipping(out, inp, group=None, async_op=False):
        work = real(out, inp, group=group, async_op=async_op)
        if rank == 1:
            out.view(2, -1)[0, 100] ^= 16  # rank 0's payload, in the int2 data
        return work

    dist.all_gather_single = flipping
    try:
        compressed_all_gather(comp, "kv", shard(rank, 1))
    finally:
        dist.all_gather_single = real
    try:
        comp.end_step()
    except PayloadError as exc:
        return str(exc)
    return None


def _expect_timeout(results, name, fn):
    start = time.monotonic()
    try:
        fn()
    except CollectiveTimeout as exc:
        results[name] = (time.monotonic() - start, exc.site, exc.timeout_s, str(exc))
    else:
        results[name] = "completed"


def _rank(rank, world):
    out = {}
    # --- checksum -------------------------------------------------------------------------
    base = CompactConfig(codec="int2", min_numel=0)
    plain, plain_outs = _run_steps(base, rank, world)
    checked, checked_outs = _run_steps(base.replace(checksum=True), rank, world)
    out["outputs_equal"] = all(
        torch.equal(a, b) for a, b in zip(plain_outs, checked_outs, strict=True)
    )
    out["verify"] = compare_bases(checked)
    out["bytes"] = (plain.stats()["payload_bytes"], checked.stats()["payload_bytes"])
    out["corrupt_checked"] = _corrupted_step(True, rank)
    out["corrupt_unchecked"] = _corrupted_step(False, rank)

    # --- timeouts ---------------------------------------------------------------------------
    groups = [dist.new_group([0, 1]) for _ in range(4)]  # one per site: each starts clean
    cfg = CompactConfig(codec="int2", min_numel=0, timeout_s=TIMEOUT_S)
    comp = ResidualCompressor(cfg)
    state = PipelineState(config=cfg)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    for step in range(2):  # both ranks in step, as before a failure
        compressed_all_gather(comp, "kv", shard(rank, step), group=groups[1])
        compressed_all_to_all(comp, "a2a", shard(rank, step, rows=16), group=groups[2])
        comp.end_step()
        ring_relay_attention(state, "blocks.0", attend, q, k + step, v, None)
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        try:
            raise RuntimeError("a user error on rank 0")
        except RuntimeError:
            pass  # caught and kept alive (a notebook, a server), never reaching the exchange
        store.wait(["rank1_done"], datetime.timedelta(seconds=120))
        return out
    timings = out["timeouts"] = {}
    _expect_timeout(timings, "check", lambda: check_consistent("x", groups[0], timeout_s=TIMEOUT_S))
    _expect_timeout(
        timings, "all_gather", lambda: compressed_all_gather(comp, "kv", shard(1, 2), groups[1])
    )
    _expect_timeout(
        timings,
        "all_to_all",
        lambda: compressed_all_to_all(comp, "a2a", shard(1, 2, rows=16), groups[2]),
    )
    _expect_timeout(timings, "verify", lambda: compare_bases(comp, groups[3]))
    _expect_timeout(
        timings,
        "ring",
        lambda: ring_relay_attention(state, "blocks.0", attend, q, k + 2, v, None),
    )
    store.set("rank1_done", "1")
    return out


def test_checksum_and_timeouts_on_two_ranks():
    results = spawn_ranks(_rank, 2, timeout=240)
    for rank, res in enumerate(results):
        assert res["outputs_equal"], rank
        assert res["verify"]["agree"] and res["verify"]["sites_checked"] > 0, res["verify"]
        plain_bytes, checked_bytes = res["bytes"]
        # STEPS x (one all-gather payload + one all-to-all payload) sent, each + 16 bytes
        assert checked_bytes - plain_bytes == 16 * STEPS * 2 * 2, res["bytes"]
        assert res["corrupt_unchecked"] is None  # unchanged without checksum: unnoticed
    assert results[0]["corrupt_checked"] is None  # the sender sees nothing wrong
    assert "checksum" in results[1]["corrupt_checked"]
    timings = results[1]["timeouts"]
    expected_sites = {
        "check": "cross-rank configuration check",
        "all_gather": "compressed all-gather of 'kv'",
        "all_to_all": "compressed all-to-all of 'a2a'",
        "verify": "verify_bases exchange of base checksums",
        "ring": "ring relay of 'blocks.0/kv'",
    }
    for name, site in expected_sites.items():
        assert timings[name] != "completed", name
        elapsed, got_site, timeout_s, message = timings[name]
        assert got_site == site and timeout_s == TIMEOUT_S, (name, got_site)
        assert TIMEOUT_S * 0.9 <= elapsed < TIMEOUT_S + 4.0, (name, elapsed)
        assert "CompactConfig.timeout_s" in message
