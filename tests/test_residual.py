"""ResidualCompressor: warm-up, error feedback, bit-identical bases, fallbacks, statistics."""

import logging

import pytest
import torch

from compactfusion import CompactConfig, PayloadError, ResidualCompressor

LOSSY = [
    ("int1", {}),
    ("int2", {}),
    ("fp8", {}),
    ("nm_sparse", {"n": 2, "m": 8}),
    ("lowrank", {"rank": 8}),
]


def drifting_sequence(steps=24, rows=64, cols=256, seed=0, dtype=torch.float32):
    """Activations that drift slowly: a fixed pattern plus a low-rank walk plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    out = []
    for _ in range(steps):
        u = torch.randn(rows, 2, generator=g)
        v = torch.randn(cols, 2, generator=g)
        x = x + 0.05 * (u @ v.T) / 2 + 0.01 * torch.randn(rows, cols, generator=g)
        out.append(x.to(dtype))
    return out


def pair(cfg):
    return ResidualCompressor(cfg), ResidualCompressor(cfg)


@pytest.mark.parametrize("codec, params", LOSSY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sender_and_receiver_bases_bit_identical(codec, params, dtype):
    cfg = CompactConfig(codec=codec, codec_params=params, warmup_steps=2)
    tx, rx = pair(cfg)
    for t, x in enumerate(drifting_sequence(steps=6, dtype=dtype)):
        payload = tx.encode("kv", x)
        got = rx.decode("kv", payload)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(tx.base("kv"), rx.base("kv")), f"bases differ at call {t}"
        if t < 2:  # warm-up: raw and exact
            assert torch.equal(got, x)
    st = tx.stats()
    assert st["raw_sends"] == 2 and st["calls"] == 6
    assert st["payload_bytes"] < st["raw_bytes"]


def _final_error(cfg, seq):
    tx, rx = pair(cfg)
    for x in seq:
        recon = rx.decode("s", tx.encode("s", x))
    return float((recon.float() - seq[-1].float()).norm() / seq[-1].float().norm())


@pytest.mark.parametrize("codec, params", [("int1", {}), ("int2", {}), ("lowrank", {"rank": 8})])
def test_error_feedback_beats_no_feedback_beats_naive(codec, params):
    seq = drifting_sequence()
    base = dict(codec=codec, codec_params=params, warmup_steps=1)
    with_fb = _final_error(CompactConfig(**base), seq)
    without_fb = _final_error(CompactConfig(**base, error_feedback=False), seq)
    naive = _final_error(CompactConfig(**base, residual=False), seq)
    assert with_fb * 1.5 < without_fb, (with_fb, without_fb, naive)
    assert without_fb * 1.2 < naive, (with_fb, without_fb, naive)


def test_error_feedback_does_not_accumulate():
    seq = drifting_sequence(steps=40)
    cfg = CompactConfig(codec="int2", warmup_steps=1)
    tx, rx = pair(cfg)
    errors = []
    for x in seq:
        recon = rx.decode("s", tx.encode("s", x))
        errors.append(float((recon - x).norm() / x.norm()))
    # Bounded: the late errors are no larger than the early ones (up to noise).
    assert max(errors[-10:]) < 2 * max(errors[1:11])


def test_shape_change_restarts_with_raw_send():
    cfg = CompactConfig(codec="int2", warmup_steps=1, min_numel=0)
    tx, rx = pair(cfg)
    a, b = torch.randn(8, 64), torch.randn(16, 64)
    for x in (a, a + 0.01, b, b + 0.01):
        out = rx.decode("k", tx.encode("k", x))
        assert torch.equal(tx.base("k"), rx.base("k"))
    assert out.shape == (16, 64)
    st = tx.stats()["sites"]["'k'"]
    assert st["raw_sends"] == 2 and st["shape"] == (16, 64)


def test_min_numel_and_site_policy_send_raw():
    cfg = CompactConfig(codec="int1", warmup_steps=0, min_numel=1000)
    tx = ResidualCompressor(cfg)
    small = torch.randn(10, 10)
    for _ in range(3):
        tx.encode("small", small)
    assert tx.stats()["sites"]["'small'"]["raw_sends"] == 3

    def only_even_calls(key, call):
        return call % 2 == 0

    cfg = CompactConfig(codec="int1", warmup_steps=1, min_numel=0, site_policy=only_even_calls)
    tx, rx = pair(cfg)
    sizes = []
    for x in drifting_sequence(steps=5):
        p = tx.encode("p", x)
        rx.decode("p", p)
        sizes.append(p.numel())
        assert torch.equal(tx.base("p"), rx.base("p"))
    raw = sizes[0]
    assert [s == raw for s in sizes] == [True, True, False, True, False]


def test_nonfinite_input_sent_raw_and_logged_once(caplog):
    cfg = CompactConfig(codec="int2", warmup_steps=1, min_numel=0)
    tx, rx = pair(cfg)
    x = torch.randn(8, 64)
    rx.decode("n", tx.encode("n", x))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="compactfusion"):
        for _ in range(2):
            rx.decode("n", tx.encode("n", bad))
    assert sum("non-finite" in r.message for r in caplog.records) == 1
    assert tx.stats()["nonfinite"] == 2
    # The base is the activation as sent (raw), identical on both sides; nothing was hidden.
    assert torch.isnan(rx.base("n")[0, 0]) and torch.equal(rx.base("n")[1:], x[1:])
    # The next finite activation is sent raw (its residual against a NaN base is not finite),
    # then compression resumes; bases stay identical throughout.
    raw_size = tx.raw_payload_nbytes((8, 64), torch.float32)
    sizes = []
    for _ in range(2):
        p = tx.encode("n", x)
        rx.decode("n", p)
        sizes.append(p.numel())
        assert torch.equal(tx.base("n"), rx.base("n"))
    assert sizes[0] == raw_size and sizes[1] < raw_size
    assert tx.stats()["nonfinite"] == 3


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("codec", ["int2", "int1", "fp8", "nm_sparse", "lowrank"])
@pytest.mark.parametrize("case", ["huge_base", "huge_residual"])
def test_extreme_magnitudes_are_sent_raw(codec, backend, case):
    # "huge_base": a raw send left a finite base beyond MAX_MAGNITUDE, from which x - base
    # could overflow float32: the next activation goes raw. "huge_residual": x and the base
    # are in range but the residual (~2**126) overflows int1/int2's group scales and lowrank's
    # projections (fp8 and nm_sparse encode it). Either way
    # the site sends raw (no exception, no inf in a base), bases stay identical on both
    # sides, and compression resumes with ordinary residuals.
    from compactfusion.residual import MAX_MAGNITUDE

    cfg = CompactConfig(codec=codec, warmup_steps=1, min_numel=0, backend=backend)
    tx, rx = pair(cfg)
    shape = (64, 256)
    first = -torch.finfo(torch.bfloat16).max if case == "huge_base" else -MAX_MAGNITUDE / 2
    rx.decode("o", tx.encode("o", torch.full(shape, first, dtype=torch.bfloat16)))
    y = torch.full(shape, 1.0 if case == "huge_base" else MAX_MAGNITUDE / 2, dtype=torch.bfloat16)
    y[::2] *= -0.5
    p = tx.encode("o", y)
    rx.decode("o", p)
    raw = tx.raw_payload_nbytes(shape, torch.bfloat16)
    if case == "huge_base" or codec in ("int2", "int1", "lowrank"):  # (lowrank: r @ q overflows)
        assert p.numel() == raw and tx.stats()["nonfinite"] == 1
        assert torch.equal(tx.base("o"), y) and torch.equal(rx.base("o"), y)
    else:
        assert p.numel() < raw and tx.stats()["nonfinite"] == 0
    assert torch.equal(tx.base("o"), rx.base("o")) and bool(torch.isfinite(rx.base("o")).all())
    for _ in range(2):  # ordinary residuals again: compressed
        p = tx.encode("o", y)
        rx.decode("o", p)
        assert p.numel() < raw and torch.equal(tx.base("o"), rx.base("o"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_check_fits_matches_rounding(dtype):
    # The sender refuses a reconstruction exactly when rounding it to the activation dtype
    # gives inf: float32 sums just above the largest value that round back to it pass.
    from compactfusion.codecs import NonFiniteInput
    from compactfusion.codecs.base import check_fits, rounding_limit

    big = torch.finfo(dtype).max
    limit = rounding_limit(dtype)
    values = [big, -big, 0.0, float("inf"), float("nan")]
    if dtype != torch.float32:
        values += [limit, -limit, (big + limit) / 2, torch.nextafter(
            torch.tensor(limit, dtype=torch.float32), torch.tensor(0.0)).item()]  # fmt: skip
    for v in values:
        t = torch.tensor([1.0, v], dtype=torch.float32)
        finite = bool(torch.isfinite(t.to(dtype)).all())
        if finite:
            check_fits(t, dtype, "test")
        else:
            with pytest.raises(NonFiniteInput):
                check_fits(t, dtype, "test")
    assert limit > big


def test_naive_ablation_refuses_an_overflowing_reconstruction():
    # residual=False compresses x itself: int2's outer level 3d overshoots values near the
    # largest bf16, so the site sends raw instead of storing inf.
    cfg = CompactConfig(codec="int2", warmup_steps=1, min_numel=0, residual=False)
    tx, rx = pair(cfg)
    x = torch.full((8, 256), torch.finfo(torch.bfloat16).max / 2, dtype=torch.bfloat16)
    for _ in range(2):
        rx.decode("n", tx.encode("n", x))
    assert tx.stats()["nonfinite"] == 1 and torch.equal(rx.base("n"), x)


def test_decode_out_must_match_the_base():
    cfg = CompactConfig(codec="int2", warmup_steps=1, min_numel=0)
    tx, rx = pair(cfg)
    x = torch.randn(8, 256)
    rx.decode("d", tx.encode("d", x))
    with pytest.raises(ValueError, match="out must hold"):
        rx.decode("d", tx.encode("d", x * 1.1), out=torch.empty(8, 256, dtype=torch.float64))


def test_reset_and_independence():
    cfg = CompactConfig(codec="int2", warmup_steps=1, min_numel=0)
    a, b = ResidualCompressor(cfg), ResidualCompressor(cfg)
    x = torch.randn(8, 64)
    a.encode("s", x)
    assert b.base("s") is None
    a.reset()
    assert a.base("s") is None
    # After reset the next call is raw again (no base).
    assert a.encode("s", x).numel() == a.raw_payload_nbytes((8, 64), torch.float32)


def test_receiver_rejects_wrong_codec_and_missing_base():
    tx = ResidualCompressor(CompactConfig(codec="int1", warmup_steps=0, min_numel=0))
    x = torch.randn(8, 64)
    tx.encode("s", x)
    payload = tx.encode("s", x + 0.1)  # compressed int1 payload
    with pytest.raises(PayloadError, match="before any base"):
        ResidualCompressor(CompactConfig(codec="int1")).decode("s", payload)
    with pytest.raises(PayloadError, match="configs differ"):
        ResidualCompressor(CompactConfig(codec="int2")).decode("s", payload)


def test_without_error_feedback_bases_drift_apart():
    cfg = CompactConfig(codec="int1", warmup_steps=1, min_numel=0, error_feedback=False)
    tx, rx = pair(cfg)
    for x in drifting_sequence(steps=4):
        rx.decode("s", tx.encode("s", x))
    assert torch.equal(tx.base("s"), x)  # the sender keeps the exact activation
    assert not torch.equal(tx.base("s"), rx.base("s"))


def test_stats_is_plain_dict():
    cfg = CompactConfig(codec="int2", warmup_steps=1, min_numel=0)
    tx, rx = pair(cfg)
    for x in drifting_sequence(steps=3):
        rx.decode(("layer0", "k"), tx.encode(("layer0", "k"), x))
    st = tx.stats()
    assert isinstance(st, dict) and st["calls"] == 3 and st["raw_sends"] == 1
    assert st["ratio"] == st["raw_bytes"] / st["payload_bytes"]
    assert st["codec"]["name"] == "int2"
    assert "('layer0', 'k')" in st["sites"]
    assert rx.stats()["sites"]["('layer0', 'k')"]["role"] == "recv"
