"""Hardening of the codec layer (issue 14, weak spots 5, 7 and 9).

5. A non-contiguous payload (``p[::2]``) raises ``PayloadError`` in every decoder; a
   misaligned one (a slice at an offset that is not a multiple of 16 bytes) is copied and
   decodes exactly as the aligned payload.
7. The public codec API refuses (``NonFiniteInput``) finite input whose reconstruction would
   not be finite in the output dtype, without host reads inside ``deferred_checks``.
9. ``ResidualCompressor.decode`` validates ``out`` and the header's codec parameters before it
   touches the site.
"""

import pytest
import torch

from compactfusion import CompactConfig, ResidualCompressor
from compactfusion.codecs import NonFiniteInput, PayloadError, get_codec
from compactfusion.codecs.base import ALIGN, deferred_checks
from compactfusion.testing.host_reads import HostReadCounter

CODECS = ["raw", "fp8", "int1", "int2", "nm_sparse", "lowrank"]
LOSSY = CODECS[1:]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPE = (6, 40)  # odd sizes: partial groups, padding between sections


def _x(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).to(dtype)


def _strided(p):
    """Views of ``p``'s storage that are not contiguous: every other byte of the payload
    (what the audit tried), and a stride-2 view whose elements are the payload's bytes in
    order (refused as well: a payload is one contiguous buffer)."""
    return [p[::2], torch.stack([p, p], 1).reshape(-1)[::2]]


def _misaligned(p, offset):
    buf = torch.zeros(p.numel() + offset, dtype=torch.uint8)
    buf[offset:] = p
    q = buf[offset:]
    assert q.data_ptr() % ALIGN and torch.equal(q, p)
    return q


# --- 5: payload layout ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CODECS)
def test_codec_decoders_refuse_strided_and_copy_misaligned_payloads(name, dtype):
    codec = get_codec(name)
    x, base = _x(dtype), _x(dtype, seed=1)
    p = codec.encode(x)
    rp, new_base = codec.encode_residual(x, base)
    expected = codec.decode(p)
    for q in _strided(p):
        with pytest.raises(PayloadError, match="contiguous"):
            codec.decode(q)
        with pytest.raises(PayloadError, match="contiguous"):
            codec.decode_known(q, SHAPE, dtype)
    for q in _strided(rp):
        for check_header in (True, False):
            with pytest.raises(PayloadError, match="contiguous"):
                codec.decode_residual(q, base, check_header=check_header)
    for offset in (1, 4):
        assert torch.equal(codec.decode(_misaligned(p, offset)), expected)
        assert torch.equal(codec.decode_known(_misaligned(p, offset), SHAPE, dtype), expected)
        for check_header in (True, False):
            got = codec.decode_residual(_misaligned(rp, offset), base, check_header=check_header)
            assert torch.equal(got, new_base)


@pytest.mark.parametrize("name", CODECS)
def test_compressor_decode_and_receive_refuse_strided_payloads(name):
    cfg = CompactConfig(codec=name, warmup_steps=1, min_numel=0, backend="torch")
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    x = _x(torch.bfloat16)
    for step in range(2):  # a raw warm-up payload, then a compressed one (but for raw)
        xs = x + 0.1 * step
        p = tx.encode("s", xs)
        for q in _strided(p):
            with pytest.raises(PayloadError, match="contiguous"):
                rx.decode("s", q)
        expected = xs if tx.codec.lossless or step == 0 else tx.base("s")
        assert torch.equal(rx.decode("s", _misaligned(p, 3)), expected)
    # send / receive (the collectives' path, no host reads)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    for step in range(2):
        compressed = tx.exchange_compressed("g", ["k"], SHAPE, torch.bfloat16)
        (p,) = tx.send("g", [("k", x + 0.1 * step)], compressed)
        out = torch.empty_like(x)
        for q in _strided(p):
            with pytest.raises(PayloadError, match="contiguous"):
                rx.receive("g", "k", q, out, compressed)
        rx.receive("g", "k", _misaligned(p, 3), out, compressed)
        if tx.codec.lossless or step == 0:
            assert torch.equal(out, x + 0.1 * step)
        else:
            assert torch.equal(rx.base("k"), tx.base("k"))
        tx.end_step()
        rx.end_step()


@pytest.mark.parametrize("name", LOSSY)
def test_kernel_decoders_refuse_strided_and_copy_misaligned_payloads(name):
    kernels = pytest.importorskip("compactfusion.kernels")
    if not kernels.interpreted() and not torch.cuda.is_available():
        pytest.skip("kernels need CUDA or TRITON_INTERPRET=1")
    device = "cpu" if kernels.interpreted() else "cuda"
    codec = get_codec(name)
    x, base = _x(torch.bfloat16).to(device), _x(torch.bfloat16, seed=1).to(device)
    p, new_base = kernels.encode_residual(codec, x, base, codec.new_state())
    for q in _strided(p):
        with pytest.raises(PayloadError, match="contiguous"):
            kernels.decode_residual(codec, q, base)
    buf = torch.zeros(p.numel() + 3, dtype=torch.uint8, device=device)
    buf[3:] = p
    assert torch.equal(kernels.decode_residual(codec, buf[3:], base), new_base)


# --- 7: values at the dtype's maximum ------------------------------------------------------------
def _at_max(dtype, fraction=1.0):
    return _filled(torch.finfo(dtype).max * fraction, dtype)


def _filled(value, dtype):
    x = torch.full(SHAPE, value, dtype=torch.float64)
    x[:, ::2] *= -1
    x[::3] *= 0.5
    return x.to(dtype)


# What the audit reproduced: these decoded finite input at the dtype's maximum to inf.
OVERFLOWED = [
    ("fp8", torch.bfloat16),
    ("int2", torch.float32),
    ("int2", torch.bfloat16),
    ("int1", torch.float32),
    ("int1", torch.float16),
    ("int1", torch.bfloat16),
    ("lowrank", torch.float16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", LOSSY)
def test_encode_never_decodes_finite_input_to_inf(name, dtype):
    codec = get_codec(name)
    x = _at_max(dtype)
    if (name, dtype) in OVERFLOWED:
        with pytest.raises(NonFiniteInput, match="not finite"):
            codec.encode(x)
        with pytest.raises(NonFiniteInput):
            codec.encode_with_reconstruction(x)
        return
    try:
        y = codec.decode(codec.encode(x))
    except NonFiniteInput:
        return  # refusing is allowed; decoding to inf is not
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CODECS)
def test_large_finite_input_that_fits_still_encodes(name, dtype):
    # A quarter of fp16's maximum; 2**100 for fp32 and bf16: int1/int2 form their scales from
    # integer sums of up to 2**24 * 2**(E - 15) (E = the group's exponent), which overflow
    # float32 from about 2**118 (a group of 256); lowrank's R @ Q from about 2**123. Such
    # inputs are refused (NonFiniteInput), as the test above requires.
    codec = get_codec(name)
    x = _filled(min(torch.finfo(dtype).max / 4, 2.0**100), dtype)
    y = codec.decode(codec.encode(x))
    assert torch.isfinite(y).all()
    assert torch.allclose(y.double(), x.double(), rtol=1.0)  # same order of magnitude


def test_raw_still_carries_non_finite_values():
    x = _x(torch.bfloat16)
    x[0, 0], x[1, 1] = float("inf"), float("nan")
    raw = get_codec("raw")
    assert torch.equal(raw.decode(raw.encode(x)).view(torch.int16), x.view(torch.int16))


def test_residual_beyond_the_dtype_is_accepted_when_the_new_base_fits():
    # r = x - base is 1.5x fp16's maximum (finite in float32): encode(r) as fp16 would decode
    # to inf, but the new base base + decode(r) fits, which is all encode_residual needs.
    codec = get_codec("fp8")
    x = _at_max(torch.float16, 0.75)
    base = -x
    with pytest.raises(NonFiniteInput):
        codec.encode_with_reconstruction(x.float() - base.float(), dtype=torch.float16)
    payload, new_base = codec.encode_residual(x, base)
    assert torch.isfinite(new_base).all()
    assert torch.equal(codec.decode_residual(payload, base), new_base)


@pytest.mark.parametrize("name", LOSSY)
def test_deferred_refusal_records_a_flag_without_host_reads(name):
    codec = get_codec(name)
    x = _at_max(torch.float16)
    with HostReadCounter() as reads, deferred_checks() as checks:
        codec.encode_with_reconstruction(x, codec.new_state())
        failed = checks.failed("cpu")
    assert reads.count() == 0
    assert bool(failed) == ((name, torch.float16) in OVERFLOWED)
    with HostReadCounter() as reads, deferred_checks() as checks:
        codec.encode_with_reconstruction(_x(torch.float16), codec.new_state())
        failed = checks.failed("cpu")
    assert reads.count() == 0 and not bool(failed)


# --- 9: ResidualCompressor.decode validates out and the header -----------------------------------
def _pair_after_warmup(name, dtype=torch.bfloat16):
    cfg = CompactConfig(codec=name, codec_params={}, warmup_steps=1, min_numel=0)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    x = _x(dtype)
    rx.decode("s", tx.encode("s", x))
    return tx, rx, x


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "int2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_refuses_a_wrong_out(compressed, dtype):
    tx, rx, x = _pair_after_warmup("int2", dtype)
    p = tx.encode("s", x * 1.1, force_raw=not compressed)
    before = rx.base("s").clone()
    other = torch.float16 if dtype != torch.float16 else torch.float32
    wrong = [
        torch.empty(SHAPE, dtype=other),  # dtype
        torch.empty(SHAPE[::-1], dtype=dtype),  # same numel, other shape
        torch.empty(SHAPE, dtype=dtype, device="meta"),  # device
    ]
    for out in wrong:
        with pytest.raises(ValueError, match="out must hold"):
            rx.decode("s", p, out=out)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        rx.decode("s", p, out=before.tolist())
    assert torch.equal(rx.base("s"), before)  # nothing was stored
    out = torch.empty(SHAPE, dtype=dtype)
    assert rx.decode("s", p, out=out) is out
    assert torch.equal(out, tx.base("s"))


@pytest.mark.parametrize("name", ["raw", "int2", "nm_sparse", "lowrank"])
def test_decode_refuses_other_header_parameters(name):
    tx, rx, x = _pair_after_warmup(name)
    for force_raw in (True, False):
        p = tx.encode("s", x * 1.1, force_raw=force_raw).clone()
        p[8] ^= 1  # header parameter 0 (raw: must be 0; int2: group size; lowrank: rank ...)
        before = rx.base("s")
        with pytest.raises(PayloadError, match="header parameters"):
            rx.decode("s", p)
        assert rx.base("s") is before or torch.equal(rx.base("s"), before)
        rx.decode("s", tx.encode("s", x, force_raw=True))  # bases agree again


def test_decode_refuses_a_raw_payload_of_the_wrong_size():
    tx, rx, x = _pair_after_warmup("int2")
    p = tx.encode("s", x, force_raw=True)
    padded = torch.cat([p, torch.zeros(16, dtype=torch.uint8)])
    with pytest.raises(PayloadError, match="must be .* bytes"):
        rx.decode("s", padded)
