"""Tests of the ``lowrank`` codec (torch reference) and its GPU path (``kernels/lowrank.py``).

Without CUDA the Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``, which has to
be set before the kernel module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from compactfusion.codecs import PayloadError, get_codec, header_nbytes, rows_cols  # noqa: E402
from compactfusion.codecs.lowrank import LowRankCodec, reconstruct  # noqa: E402

try:
    from compactfusion.kernels import lowrank as klr  # noqa: E402
except ImportError:  # source checkout without `pip install -e .`: repo root on PYTHONPATH
    from kernels import lowrank as klr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FACTOR_DTYPES = ["bf16", "int8"]
SHAPES = [(1, 1), (5, 123), (7, 96), (3, 4, 40), (2, 3, 5, 16), ()]


def _rand(shape, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _low_rank(rows, cols, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, m, generator=g) @ torch.randn(m, cols, generator=g)


def _rel(a, b):
    """Relative Frobenius error of ``a`` to ``b``, scaled first so huge values cannot overflow."""
    scale = b.float().abs().max().clamp_min(1e-38)
    a, b = a.float() / scale, b.float() / scale
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _factors(codec, payload):
    shape, _, data = codec.parse(payload)
    return codec.factor_views(data, *rows_cols(shape))


# --- parameters and header --------------------------------------------------------------------
@pytest.mark.parametrize(
    "params, name",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 1.5}, "rank"),
        ({"rank": True}, "rank"),
        ({"rank": 1 << 16}, "rank"),
        ({"iters": 0}, "iters"),
        ({"factor_dtype": "fp8"}, "factor_dtype"),
        ({"seed": "1"}, "seed"),
        ({"seed": 1 << 64}, "seed"),
    ],
)
def test_bad_params_raise_naming_the_parameter(params, name):
    with pytest.raises(ValueError, match=name):
        get_codec("lowrank", **params)


def test_header_params_and_as_dict():
    c = get_codec("lowrank")  # defaults: rank 16, 2 iterations, int8 factors (the preset)
    assert isinstance(c, LowRankCodec) and c.codec_id == 5
    assert c.header_params() == (16, 2, 1, 0)
    assert get_codec("lowrank", factor_dtype="bf16").header_params() == (16, 2, 0, 0)
    c = get_codec("lowrank", rank=4, iters=3, factor_dtype="bf16", seed=0x12345)
    assert c.header_params() == (4, 3, 0, 0x2345)
    assert c.as_dict() == {
        "name": "lowrank",
        "rank": 4,
        "iters": 3,
        "factor_dtype": "bf16",
        "seed": 0x12345,
    }


def test_factor_dtype_travels_in_the_header():
    """Payloads of explicit bf16 factors decode as before; a codec of the other factor dtype
    (such as the int8 default) refuses them by their header instead of misreading them."""
    x = _low_rank(24, 40, 3)
    bf16, int8 = get_codec("lowrank", rank=4, factor_dtype="bf16"), get_codec("lowrank", rank=4)
    payload = bf16.encode(x)
    assert payload.numel() == header_nbytes(2) + 2 * 4 * (24 + 40)
    assert _rel(get_codec("lowrank", rank=4, factor_dtype="bf16").decode(payload), x) < 1e-2
    with pytest.raises(PayloadError, match=r"parameters \(4, 2, 0, 0\) do not match"):
        int8.decode(payload)
    with pytest.raises(PayloadError, match=r"parameters \(4, 2, 1, 0\) do not match"):
        bf16.decode(int8.encode(x))


def test_wire_ratios_and_layout():
    rows, cols, k = 1024, 3072, 16
    bf16 = get_codec("lowrank", rank=k, factor_dtype="bf16")
    int8 = get_codec("lowrank", rank=k)  # the default
    hdr = header_nbytes(2)
    assert bf16.payload_nbytes((rows, cols), torch.bfloat16) == hdr + 2 * k * (rows + cols)
    assert int8.payload_nbytes((rows, cols), torch.bfloat16) == hdr + k * (rows + cols) + 2 * 32
    ratio = {
        (fd, r): 2 * r * cols / c.payload_nbytes((r, cols), torch.bfloat16)
        for fd, c in (("bf16", bf16), ("int8", int8))
        for r in (1024, 4096)
    }
    assert ratio["bf16", 4096] >= 60  # 109.7x
    assert ratio["bf16", 1024] > 47.9  # 48.0x: rank 16 bf16 factors at a FLUX ring shard
    assert ratio["int8", 1024] > 95  # 95.9x
    assert ratio["int8", 4096] > 219  # 219.2x
    # Odd sizes: k = min(16, 5, 123) = 5 and every section starts 16-byte aligned.
    lay = int8.layout(5, 123)
    assert (lay.k, lay.q_off, lay.p_scale_off, lay.q_scale_off, lay.nbytes) == (
        5,
        32,
        656,
        672,
        688,
    )


# --- reference round trip ---------------------------------------------------------------------
@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip(shape, dtype, factor_dtype):
    c = get_codec("lowrank", rank=4, factor_dtype=factor_dtype)
    x = _rand(shape, dtype)
    payload, recon = c.encode_with_reconstruction(x, c.new_state())
    assert payload.dtype == torch.uint8 and payload.numel() == c.payload_nbytes(shape, dtype)
    y = c.decode(payload)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()
    # Encode's reconstruction is what decode computes, bit for bit.
    assert torch.equal(y, recon.to(dtype).reshape(shape))
    # A projection never makes the residual larger (up to factor rounding).
    assert (x.float() - y.float()).norm() <= 1.02 * x.float().norm()
    base = _rand(shape, dtype, seed=1)
    payload, new_base = c.encode_residual(x, base, c.new_state())
    assert torch.equal(c.decode_residual(payload, base), new_base)


@pytest.mark.parametrize("factor_dtype, tol", [("bf16", 1e-2), ("int8", 3e-2)])
def test_flux_shard_once(factor_dtype, tol):
    c = get_codec("lowrank", rank=16, factor_dtype=factor_dtype)
    x = (_low_rank(1024, 3072, 16) + 1e-3 * _rand((1024, 3072))).to(torch.bfloat16)
    payload = c.encode(x)
    assert payload.numel() == c.payload_nbytes(x.shape, x.dtype)
    assert _rel(c.decode(payload), x) < tol


@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 123), (2, 3, 16)])
def test_zeros_and_constants(shape, factor_dtype):
    c = get_codec("lowrank", rank=4, factor_dtype=factor_dtype)
    state = c.new_state()
    zeros = torch.zeros(shape)
    assert torch.equal(c.decode(c.encode(zeros, state)), zeros)
    assert torch.isfinite(state.q).all()
    # A zero step keeps the warm start alive: the next (rank-1) residual is still recovered.
    for value in (3.0, -1e-3):
        x = torch.full(shape, value)
        y = c.decode(c.encode(x, state))
        assert torch.isfinite(y).all() and _rel(y, x) < 1e-2
    assert torch.isfinite(state.q).all()


@pytest.mark.parametrize(
    "dtype, scale", [(torch.float32, 1e30), (torch.float32, 1e-30), (torch.bfloat16, 1e35)]
)
@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("iters", [1, 2, 3])
def test_extreme_magnitudes(dtype, scale, factor_dtype, iters):
    c = get_codec("lowrank", rank=6, factor_dtype=factor_dtype, iters=iters)
    state = c.new_state()
    x = (_low_rank(24, 80, 6) * scale).to(dtype)
    for _ in range(3):  # also checks the stored warm start does not overflow or underflow
        y = c.decode(c.encode(x, state))
        assert torch.isfinite(y).all() and _rel(y, x) < 3e-2


def test_extreme_magnitudes_fp16():
    c = get_codec("lowrank", rank=6)
    x = _low_rank(24, 80, 6)
    x = (x / x.abs().max() * 6e4).half()
    y = c.decode(c.encode(x))
    assert torch.isfinite(y).all() and _rel(y, x) < 1e-2


# --- approximation quality ----------------------------------------------------------------------
@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_exact_recovery_of_rank_at_most_k(m, iters):
    c = get_codec("lowrank", rank=8, iters=iters, factor_dtype="bf16")
    a = _low_rank(60, 90, m, seed=m)
    p, q = c.factorize(a)
    assert _rel(p @ q.T, a) < 1e-5  # float32 factors: exact up to rounding
    assert torch.allclose(p.T @ p, torch.eye(8), atol=1e-5)  # orthonormal (completed) basis
    assert _rel(c.decode(c.encode(a)), a) < 1e-2  # bf16 factors: their rounding only


def test_power_iterations_reach_the_best_rank_k_error():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(64, 64, generator=g)).Q
    v = torch.linalg.qr(torch.randn(96, 64, generator=g)).Q
    a = (u * 0.8 ** torch.arange(64)) @ v.T
    best = torch.linalg.svdvals(a)[8:].norm() / a.norm()  # Eckart-Young
    err = {}
    for iters in (1, 12):
        p, q = get_codec("lowrank", rank=8, iters=iters).factorize(a)
        err[iters] = _rel(p @ q.T, a)
    assert err[12] < err[1]
    assert err[12] < 1.01 * best


def test_warm_start_beats_cold_start_on_a_drifting_sequence():
    g = torch.Generator().manual_seed(1)
    rows, cols, m, k = 96, 160, 24, 8
    s = 0.7 ** torch.arange(m)
    u = torch.linalg.qr(torch.randn(rows, m, generator=g)).Q
    v = torch.linalg.qr(torch.randn(cols, m, generator=g)).Q
    c = get_codec("lowrank", rank=k, iters=1)  # one iteration: the warm start must carry it
    state = c.new_state()
    warm, cold, best = [], [], []
    for t in range(12):
        u = torch.linalg.qr(u + 0.03 * torch.randn(rows, m, generator=g)).Q
        v = torch.linalg.qr(v + 0.03 * torch.randn(cols, m, generator=g)).Q
        r = (u * s) @ v.T + 3e-3 * torch.randn(rows, cols, generator=g)
        w = _rel(c.decode(c.encode(r, state)), r)
        if t >= 4:
            warm.append(w)
            cold.append(_rel(c.decode(c.encode(r)), r))
            best.append((torch.linalg.svdvals(r)[k:].norm() / r.norm()).item())
    mean = lambda xs: sum(xs) / len(xs)
    assert mean(warm) < 0.7 * mean(cold)
    assert mean(warm) < 1.03 * mean(best)
    assert state.calls == 12 and state.resets == 1


@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
def test_error_feedback_converges_on_a_fixed_target(factor_dtype):
    c = get_codec("lowrank", rank=4, factor_dtype=factor_dtype)
    x = _rand((40, 96))
    base, state = torch.zeros_like(x), c.new_state()
    for _ in range(14):  # each step removes a 4-dim subspace of the 40-dim residual
        _, base = c.encode_residual(x, base, state)
    assert _rel(base, x) < 1e-2


# --- seeding and state ------------------------------------------------------------------------
def test_seeded_init_identical_across_instances():
    x = _rand((33, 70))
    a, b = get_codec("lowrank", rank=5, seed=7), get_codec("lowrank", rank=5, seed=7)
    sa, sb = a.new_state(), b.new_state()
    assert torch.equal(a.encode(x, sa), b.encode(x, sb))
    assert torch.equal(sa.q, sb.q)
    assert torch.equal(a.encode(x), b.encode(x))  # stateless calls start from the same seed
    other = get_codec("lowrank", rank=5, seed=8)
    assert not torch.equal(a.encode(x)[64:], other.encode(x)[64:])


def test_state_resets_when_the_shape_changes():
    c = get_codec("lowrank", rank=3)
    state = c.new_state()
    x, y = _rand((10, 20)), _rand((12, 20), seed=1)
    c.encode(x, state)
    c.encode(x, state)
    assert state.resets == 1
    assert torch.equal(c.encode(y, state), c.encode(y))  # restarted from the seed
    assert state.resets == 2 and state.q.shape == (20, 3)


# --- payload validation -----------------------------------------------------------------------
def test_corrupt_and_mismatched_payloads_raise():
    c = get_codec("lowrank", rank=4)
    x = _rand((6, 50))
    payload = c.encode(x)
    with pytest.raises(PayloadError):
        c.decode(payload[:-1])
    with pytest.raises(PayloadError):
        c.decode(torch.cat([payload, torch.zeros(16, dtype=torch.uint8)]))
    bad = payload.clone()
    bad[0] = 0
    with pytest.raises(PayloadError):
        c.decode(bad)
    for other in (
        get_codec("lowrank", rank=5),
        get_codec("lowrank", iters=3, rank=4),
        get_codec("lowrank", rank=4, factor_dtype="bf16"),
        get_codec("lowrank", rank=4, seed=1),
    ):
        with pytest.raises(PayloadError):
            other.decode(payload)
    with pytest.raises(PayloadError):
        c.decode(get_codec("raw").encode(x))
    with pytest.raises(PayloadError):
        c.decode_residual(payload, torch.zeros(6, 51))
    with pytest.raises(PayloadError):
        c.decode_residual(payload, torch.zeros(6, 50, dtype=torch.float16))
    wrong_rows = payload.clone()
    wrong_rows[16] = 12  # the header's first dimension: the data no longer fits the shape
    with pytest.raises(PayloadError, match="bytes"):
        c.decode(wrong_rows)
    with pytest.raises(PayloadError):
        klr.decode_residual_lowrank(c, payload.to(DEVICE), torch.zeros(6, 49, device=DEVICE))


# --- GPU path (Triton; interpreter on CPU) ----------------------------------------------------
_EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _kernel_tolerance(codec, payload, base, ref):
    """The documented bound: one ulp of the dtype plus float32 summation-order error."""
    f = _factors(codec, payload)
    p, q = f.p.float().abs(), f.q.float().abs()
    if f.p_scale is not None:
        p, q = p * f.p_scale.float(), q * f.q_scale.float()
    k = p.shape[1]
    s = (p @ q.T).reshape(ref.shape)
    tiny = torch.finfo(ref.dtype).smallest_normal * _EPS[ref.dtype]
    u = 2.0**-24
    return _EPS[ref.dtype] * ref.float().abs() + 2 * (k + 1) * u * (base.float().abs() + s) + tiny


@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 123), (7, 96), (2, 17, 48), (2, 3, 5, 16)])
def test_kernel_matches_reference(shape, dtype, factor_dtype):
    c = get_codec("lowrank", rank=4, factor_dtype=factor_dtype)
    x = _rand(shape, dtype, seed=2, device=DEVICE)
    base = _rand(shape, dtype, seed=3, device=DEVICE)
    payload, new_base = klr.encode_residual_lowrank(c, x, base, c.new_state())
    ref_payload, ref_base = c.encode_residual(x, base, c.new_state())
    assert torch.equal(payload, ref_payload)
    assert new_base.dtype == dtype and new_base.shape == base.shape
    diff = (new_base.float() - ref_base.float()).abs()
    assert (diff <= _kernel_tolerance(c, payload, base, ref_base)).all()
    # The receiver, through the same kernel, gets the sender's base bit for bit.
    assert torch.equal(klr.decode_residual_lowrank(c, payload, base), new_base)


@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
def test_kernel_error_feedback_loop_sender_equals_receiver(factor_dtype):
    c = get_codec("lowrank", rank=3, factor_dtype=factor_dtype)
    shape = (2, 19, 40)
    x0, drift = _rand(shape, seed=10), _rand(shape, seed=11)
    sender = torch.zeros(shape, dtype=torch.bfloat16, device=DEVICE)
    receiver = sender.clone()
    ref_state, state = c.new_state(), c.new_state()
    ref_base = sender.clone()
    for t in range(6):
        x = (x0 + 0.1 * t * drift).to(DEVICE, torch.bfloat16)
        payload, sender = klr.encode_residual_lowrank(c, x, sender, state, out=sender)
        klr.decode_residual_lowrank(c, payload, receiver, out=receiver)  # in place
        assert torch.equal(sender, receiver)
        _, ref_base = c.encode_residual(x, ref_base, ref_state)
        # An ulp of difference in one step's base changes the next residual and so the next
        # factors: the two paths may drift apart by up to the factor quantization level, but
        # they track the target equally well.
        assert _rel(sender, ref_base) < 3e-2
        assert abs(_rel(sender, x) - _rel(ref_base, x)) < 0.05 * _rel(ref_base, x)
    assert _rel(sender, x) < 0.7
    assert state.calls == 6 and state.resets == 1


def test_kernel_decodes_into_a_slice_of_a_gathered_buffer():
    c = get_codec("lowrank", rank=2)
    base = _rand((3, 9, 24), torch.float16, device=DEVICE)
    x = _rand((3, 9, 24), torch.float16, device=DEVICE)
    payload, new_base = klr.encode_residual_lowrank(c, x, base)
    gathered = torch.zeros(2, 3, 9, 24, dtype=torch.float16, device=DEVICE)
    klr.decode_residual_lowrank(c, payload, base, out=gathered[1])
    assert torch.equal(gathered[1], new_base) and not gathered[0].any()
    # Row-strided 2-D views work for the base as well.
    wide = torch.zeros(27, 48, dtype=torch.float16, device=DEVICE)
    wide[:, :24] = base.reshape(27, 24)
    out = klr.lowrank_base_update(
        _factors(c, payload), wide[:, :24], torch.empty_like(wide[:, :24])
    )
    assert torch.equal(out, new_base.reshape(27, 24))


@pytest.mark.parametrize("factor_dtype", FACTOR_DTYPES)
@pytest.mark.parametrize("value", [0.0, 2.5])
def test_kernel_zeros_and_constants(value, factor_dtype):
    c = get_codec("lowrank", rank=4, factor_dtype=factor_dtype)
    base = torch.zeros(9, 33, dtype=torch.bfloat16, device=DEVICE)
    x = torch.full_like(base, value)
    payload, new_base = klr.encode_residual_lowrank(c, x, base, c.new_state())
    assert torch.isfinite(new_base).all()
    assert torch.allclose(new_base.float(), x.float(), rtol=2e-2, atol=0)


def test_kernel_base_update_against_reconstruct():
    c = get_codec("lowrank", rank=16, factor_dtype="int8")
    r = _rand((70, 130))
    payload = c.encode(r)
    f = _factors(c, payload)
    base = _rand((70, 130), seed=5)
    ref = base + reconstruct(f)
    f_dev = type(f)(*(t.to(DEVICE) for t in f))
    out = klr.lowrank_base_update(f_dev, base.to(DEVICE), torch.empty(70, 130, device=DEVICE))
    tol = _kernel_tolerance(c, payload, base, ref)
    assert ((out.cpu() - ref).abs() <= tol).all()


def test_kernel_input_validation():
    c = get_codec("lowrank", rank=2)
    x = _rand((4, 8), device=DEVICE)
    with pytest.raises(ValueError, match="differ in shape"):
        klr.encode_residual_lowrank(c, x, torch.zeros(4, 9, device=DEVICE))
    with pytest.raises(klr.KernelUnsupported, match="dtype"):
        klr.encode_residual_lowrank(c, x, x.half())
    with pytest.raises(klr.KernelUnsupported, match="contiguous"):
        klr.encode_residual_lowrank(c, torch.zeros(8, 4, device=DEVICE).T, x)
    with pytest.raises(TypeError):
        klr.encode_residual_lowrank(get_codec("raw"), x, x)
    payload = c.encode(x.cpu()).to(DEVICE)
    with pytest.raises(klr.KernelUnsupported, match="contiguous"):
        klr.decode_residual_lowrank(c, payload, x, out=torch.zeros(8, 4, device=DEVICE).T)
    with pytest.raises(PayloadError, match="bytes"):
        klr.decode_residual_lowrank(c, payload[:-16], x)
    # Row-strided inputs need no copy and give the same result as contiguous ones.
    wide = torch.zeros(4, 16, device=DEVICE)
    wide[:, :8] = x
    base = torch.zeros(4, 8, device=DEVICE)
    strided = klr.encode_residual_lowrank(c, wide[:, :8], base, c.new_state())
    dense = klr.encode_residual_lowrank(c, x, base, c.new_state())
    assert all(torch.equal(a, b) for a, b in zip(strided, dense, strict=True))
