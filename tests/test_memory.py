"""Base memory: accounting against the storage held, the max_base_bytes budget, compact
storage (bit-identical bases, flat error over steps) and the per-model estimates."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from compactfusion import CompactConfig, ResidualCompressor
from compactfusion.memory import (
    MODELS,
    CompactBase,
    compact,
    estimate,
    exchange_footprint,
    storage_bytes,
    storage_nbytes,
)

LOSSY = [("int1", {}), ("int2", {}), ("fp8", {}), ("nm_sparse", {}), ("lowrank", {"rank": 8})]


def drifting(steps=24, rows=64, cols=256, seed=0, dtype=torch.bfloat16, outliers=True):
    """A slow drift (low-rank walk plus noise); a few channels ~10x larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(cols)
    if outliers:
        scale[torch.randperm(cols, generator=g)[:4]] = 10.0
    x = torch.randn(rows, cols, generator=g)
    out = []
    for _ in range(steps):
        u, v = torch.randn(rows, 2, generator=g), torch.randn(cols, 2, generator=g)
        x = x + 0.05 * (u @ v.T) / 2 + 0.01 * torch.randn(rows, cols, generator=g)
        out.append((x * scale).to(dtype))
    return out


def held_storage(comp: ResidualCompressor) -> int:
    tensors = []
    for stored in comp.stored_bases().values():
        tensors.extend(stored.tensors() if isinstance(stored, CompactBase) else [stored])
    return storage_bytes(tensors)


# --- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB", float("inf")])
def test_budget_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="max_base_bytes"):
        CompactConfig(max_base_bytes=bad)


def test_storage_must_be_known_and_both_knobs_are_in_the_fingerprint():
    with pytest.raises(ValueError, match="base_storage"):
        CompactConfig(base_storage="bf16")
    fps = {
        CompactConfig().fingerprint(),
        CompactConfig(max_base_bytes=1 << 30).fingerprint(),
        CompactConfig(max_base_bytes=1 << 31).fingerprint(),
        CompactConfig(base_storage="int8").fingerprint(),
        CompactConfig(base_storage="fp8").fingerprint(),
    }
    assert len(fps) == 5


# --- compact storage ------------------------------------------------------------------------
@pytest.mark.parametrize("storage, qmax", [("int8", 127), ("fp8", 448)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compact_rounding_is_bounded_deterministic_and_exactly_dequantized(storage, qmax, dtype):
    x = drifting(steps=1, rows=40, cols=512, dtype=dtype)[0]
    x[3] = 0  # an all-zero group
    c = compact(x, storage)
    assert c.shape == x.shape and c.dtype == dtype
    assert c.nbytes == storage_nbytes(tuple(x.shape), dtype, storage) == 40 * 512 + 4 * 80
    assert c.equal(compact(x.clone(), storage))  # the same input rounds the same way
    # Scales are powers of two just above max|group| / qmax.
    s = c.scales
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    amax = x.float().reshape(-1, 256).abs().amax(1)
    nz = amax > 0
    assert bool((amax[nz] <= qmax * s[nz]).all()) and bool((amax[nz] > qmax * s[nz] / 2).all())
    # Dequantizing is exact: codes x scale, no second rounding in the activation dtype.
    d = c.dequantize()
    exact = c.codes.float().reshape(-1, 256) * s[:, None]
    assert d.dtype == dtype and torch.equal(d.float().reshape(-1, 256), exact)
    # Error per element: half a step (int8) / 2**-4 relative plus half the smallest normal
    # step (fp8 e4m3), relative to the group's scale.
    err = (d.float() - x.float()).reshape(-1, 256).abs()
    bound = s[:, None] * (0.5 if storage == "int8" else 0.0)
    if storage == "fp8":
        bound = x.float().reshape(-1, 256).abs() * 2.0**-4 + s[:, None] * 2.0**-10
    assert bool((err <= bound + 1e-30).all())


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@pytest.mark.parametrize("codec, params", LOSSY)
def test_compact_bases_bit_identical_on_both_sides(codec, params, storage):
    cfg = CompactConfig(codec=codec, codec_params=params, min_numel=0, base_storage=storage)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    out = torch.empty(64, 256, dtype=torch.bfloat16)  # like a slot of a gathered buffer
    raw = tx.raw_payload_nbytes((64, 256), torch.bfloat16)
    for t, x in enumerate(drifting(steps=6)):
        p = tx.encode("kv", x)
        got = rx.decode("kv", p, out=out)
        assert got is out
        a, b = tx.stored_base("kv"), rx.stored_base("kv")
        assert isinstance(a, CompactBase) and a.equal(b), f"bases differ at call {t}"
        assert torch.equal(tx.base("kv"), rx.base("kv"))
        # The attention reads the reconstruction before rounding; the base is its rounding.
        assert compact(got, storage).equal(b)
        if t == 0:
            assert p.numel() == raw and torch.equal(got, x)
        else:
            assert p.numel() < raw
    st = tx.stats()
    assert st["base_bytes"] == st["sites"]["'kv'"]["base_bytes"] == 64 * 256 + 4 * 64


def _errors(storage, codec="int2", steps=40):
    cfg = CompactConfig(codec=codec, min_numel=0, base_storage=storage)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    errs = []
    for x in drifting(steps=steps):
        recon = rx.decode("s", tx.encode("s", x))
        errs.append(float((recon.float() - x.float()).norm() / x.float().norm()))
    return errs


@pytest.mark.parametrize("storage", ["int8"])
@pytest.mark.parametrize("codec", ["int2", "int1"])
def test_compact_storage_error_stays_flat(storage, codec):
    full, comp = _errors("full", codec), _errors(storage, codec)
    # Feedback corrects the rounding at the next step: no growth along the trajectory ...
    assert max(comp[-10:]) < 1.5 * max(comp[1:11]), comp
    # ... and the cost against full-precision bases stays a bounded factor.
    assert sum(comp[1:]) < 2.0 * sum(full[1:]), (sum(comp[1:]), sum(full[1:]))


# --- accounting -------------------------------------------------------------------------------
@pytest.mark.parametrize("storage", ["full", "int8"])
def test_base_bytes_match_the_storage_held(storage):
    cfg = CompactConfig(codec="int2", min_numel=0, base_storage=storage)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    shapes = {"a": (64, 256), "b": (32, 256), "c": (16, 128)}
    for step in range(3):
        for key, shape in shapes.items():
            x = torch.randn(shape, dtype=torch.bfloat16) * (1 + step)
            rx.decode(key, tx.encode(key, x))
        for c in (tx, rx):
            st = c.stats()
            assert st["base_bytes"] == held_storage(c) > 0
            assert st["base_bytes"] == sum(s["base_bytes"] for s in st["sites"].values())
            assert st["peak_base_bytes"] == st["base_bytes"]
    expect = sum(storage_nbytes(s, torch.bfloat16, storage) for s in shapes.values())
    assert tx.stats()["base_bytes"] == expect
    # A smaller activation at one site lowers the bytes held; the peak remembers.
    tx.encode("a", torch.randn(8, 256, dtype=torch.bfloat16))
    st = tx.stats()
    assert st["base_bytes"] == held_storage(tx) < st["peak_base_bytes"] == expect
    tx.reset()
    assert tx.stats()["base_bytes"] == 0 and held_storage(tx) == 0


def test_receiver_views_of_a_gathered_buffer_count_their_own_elements():
    cfg = CompactConfig(codec="int2", min_numel=0)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    gathered = torch.empty(3, 64, 256)
    for _ in range(2):
        for r in (1, 2):
            rx.decode(("kv", r), tx.encode(("kv", r), torch.randn(64, 256)), out=gathered[r])
    assert rx.stats()["base_bytes"] == 2 * 64 * 256 * 4  # two slots; slot 0 is no base
    assert held_storage(rx) == 3 * 64 * 256 * 4  # the buffer they live in


def test_blocks_that_never_compress_keep_no_base():
    for cfg in (CompactConfig(codec="raw"), CompactConfig(codec="int2", min_numel=10**6)):
        tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
        x = torch.randn(64, 256)
        for _ in range(3):
            assert torch.equal(rx.decode("s", tx.encode("s", x)), x)
        assert tx.base("s") is None and rx.base("s") is None
        assert tx.stats()["base_bytes"] == rx.stats()["base_bytes"] == 0


# --- budget ------------------------------------------------------------------------------------
def test_budget_refuses_sites_that_do_not_fit_in_order_of_first_use(caplog):
    block = 64 * 256 * 4
    cfg = CompactConfig(codec="int2", min_numel=0, max_base_bytes=2 * block + 100)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    seq = drifting(steps=4, dtype=torch.float32)
    raw = tx.raw_payload_nbytes((64, 256), torch.float32)
    with caplog.at_level(logging.WARNING, logger="compactfusion"):
        for _ in range(2):  # two generations: the same decisions
            for x in seq:
                for key in ("l0", "l1", "l2"):
                    p = tx.encode(key, x)
                    assert torch.equal(rx.decode(key, p), x) == (key == "l2" or x is seq[0])
                    assert (p.numel() == raw) == (key == "l2" or x is seq[0])
                for c in (tx, rx):
                    st = c.stats()
                    assert st["base_bytes"] == 2 * block <= cfg.max_base_bytes
                    assert st["peak_base_bytes"] <= cfg.max_base_bytes
                    assert st["raw_by_budget"] == ["'l2'"]
                assert tx.base("l2") is None and torch.equal(tx.base("l1"), rx.base("l1"))
            tx.reset()
            rx.reset()
    assert not caplog.records  # a site that fits an empty budget is no warning matter


def test_budget_smaller_than_one_site_sends_everything_raw_with_one_warning(caplog):
    cfg = CompactConfig(codec="int2", min_numel=0, max_base_bytes=1000)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    with caplog.at_level(logging.WARNING, logger="compactfusion"):
        for x in drifting(steps=3):
            for key in ("a", "b"):
                assert torch.equal(rx.decode(key, tx.encode(key, x)), x)
    assert tx.stats()["base_bytes"] == rx.stats()["base_bytes"] == 0
    assert tx.stats()["payload_bytes"] == tx.stats()["raw_bytes"] + 6 * 32
    warnings = [r for r in caplog.records if "max_base_bytes" in r.getMessage()]
    # One warning per compressor (tx and rx stand for two ranks), not one per site or call.
    assert len(warnings) == 2 and all("smaller than" in w.getMessage() for w in warnings)


def test_all_gather_sites_are_admitted_whole_on_every_rank():
    # Two ranks of an all-gather, simulated in one process: each keeps its own block as
    # sender and its peer's as receiver. The budget holds one layer (2 blocks), not two: both
    # ranks must admit the same layer, although each meets it through a different key first.
    world = 2
    block = 32 * 256 * 2
    cfg = CompactConfig(codec="int2", min_numel=0, max_base_bytes=3 * block)
    comps = [ResidualCompressor(cfg) for _ in range(world)]
    for c in comps:
        c.set_footprint(exchange_footprint(world, world, mode="ring"))
    seqs = [drifting(steps=4, rows=32, seed=r) for r in range(world)]
    for step in range(4):
        for layer in ("l0", "l1"):
            payloads = [comps[r].encode(((layer, "kv"), r), seqs[r][step]) for r in range(world)]
            for me in range(world):
                for src in range(world):
                    if src != me:
                        comps[me].decode(((layer, "kv"), src), payloads[src])
    for c in comps:
        st = c.stats()
        assert st["raw_by_budget"] == ["('l1', 'kv')"] and st["base_bytes"] == 2 * block
        assert c.base((("l1", "kv"), 0)) is None and c.base((("l1", "kv"), 1)) is None
    for src in range(world):  # sender and receiver bases of the admitted layer agree
        key = (("l0", "kv"), src)
        assert torch.equal(comps[0].base(key), comps[1].base(key))


def test_footprint_of_the_collectives_keys():
    f = exchange_footprint(4, 2, mode="allgather")
    assert f((("l", "kv"), 3)) == (("l", "kv"), 4)  # own block + 3 peers' (bases only)
    # stale: the persistent gathered buffer holds the peers' bases and the own slot
    assert exchange_footprint(4, 2, mode="stale")((("l", "kv"), 3))[1] == 5
    assert f((("l", "a2a", 0), 0, 1)) == (("l", "a2a", 0), 2)
    assert exchange_footprint(4, 2, mode="ring")((("l", "kv"), 3))[1] == 4
    assert exchange_footprint(4, 2, mode="allgather", storage="int8")((("l", "kv"), 0))[1] == 4


# --- estimates ---------------------------------------------------------------------------------
def test_estimates_against_hand_computation():
    flux = MODELS["flux1"]
    # FLUX.1 1024^2: 57 layers x (4096 + 512) tokens x K,V x 3072 x bf16, whatever the ranks.
    full_kv = 57 * 4608 * 2 * 3072 * 2
    assert full_kv == 3_227_516_928
    for n in (2, 4, 8):
        assert estimate(flux, "ring", n).base_bytes == full_kv
        e = estimate(flux, "allgather", n)
        assert e.base_bytes == e.held_bytes == full_kv  # the gathered K/V are temporaries
        e = estimate(flux, "stale", n)
        assert e.base_bytes == full_kv and e.held_bytes == full_kv * (n + 1) // n
    # Compact: 1 byte + 4 bytes per 256 values.
    assert estimate(flux, "ring", 2, "int8").base_bytes == full_kv // 2 * 260 // 256
    # Wan2.1-14B, Ulysses on 8 ranks: q, k, v, out of 75600/8 tokens x 5120, 7 chunks of 1/8
    # sent and 7 received, 40 layers, cond and uncond.
    wan = MODELS["wan21_14b"]
    per_call = 2 * 7 * (9450 * 5120 // 8) * 2 * 4
    assert estimate(wan, "ulysses", 8).base_bytes == 40 * 2 * per_call
    assert math.isclose(40 * per_call / 1e9, 27.1, rel_tol=0.01)  # one branch: ~27 GB
    # DistriFusion holds the previous step's K/V and no bases.
    d = estimate(flux, "distrifusion", 4)
    assert d.base_bytes == 0 and d.held_bytes == full_kv
    with pytest.raises(ValueError, match="mode"):
        estimate(flux, "pipefusion", 2)


def test_base_storage_benchmark_synthetic_smoke(tmp_path):
    import csv
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "cf_bench_base_storage", os.path.join(root, "benchmarks", "base_storage.py")
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    paths = bench.main(["--skip-flux", "--synthetic-steps", "8", "--out", str(tmp_path)])
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["codec"], r["storage"]) for r in rows} == {
        (c, s) for c in bench.CODECS for s in ("full", "int8", "fp8")
    }
    assert len(rows) == 8 * 6 and float(rows[0]["kv_rel_err"]) == 0.0  # warm-up: exact
    text = open(paths["md"]).read()
    assert "| synthetic (512x256 bf16) | int2 | int8 |" in text and "133120" in text
