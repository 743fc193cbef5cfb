"""``ResidualCompressor.add_observer``: what observers see on every path (encode/decode,
send/receive through the compressed collectives, plain transfers of a lossless codec), their
removal, and that they run eagerly under torch.compile (never traced, no graph break in a
``fullgraph=True`` compile of the custom op)."""

from __future__ import annotations

import pytest
import torch

from compactfusion import CompactConfig, ResidualCompressor
from compactfusion.residual import SiteTransfer
from compactfusion.testing import spawn_ranks


def _drifting(steps: int, shape=(16, 64), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return [
        (x + 0.05 * i * torch.randn(shape, generator=g)).to(torch.bfloat16) for i in range(steps)
    ]


def test_encode_decode_events_and_removal():
    cfg = CompactConfig(codec="int2", min_numel=0, warmup_steps=1)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    seen: list[tuple[str, SiteTransfer]] = []
    handles = [
        tx.add_observer(lambda t: seen.append(("tx", t))),
        rx.add_observer(lambda t: seen.append(("rx", t))),
    ]
    xs = _drifting(3)
    for x in xs:
        recon = rx.decode("kv", tx.encode("kv", x))
        (_, sent), (_, got) = seen[-2:]
        assert (sent.key, sent.role, got.key, got.role) == ("kv", "send", "kv", "recv")
        assert sent.value is x  # the exact activation, not a copy
        assert got.value is recon and torch.equal(rx.base("kv"), recon)  # after the update
    assert [t.compressed for _, t in seen] == [False, False, True, True, True, True]
    # A compressed step reconstructs x only approximately: the observer sees the difference.
    assert not torch.equal(seen[-1][1].value, xs[-1])

    handles[0].remove()
    handles[0].remove()  # removing twice is harmless
    n = len(seen)
    rx.decode("kv", tx.encode("kv", xs[0]))
    assert [who for who, _ in seen[n:]] == ["rx"]
    handles[1].remove()
    rx.decode("kv", tx.encode("kv", xs[1]))
    assert len(seen) == n + 1 and not tx._observers and not rx._observers


def test_observers_run_in_order_and_as_context_manager():
    comp = ResidualCompressor(CompactConfig(codec="int2", min_numel=0))
    order = []
    with comp.add_observer(lambda t: order.append(1)), comp.add_observer(lambda t: order.append(2)):
        comp.encode("a", torch.randn(4, 256))
    comp.encode("a", torch.randn(4, 256))
    assert order == [1, 2]
    with pytest.raises(TypeError, match="callable"):
        comp.add_observer("not a function")


def test_observer_is_not_traced_when_dynamo_traces_the_compressor():
    """The ring and stale strategies let dynamo trace into the compressor's methods. Without
    an observer that costs no graph break (``fullgraph=True`` compiles); with one, the observer
    runs eagerly (``torch.compiler.disable``: one graph break), on real tensors."""
    from torch._dynamo.utils import counters

    comp = ResidualCompressor(CompactConfig(codec="raw"))

    def transfer(x):
        comp.count_plain("kv", "send", x)
        return x + 1

    torch._dynamo.reset()
    try:
        torch.compile(transfer, backend="eager", fullgraph=True)(torch.ones(3))
        calls = []
        comp.add_observer(
            lambda t: calls.append(
                (torch.compiler.is_compiling(), type(t.value), float(t.value.sum()))
            )
        )
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(transfer, backend="eager")
        for i in range(2):
            compiled(torch.full((3,), float(i)))
        breaks = sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
    assert calls == [(False, torch.Tensor, 0.0), (False, torch.Tensor, 3.0)]
    assert breaks >= 1
    assert comp.stats()["calls"] == 3


def _collectives_rank(rank: int, world: int):
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from compactfusion import ops
    from compactfusion.collectives import compressed_all_gather, compressed_all_to_all

    out = {}
    for codec in ("int2", "raw"):  # raw: lossless, plain transfers (count_plain)
        comp = ResidualCompressor(CompactConfig(codec=codec, min_numel=0, warmup_steps=1))
        events = []
        handle = comp.add_observer(events.append)
        xs = _drifting(3, seed=rank)
        for x in xs:
            gathered = compressed_all_gather(comp, "ag", x)
            comp.end_step()
            got = {t.key[1]: t for t in events[-world:] if t.role == "recv"}
            sent = [t for t in events[-world:] if t.role == "send"]
            assert len(sent) == 1 and sent[0].value is x and sent[0].key == ("ag", rank)
            for r, t in got.items():
                assert torch.equal(t.value, gathered[r]), (codec, r)
        flags = [t.compressed for t in events]
        a2a = compressed_all_to_all(comp, "a2a", torch.cat(xs[:world]))
        roles = sorted(t.role for t in events[len(flags) :])
        handle.remove()
        compressed_all_gather(comp, "ag", xs[0])
        out[codec] = {"flags": flags, "a2a_roles": roles, "after_remove": len(events)}
        out[codec]["events"] = len(flags) + len(roles)
        del a2a

    # Compiled with fullgraph=True (a graph break would raise): the custom op runs the
    # collective, and with it the observer, eagerly.
    comp = ResidualCompressor(CompactConfig(codec="int2", min_numel=0, warmup_steps=1))
    handle_name, group = ops.register(comp), ops.group_name(None)
    seen = []
    comp.add_observer(lambda t: seen.append((t.role, torch.compiler.is_compiling())))

    @torch.compile(fullgraph=True, backend="eager")
    def gather(x):
        return ops.all_gather(x * 1.0, handle_name, "compiled", group)

    torch._dynamo.reset()
    counters.clear()
    eager_ref = ResidualCompressor(CompactConfig(codec="int2", min_numel=0, warmup_steps=1))
    for x in _drifting(3, seed=10 + rank):
        got = gather(x)
        comp.end_step()
        ref = compressed_all_gather(eager_ref, "compiled", x)
        eager_ref.end_step()
        assert torch.equal(got, ref)
    out["compiled"] = {
        "seen": seen,
        "graph_breaks": sum(counters["graph_break"].values()),
        "world": dist.get_world_size(),
    }
    return out


@pytest.mark.timeout(300)
def test_observers_in_the_collectives_and_under_compile():
    results = spawn_ranks(_collectives_rank, 2, timeout=240)
    for res in results:
        # All-gather on 2 ranks: per step one send and one receive, raw at the warm-up step.
        assert res["int2"]["flags"] == [False, False, True, True, True, True]
        assert res["raw"]["flags"] == [False] * 6
        for codec in ("int2", "raw"):
            # All-to-all on 2 ranks: one chunk sent to the peer, one received from it.
            assert res[codec]["a2a_roles"] == ["recv", "send"]
            assert res[codec]["after_remove"] == res[codec]["events"]  # removed: no more
        compiled = res["compiled"]
        assert compiled["graph_breaks"] == 0
        assert compiled["seen"] == [("send", False), ("recv", False)] * 3
