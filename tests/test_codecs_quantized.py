"""Reference codecs int1, int2, fp8 and nm_sparse: round trips, error bounds, wire sizes and
payload validation."""

from __future__ import annotations

import struct

import pytest
import torch

from compactfusion.codecs import NonFiniteInput, PayloadError, get_codec, header_nbytes
from compactfusion.codecs._grouped import unpack_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONFIGS = [
    ("int1", {}),
    ("int1", {"group_size": 8}),
    ("int2", {}),
    ("int2", {"group_size": 64}),
    ("int1", {"channel_scale": "none"}),
    ("int2", {"group_size": 64, "channel_scale": "none"}),
    ("fp8", {}),
    ("nm_sparse", {}),
    ("nm_sparse", {"n": 2, "m": 8}),
    ("nm_sparse", {"n": 3, "m": 16}),
]
SHAPES = [(1, 1), (5, 123), (7, 96), (3, 256), (2, 3, 40), (2, 1, 3, 17), ()]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in CONFIGS]


def _codec(name, kw):
    return get_codec(name, **kw)


def _data(payload, shape):
    return payload[header_nbytes(len(shape)) :]


def _roundtrip(codec, x):
    payload, recon = codec.encode_with_reconstruction(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == codec.payload_nbytes(x.shape, x.dtype)
    assert payload.numel() % 16 == 0
    out = codec.decode(payload)
    assert out.shape == x.shape and out.dtype == x.dtype
    # the sender's reconstruction is the receiver's decode, bit for bit
    assert torch.equal(recon.to(x.dtype).reshape(x.shape), out)
    assert torch.equal(codec.encode(x), payload)  # deterministic
    return payload, recon.reshape(x.shape), out


# --- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_roundtrip_shapes(name, kw, dtype, shape):
    codec = _codec(name, kw)
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    _, recon, _ = _roundtrip(codec, x)
    assert bool(torch.isfinite(recon).all())


@pytest.mark.parametrize("name", ["int1", "int2", "fp8", "nm_sparse"])
def test_roundtrip_large(name):
    codec = get_codec(name)
    torch.manual_seed(1)
    x = torch.randn(1024, 3072).bfloat16()
    _, recon, _ = _roundtrip(codec, x)
    err = (recon - x.float()).norm() / x.float().norm()
    assert err < {"int1": 0.65, "int2": 0.45, "fp8": 0.05, "nm_sparse": 0.8}[name]


@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zeros_and_tiny_decode_to_zero(name, kw, dtype):
    codec = _codec(name, kw)
    for x in (torch.zeros(4, 40), torch.full((4, 40), 2.0**-101), -torch.zeros(3, 9)):
        x = x.to(dtype)
        _, _, out = _roundtrip(codec, x)
        if name != "nm_sparse":  # nm_sparse keeps the exact values of the kept entries
            assert bool((out == 0).all())


@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_input(name, kw, dtype):
    codec = _codec(name, kw)
    x = torch.full((6, 72), -3.0, dtype=dtype)
    _, _, out = _roundtrip(codec, x)
    expect = {"int1": -3.0, "int2": -3.0 * 0.625, "fp8": -3.0}.get(name)
    if name == "nm_sparse":
        assert int((out != 0).sum()) == 6 * sum(
            min(codec.n, 72 - g * codec.m) for g in range(-(-72 // codec.m))
        )
        assert bool(((out == 0) | (out == -3.0)).all())
    else:
        assert torch.allclose(out.float(), torch.full_like(out.float(), expect), rtol=2**-4)


@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (torch.float32, 1e30),
        (torch.float32, 1e-30),
        (torch.float32, 1e-31),  # below 2**-100: scales are zero
        # int2 levels reach 1.875x a group's mean magnitude (times the channel scale), which
        # can lie above the largest input near the fp16 maximum (check_fits then sends raw)
        (torch.float16, 3e3),
        (torch.float16, 1e-5),
        (torch.bfloat16, 1e30),
        (torch.bfloat16, 1e-30),
    ],
    ids=str,
)
def test_extreme_magnitudes(name, kw, dtype, scale):
    codec = _codec(name, kw)
    torch.manual_seed(2)
    x = (torch.randn(5, 48).clamp(-2, 2) * scale).to(dtype)
    _, recon, out = _roundtrip(codec, x)
    assert bool(torch.isfinite(out).all())
    xf = x.double()
    rel = ((recon.double() - xf).norm() / xf.norm().clamp_min(1e-300)).item()
    if scale >= 1e-30 or dtype == torch.float16:
        assert rel < 1.0
        if name == "fp8":
            assert rel < 0.06


@pytest.mark.parametrize("name", ["int1", "int2", "fp8", "nm_sparse", "lowrank"])
@pytest.mark.parametrize("cols", [16, 300])  # 300: a padded last group
def test_non_finite_input_raises(name, cols):
    codec = get_codec(name)
    for bad in (float("inf"), -float("inf"), float("nan")):
        for where in ((1, 5), (2, cols - 1)):
            x = torch.randn(3, cols)
            x[where] = bad
            with pytest.raises(NonFiniteInput, match="non-finite"):
                codec.encode(x)


# --- error bounds -------------------------------------------------------------------------------
def _scales(codec, payload, rows, cols, shape):
    """Group scales (``rows x ngroups``), channel scales (``cols``, ones when none are sent)
    and the layout, read from a payload."""
    lay = codec.layout(rows, cols)
    data = _data(payload, shape)
    s = data[lay.scales_offset : lay.scales_offset + 2 * rows * lay.ngroups]
    s = s.view(torch.bfloat16).float().reshape(rows, lay.ngroups)
    c = torch.ones(cols)
    if codec.sends_channel_scales(rows):
        c = data[lay.channels_offset : lay.channels_offset + 2 * cols].view(torch.bfloat16)
        c = c.float()
    return s, c, lay


def _outlier_matrix(rows, cols, seed):
    """Gaussian with lognormal channel scales, a few 10x channels and a zero channel."""
    g = torch.Generator().manual_seed(seed)
    chan = torch.exp(torch.randn(cols, generator=g) * 0.5)
    chan[::37] *= 10
    r = torch.randn(rows, cols, generator=g) * chan * torch.rand(rows, 1, generator=g) * 10
    r[:, 5] = 0
    return r


def _mean_abs_bound_ok(got, mean, m):
    """bf16 rounding of a mean plus the truncation of each term (< 2**(E-15) of its max)."""
    return bool(((got.double() - mean).abs() <= mean * 2**-8 + m * 2**-15).all())


@pytest.mark.parametrize("channel_scale", ["none", "mean"])
@pytest.mark.parametrize("group_size", [8, 64, 256])
def test_int1_sign_and_scale(group_size, channel_scale):
    codec = get_codec("int1", group_size=group_size, channel_scale=channel_scale)
    rows = 260  # at least CHANNEL_MIN_ROWS: "mean" sends channel scales
    r = _outlier_matrix(rows, 300, 3)
    payload, recon = codec.encode_with_reconstruction(r)
    s, c, lay = _scales(codec, payload, rows, 300, r.shape)
    live = c > 0
    assert bool(((recon >= 0) == (r >= 0))[:, live].all())
    assert bool((recon[:, ~live] == 0).all())  # a zero channel decodes to exact zeros
    per_elem = s.repeat_interleave(lay.group, 1)[:, :300] * c
    assert torch.equal(recon.abs(), per_elem)
    # channel scales: the mean of |r| over the tokens; group scales: the mean of |r / c|
    ra = r.abs().double()
    assert (
        _mean_abs_bound_ok(c[live], ra.mean(0)[live], ra.amax(0)[live]) or channel_scale == "none"
    )
    u = (ra / torch.where(live, c, 1.0).double()) * live
    up = torch.nn.functional.pad(u, (0, lay.padded_cols - 300))
    up = up.reshape(rows, lay.ngroups, lay.group)
    counts = torch.tensor([min(lay.group, 300 - g * lay.group) for g in range(lay.ngroups)])
    mean = up.sum(-1) / counts
    assert bool(((s.double() - mean).abs() <= mean * 2**-7 + up.amax(-1) * 2**-14).all())


def test_grouped_scale_is_order_independent():
    codec = get_codec("int2", group_size=64)
    torch.manual_seed(4)
    r = torch.randn(300, 64) * 1e3
    perm = torch.randperm(64)
    p1, _ = codec.encode_with_reconstruction(r)
    p2, _ = codec.encode_with_reconstruction(r[:, perm])
    s1, c1, _ = _scales(codec, p1, 300, 64, r.shape)
    s2, c2, _ = _scales(codec, p2, 300, 64, r.shape)
    assert torch.equal(s1, s2) and torch.equal(c1[perm], c2)
    # the channel scales do not depend on the order of the tokens either (blocks of 256)
    p3, _ = codec.encode_with_reconstruction(r[torch.randperm(300)])
    _, c3, _ = _scales(codec, p3, 300, 64, r.shape)
    assert torch.equal(c1, c3)


@pytest.mark.parametrize("rows", [1, 255, 256, 257, 1100])
def test_channel_mean_abs_is_exact_and_guarded(rows):
    from compactfusion.codecs._grouped import channel_mean_abs

    g = torch.Generator().manual_seed(rows)
    r = torch.randn(rows, 20, generator=g) * torch.logspace(-35, 35, 20)
    r[:, 3] = 0  # a zero channel
    r[:, 4] = 2.0**-110  # below 2**-100: scale 0
    r[0, 6] = 1e6  # a spike
    mean = channel_mean_abs(r)
    ref = r.abs().double().mean(0)
    ok = (mean.double() - ref).abs() <= ref * 2**-20 + r.abs().double().amax(0) * 2**-15
    tiny = r.abs().amax(0) < 2.0**-100  # channels 0, 1 (1e-35, 7e-32), 3 and 4: scale 0
    assert bool(ok[~tiny].all()) and bool((mean[tiny] == 0).all()) and int(tiny.sum()) == 4
    assert bool(torch.isfinite(mean).all())


@pytest.mark.parametrize("channel_scale", ["none", "mean"])
@pytest.mark.parametrize("group_size", [8, 96, 256])
def test_int2_error_bound(group_size, channel_scale):
    codec = get_codec("int2", group_size=group_size, channel_scale=channel_scale)
    torch.manual_seed(5)
    r = _outlier_matrix(257, 500, 5) ** 3 / 100
    payload, recon = codec.encode_with_reconstruction(r)
    d, c, lay = _scales(codec, payload, 257, 500, r.shape)
    d = d.repeat_interleave(lay.group, 1)[:, :500].double()
    c = c.double()
    u = r.double() / torch.where(c > 0, c, 1.0) * (c > 0)
    err = (recon.double() - r.double()).abs()
    bound = torch.maximum(d, u.abs() - 3 * d) * c
    assert bool((err <= bound * (1 + 2**-20) + r.double().abs() * 2**-22).all())
    dc = d * c
    levels = torch.where(dc > 0, recon.double() / torch.where(dc > 0, dc, 1.0), 1.0)
    assert bool(torch.isin(levels, torch.tensor([-3.0, -1.0, 1.0, 3.0], dtype=torch.double)).all())


@pytest.mark.parametrize("name", ["int1", "int2"])
def test_channel_scales_beat_group_scales_on_outlier_channels(name):
    """With 10x outlier channels, the small channels of a group are swamped by the large ones
    unless the channels are normalised first."""
    r = _outlier_matrix(256, 1024, 6)
    errs = {}
    for cs in ("none", "mean"):
        _, recon = get_codec(name, channel_scale=cs).encode_with_reconstruction(r)
        errs[cs] = float((recon - r).norm() / r.norm())
    assert errs["mean"] < 0.8 * errs["none"], errs


def test_fp8_error_bound_and_codes():
    codec = get_codec("fp8")
    torch.manual_seed(6)
    r = torch.randn(13, 333) * torch.logspace(-20, 20, 13).unsqueeze(1)
    r[3] = 0
    payload, recon = codec.encode_with_reconstruction(r)
    m = r.abs().amax(1, keepdim=True).double()
    assert bool(((recon.double() - r.double()).abs() <= m * 2**-4).all())
    codes = _data(payload, r.shape)[: 13 * 333].view(torch.float8_e4m3fn).float().reshape(13, 333)
    assert float(codes.abs().max()) <= 448.0
    assert bool((recon[3] == 0).all())


def _brute_force_keep(r, n, m):
    rows, cols = r.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for i in range(rows):
        for g0 in range(0, cols, m):
            a = r[i, g0 : g0 + m].abs().tolist()
            order = sorted(range(len(a)), key=lambda k: (-a[k], k))
            for k in order[:n]:
                keep[i, g0 + k] = True
    return keep


@pytest.mark.parametrize(("n", "m"), [(1, 4), (2, 4), (2, 8), (3, 16), (1, 2)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nm_keeps_exactly_the_n_largest(n, m, dtype):
    codec = get_codec("nm_sparse", n=n, m=m)
    torch.manual_seed(7)
    x = torch.randint(-3, 4, (6, 45)).float() * 0.5  # many ties
    x = x.to(dtype)
    _, recon = codec.encode_with_reconstruction(x)
    keep = _brute_force_keep(x.float(), n, m)
    assert torch.equal(recon != 0, keep & (x.float() != 0))
    assert torch.equal(recon[keep], x.float()[keep])


def test_nm_indices_ascending_and_padding():
    codec = get_codec("nm_sparse", n=2, m=4)
    x = torch.tensor([[0.0, 5.0, -7.0, 1.0, 2.0, 0.0]])  # 2 groups, the last one padded
    payload = codec.encode(x)
    lay = codec.layout(1, 6, torch.float32)
    data = _data(payload, x.shape)
    vals = data[: lay.values_nbytes].view(torch.float32).tolist()
    idx = data[lay.index_offset : lay.index_offset + lay.index_row_bytes].reshape(1, -1)
    idx = unpack_bits(idx, lay.index_bits, lay.slots).tolist()[0]
    assert idx == [1, 2, 0, 1] and vals == [5.0, -7.0, 2.0, 0.0]
    assert codec.decode(payload).tolist() == [[0.0, 5.0, -7.0, 0.0, 2.0, 0.0]]


def test_nm_values_saturate_in_fp16():
    codec = get_codec("nm_sparse")
    x = torch.tensor([[1e5, 0.0, 0.0, 0.0, -1e6, 0.0, 0.0, 0.0]])
    payload, recon = codec.encode_with_reconstruction(x, dtype=torch.float16)
    assert recon.tolist()[0][0] == 65504.0 and recon.tolist()[0][4] == -65504.0


# --- sizes --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kw", "ratio"),
    [
        ("int1", {}, 14.0),
        ("int2", {}, 7.0),
        ("fp8", {}, 1.99),
        ("nm_sparse", {}, 2.5),
        ("nm_sparse", {"n": 1, "m": 8}, 5.0),
    ],
)
def test_wire_ratio_vs_bf16(name, kw, ratio):
    shape = (4096, 3072)
    codec = get_codec(name, **kw)
    assert 2 * 4096 * 3072 / codec.payload_nbytes(shape, torch.bfloat16) >= ratio


@pytest.mark.parametrize(
    ("name", "kw", "ratio"),
    [
        ("int2", {}, 7.5),
        ("int1", {}, 14.5),
        ("int2", {"channel_scale": "none"}, 7.75),
        ("int1", {"channel_scale": "none"}, 15.0),
    ],
)
def test_wire_ratio_flux_shard(name, kw, ratio):
    """A 1024 x 3072 bf16 shard, headers and all scales included."""
    shape = (1024, 3072)
    codec = get_codec(name, **kw)
    assert 2 * 4096 * 3072 / codec.payload_nbytes(shape, torch.bfloat16) >= ratio


@pytest.mark.parametrize("name", ["int1", "int2"])
def test_channel_scales_from_min_rows_on(name):
    """Below CHANNEL_MIN_ROWS tokens "mean" sends no channel scales (bit-identical payload to
    "none"); from it on it does (2 bytes per channel more)."""
    from compactfusion.codecs._grouped import CHANNEL_MIN_ROWS

    mean, none = get_codec(name), get_codec(name, channel_scale="none")
    r = _outlier_matrix(CHANNEL_MIN_ROWS, 96, 8)
    few = r[: CHANNEL_MIN_ROWS - 1]
    p_mean, rec_mean = mean.encode_with_reconstruction(few)
    p_none, rec_none = none.encode_with_reconstruction(few)
    assert not mean.sends_channel_scales(CHANNEL_MIN_ROWS - 1)
    assert torch.equal(rec_mean, rec_none) and p_mean.numel() == p_none.numel()
    assert torch.equal(mean.decode(p_mean), rec_mean)
    assert mean.sends_channel_scales(CHANNEL_MIN_ROWS)
    shape = (CHANNEL_MIN_ROWS, 96)
    extra = mean.payload_nbytes(shape, torch.float32) - none.payload_nbytes(shape, torch.float32)
    assert extra >= 2 * 96
    p_mean, rec_mean = mean.encode_with_reconstruction(r)
    assert torch.equal(mean.decode(p_mean), rec_mean)


def test_payload_nbytes_formulas():
    hdr = header_nbytes(2)
    # codes, group scales, channel scales (2 per channel, from 256 rows on), padded to 16 bytes
    nbytes = hdr + 256 * 64 + 256 * 2 * 2 + 1024
    assert get_codec("int1").payload_nbytes((256, 512), torch.bfloat16) == nbytes
    assert get_codec("int1").payload_nbytes((4, 512), torch.bfloat16) == hdr + 4 * 64 + 16
    assert get_codec("int2", group_size=8).payload_nbytes((1, 8), torch.float32) == hdr + 32
    old = get_codec("int1", channel_scale="none")
    assert old.payload_nbytes((4, 512), torch.bfloat16) == hdr + 4 * 64 + 16
    old = get_codec("int2", group_size=8, channel_scale="none")
    assert old.payload_nbytes((1, 8), torch.float32) == hdr + 32
    assert get_codec("fp8").payload_nbytes((3, 10), torch.float16) == hdr + 32 + 16
    # 1:4, bf16, 10 channels -> 3 groups, 3 values (6 bytes) + 6 index bits (1 byte)
    assert get_codec("nm_sparse").payload_nbytes((2, 10), torch.bfloat16) == hdr + 16 + 16


# --- parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kw", "param"),
    [
        ("int1", {"group_size": 12}, "group_size"),
        ("int1", {"group_size": 512}, "group_size"),
        ("int2", {"group_size": 0}, "group_size"),
        ("int2", {"group_size": 8.0}, "group_size"),
        ("int2", {"channel_scale": "max"}, "channel_scale"),
        ("int1", {"channel_scale": None}, "channel_scale"),
        ("nm_sparse", {"m": 6}, "m"),
        ("nm_sparse", {"m": 512}, "m"),
        ("nm_sparse", {"n": 4, "m": 4}, "n"),
        ("nm_sparse", {"n": 0}, "n"),
    ],
)
def test_bad_params_raise(name, kw, param):
    with pytest.raises(ValueError, match=param):
        get_codec(name, **kw)


def test_defaults_as_dict_and_header_params():
    assert get_codec("int1").as_dict() == {
        "name": "int1",
        "group_size": 256,
        "channel_scale": "mean",
    }
    assert get_codec("int2", group_size=32).header_params() == (32, 1, 0, 0)
    assert get_codec("int2", channel_scale="none").header_params() == (256, 0, 0, 0)
    assert get_codec("fp8").as_dict() == {"name": "fp8"}
    nm = get_codec("nm_sparse")
    assert nm.as_dict() == {"name": "nm_sparse", "n": 1, "m": 4}
    assert nm.header_params() == (1, 4, 0, 0)
    assert {c: get_codec(c).codec_id for c in ("fp8", "int2", "int1", "nm_sparse")} == {
        "fp8": 1,
        "int2": 2,
        "int1": 3,
        "nm_sparse": 4,
    }
    for name, kw in [
        ("int1", {}),
        ("int2", {"channel_scale": "none"}),
        ("fp8", {}),
        ("nm_sparse", {}),
    ]:
        codec = get_codec(name, **kw)
        assert type(codec).from_header_params(codec.header_params()).as_dict() == codec.as_dict()
        assert codec.__doc__ and "Layout" in codec.__doc__


@pytest.mark.parametrize("name", ["raw", "fp8", "int2", "int1", "nm_sparse", "lowrank"])
def test_describe_is_a_deprecated_alias_of_as_dict(name):
    codec = get_codec(name)
    with pytest.warns(DeprecationWarning, match=r"describe\(\) is deprecated, use as_dict") as w:
        old = codec.describe()
    assert old == codec.as_dict() and old["name"] == name
    assert [r.filename for r in w] == [__file__]


def test_a_codec_overriding_the_old_describe_keeps_its_parameters():
    from compactfusion.codecs.nm_sparse import NMSparseCodec

    with pytest.warns(DeprecationWarning, match="overrides Codec.describe.*rename it to as_dict"):

        class OldStyle(NMSparseCodec):
            def describe(self):
                return {"name": "old_style", "n": self.n, "m": self.m}

    assert OldStyle(n=2, m=8).as_dict() == {"name": "old_style", "n": 2, "m": 8}


# --- corrupt payloads ---------------------------------------------------------------------------
def _patched(payload, offset, fmt, value):
    raw = bytearray(bytes(payload.tolist()))
    struct.pack_into(fmt, raw, offset, value)
    return torch.frombuffer(raw, dtype=torch.uint8).clone()


@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
def test_corrupt_payloads_raise(name, kw):
    codec = _codec(name, kw)
    x = torch.randn(3, 40)
    p = codec.encode(x)
    bad = {
        "magic": _patched(p, 0, "<2s", b"XX"),
        "version": _patched(p, 2, "<B", 99),
        "codec": _patched(p, 3, "<B", 0 if codec.codec_id != 0 else 1),
        "param": _patched(p, 8, "<H", codec.header_params()[0] + 1),
        "shape": _patched(p, 16, "<q", 4),
        "truncated": p[:-16],
        "padded": torch.cat([p, torch.zeros(16, dtype=torch.uint8)]),
        "short": p[:10],
    }
    for what, q in bad.items():
        with pytest.raises(PayloadError):
            codec.decode(q)
            pytest.fail(f"decode accepted a payload with a bad {what}")
        with pytest.raises(PayloadError):
            codec.decode_residual(q, torch.zeros(3, 40))
    # a header naming another dtype decodes (as that dtype) but not onto this base
    with pytest.raises(PayloadError):
        codec.decode_residual(_patched(p, 4, "<B", 1), torch.zeros(3, 40))
    other = get_codec("int2" if name != "int2" else "int1")
    with pytest.raises(PayloadError):
        other.decode(p)
    with pytest.raises(PayloadError):  # base of another shape
        codec.decode_residual(p, torch.zeros(3, 41))
    with pytest.raises(PayloadError):  # base of another dtype
        codec.decode_residual(p, torch.zeros(3, 40, dtype=torch.float16))


def test_nm_corrupt_index_raises():
    codec = get_codec("nm_sparse", n=1, m=8)  # 4-bit indices can hold values >= 8
    p = codec.encode(torch.randn(2, 16))
    lay = codec.layout(2, 16, torch.float32)
    q = p.clone()
    q[header_nbytes(2) + lay.index_offset] = 0xFF
    with pytest.raises(PayloadError, match="index"):
        codec.decode(q)


# --- residual steps -----------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_error_feedback_sender_and_receiver_agree(name, kw, dtype):
    codec = _codec(name, kw)
    torch.manual_seed(8)
    x = torch.randn(8, 64).to(dtype)
    send = torch.zeros_like(x)
    recv = torch.zeros_like(x)
    first = None
    for _ in range(12):
        payload, send = codec.encode_residual(x, send)
        recv = codec.decode_residual(payload, recv, out=recv)
        assert torch.equal(send, recv)
        err = (x.float() - send.float()).norm().item()
        first = err if first is None else first
    assert err < 0.5 * first  # error feedback: repeated steps converge towards x
