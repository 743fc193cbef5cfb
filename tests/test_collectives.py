"""Compressed all-gather / all-to-all on 2 and 3 gloo ranks against the single-process result."""

import pytest
import torch
import torch.distributed as dist

from compactfusion import CompactConfig, ResidualCompressor
from compactfusion.collectives import (
    ConfigMismatchError,
    check_consistent,
    compressed_all_gather,
    compressed_all_to_all,
)
from compactfusion.testing import spawn_ranks

CODECS = [("int2", {}), ("int1", {}), ("lowrank", {"rank": 4}), ("nm_sparse", {})]
STEPS = 4


def shard(rank, step, shape=(12, 64)):
    g = torch.Generator().manual_seed(1000 * rank + 7)
    x = torch.randn(shape, generator=g)
    for t in range(step):
        g2 = torch.Generator().manual_seed(31 * rank + t)
        x = x + 0.05 * torch.randn(shape, generator=g2)
    return x.to(torch.bfloat16)


def cfg_for(codec, params):
    return CompactConfig(codec=codec, codec_params=params, warmup_steps=1, min_numel=0)


def single_process_all_gather(world, codec, params):
    """The same exchange computed in one process: per step, per receiver, the gathered blocks."""
    comps = [ResidualCompressor(cfg_for(codec, params)) for _ in range(world)]
    results = []
    for step in range(STEPS):
        payloads = [comps[r].encode(("kv", r), shard(r, step)) for r in range(world)]
        step_out = []
        for me in range(world):
            blocks = [
                shard(r, step) if r == me else comps[me].decode(("kv", r), payloads[r]).clone()
                for r in range(world)
            ]
            step_out.append(torch.stack(blocks))
        results.append(step_out)
    return results


def _all_gather_rank(rank, world):
    out = {}
    for codec, params in CODECS:
        comp = ResidualCompressor(cfg_for(codec, params))
        check_consistent(comp.config.fingerprint())
        buf = None
        per_step, bases_equal = [], []
        for step in range(STEPS):
            buf = compressed_all_gather(comp, "kv", shard(rank, step), out=buf)
            per_step.append(buf.clone())
            # Every receiver's base of rank r's site must equal rank r's own sender base.
            for r in range(world):
                b = comp.base(("kv", r)).contiguous()
                gathered = [torch.empty_like(b) for _ in range(world)]
                dist.all_gather(gathered, b)
                bases_equal.append(all(torch.equal(g, gathered[r]) for g in gathered))
        out[codec] = (per_step, all(bases_equal), comp.stats())
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_compressed_all_gather_matches_single_process(world):
    results = spawn_ranks(_all_gather_rank, world, timeout=240)
    for codec, params in CODECS:
        expect = single_process_all_gather(world, codec, params)
        for rank in range(world):
            per_step, bases_equal, stats = results[rank][codec]
            assert bases_equal, f"{codec}: bases differ across ranks"
            for step in range(STEPS):
                assert torch.equal(per_step[step], expect[step][rank]), (codec, rank, step)
            assert stats["sent_payload_bytes"] < stats["sent_raw_bytes"]


def _all_to_all_rank(rank, world):
    comp = ResidualCompressor(cfg_for("int2", {}))
    plain_results, comp_results = [], []
    for step in range(STEPS):
        x = torch.cat([shard(rank * world + j, step) for j in range(world)])
        plain = torch.empty_like(x)
        dist.all_to_all_single(plain, x)
        got = compressed_all_to_all(comp, "a2a", x)
        comp.end_step()
        plain_results.append(plain)
        comp_results.append(got)
    # A non-finite chunk on rank 0, bound for the last rank only: the payloads keep their size
    # (no host read), the receiver sees the non-finite value, and every rank (also those that
    # received nothing non-finite: rank 0 flags all its chunks) keeps its bases.
    x = torch.cat([shard(rank * world + j, STEPS) for j in range(world)])
    if rank == 0:
        x[-1, 0] = float("inf")
    plain = torch.empty_like(x)
    dist.all_to_all_single(plain, x)
    flagged_out = compressed_all_to_all(comp, "a2a", x)
    bases = {k: b.clone() for k, b in comp.base_items()}
    comp.end_step()  # one host read: every rank restarts the exchange raw
    x = torch.cat([shard(rank * world + j, STEPS + 1) for j in range(world)])
    after = torch.empty_like(x)
    dist.all_to_all_single(after, x)
    after_out = compressed_all_to_all(comp, "a2a", x)
    comp.end_step()
    x = torch.cat([shard(rank * world + j, STEPS + 2) for j in range(world)])
    later = torch.empty_like(x)
    dist.all_to_all_single(later, x)
    later_out = compressed_all_to_all(comp, "a2a", x)
    return (plain_results, comp_results, (plain, flagged_out, bases), (after, after_out),
            (later, later_out), comp.stats())  # fmt: skip


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("world", [2, 3])
def test_compressed_all_to_all(world):
    results = spawn_ranks(_all_to_all_rank, world, timeout=180)
    for rank in range(world):
        plain_results, comp_results, flagged, after, later, stats = results[rank]
        chunk = plain_results[0].shape[0] // world
        mine = slice(rank * chunk, (rank + 1) * chunk)
        assert torch.equal(comp_results[0], plain_results[0])  # warm-up: raw, exact
        for p, c in zip(plain_results[1:], comp_results[1:], strict=False):
            assert torch.equal(c[mine], p[mine])  # own chunk exact
            assert 0 < rel(c, p) < 0.2
        plain, flagged_out, bases = flagged
        assert torch.equal(flagged_out[mine], plain[mine])
        finite, got_finite = torch.isfinite(plain), torch.isfinite(flagged_out)
        # Not hidden: the receiver of the inf sees a non-finite value there (int2 spreads it
        # over its scale group, one row of 64, and its channel's scale, one column of the
        # chunk); everything else is close.
        assert torch.equal(got_finite | finite, finite)
        if rank == world - 1:
            assert not bool(got_finite[chunk - 1, 0])
        assert int((~got_finite).sum()) <= plain.shape[-1] + chunk
        assert rel(flagged_out[got_finite], plain[got_finite]) < 0.2
        # Not stored: every base finite, and each equals the other holder's copy.
        for key, b in bases.items():
            assert bool(torch.isfinite(b).all()), key
            _, src, dst = key
            other = results[dst if rank == src else src][2][2][key]
            assert torch.equal(b, other), key
        # After end_step every rank restarted the exchange raw (exact), then compressed again.
        assert torch.equal(after[1], after[0])
        assert torch.equal(later[1][mine], later[0][mine]) and 0 < rel(later[1], later[0]) < 0.2
        assert stats["nonfinite"] == (world - 1 if rank == 0 else 0)  # per sending site
        assert stats["sent_payload_bytes"] < stats["sent_raw_bytes"]


def _mismatch_rank(rank, world):
    cfg = CompactConfig(codec="int2" if rank == 0 else "int1")
    try:
        check_consistent(cfg.fingerprint())
    except ConfigMismatchError as exc:
        return str(exc)
    return None


def test_config_mismatch_raises_on_every_rank():
    messages = spawn_ranks(_mismatch_rank, 2, timeout=120)
    assert all(m is not None and "differs across ranks" in m for m in messages)
