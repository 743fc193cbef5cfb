"""Fused Triton kernels against the torch reference codecs: payload bytes and bases must be
bit-identical. Without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set
below, before Triton decorates them); with CUDA the same tests run on the GPU."""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available() and __name__ != "__main__":  # __main__: the sm_90 build
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import compactfusion  # noqa: E402
from compactfusion.codecs import PayloadError, get_codec  # noqa: E402

K = importlib.import_module("compactfusion.kernels")  # kernels/ (package-dir mapping)
CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not K.interpreted(), reason="kernels not interpreted")
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA or K.interpreted(), reason="needs CUDA"),
        ],
    ),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONFIGS = [
    ("int1", {}),
    ("int1", {"group_size": 8}),
    ("int1", {"channel_scale": "none"}),
    ("int2", {}),
    ("int2", {"group_size": 32}),
    ("int2", {"group_size": 32, "channel_scale": "none"}),
    ("fp8", {}),
    ("nm_sparse", {}),
    ("nm_sparse", {"n": 2, "m": 8}),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in CONFIGS]
SHAPES = [(1, 8), (7, 96), (33, 256), (5, 123), (2, 3, 40)]


def _inputs(shape, dtype, device, kind="randn", seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        x = torch.randn(shape, generator=g)
        base = torch.randn(shape, generator=g) * 0.7
    elif kind == "zero":  # x == base: the residual is exactly zero
        x = torch.randn(shape, generator=g)
        base = x.clone()
    elif kind == "constant":
        x = torch.full(shape, 1.5)
        base = torch.full(shape, -0.25)
    elif kind == "ties":  # many equal magnitudes (nm_sparse tie-breaking) and signed zeros
        x = torch.randint(-2, 3, shape, generator=g).float() * 0.5
        base = torch.zeros(shape)
        base.view(-1)[::3] = -0.0
    elif kind == "spread":  # |x| from 2**-16 to 1 within each token: fp8 subnormal codes
        mag = torch.rand(shape, generator=g) * -16.0
        sign = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
        x = sign * torch.exp2(mag) * torch.logspace(-3, 3, shape[0]).reshape(-1, 1)
        base = torch.zeros(shape)
    elif kind == "wide":  # token scales from 1e-30 to 1e30 (fp32/bf16) and fp8 subnormals
        x = torch.randn(shape, generator=g)
        x = x * torch.logspace(-30, 30, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
        base = torch.zeros(shape)
    return x.to(dtype).to(device), base.to(dtype).to(device)


def _check(codec, x, base, out=None):
    """Kernel sender and receiver vs the reference (computed on CPU); returns the new base."""
    ref_payload, ref_base = codec.encode_residual(x.cpu(), base.cpu())
    base_before = base.clone()
    payload, new_base = K.encode_residual(codec, x, base)
    assert payload.device == x.device and payload.numel() == ref_payload.numel()
    assert torch.equal(payload.cpu(), ref_payload), "payload bytes differ from the reference"
    assert torch.equal(new_base.cpu().view(torch.uint8), ref_base.view(torch.uint8))
    assert torch.equal(base, base_before)  # the sender does not touch the base
    ref_out = codec.decode_residual(ref_payload, base.cpu())
    got = K.decode_residual(codec, payload, base, out=out)
    assert torch.equal(got.cpu().view(torch.uint8), ref_out.view(torch.uint8))
    assert torch.equal(got.cpu().view(torch.uint8), ref_base.view(torch.uint8))
    return got


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, name, kw, dtype, shape):
    codec = get_codec(name, **kw)
    _check(codec, *_inputs(shape, dtype, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "kw"), CONFIGS, ids=IDS)
@pytest.mark.parametrize("kind", ["zero", "constant", "ties", "spread", "wide"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_inputs(device, name, kw, kind, dtype):
    if kind == "wide" and dtype == torch.float16:
        pytest.skip("fp16 cannot hold 1e30")
    codec = get_codec(name, **kw)
    _check(codec, *_inputs((9, 40), dtype, device, kind))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("n", "m"), [(1, 2), (4, 32), (8, 16)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(7, 96), (3, 70)], ids=str)
def test_nm_sparse_index_widths(device, n, m, dtype, shape):
    _check(get_codec("nm_sparse", n=n, m=m), *_inputs(shape, dtype, device, "ties"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["int1", "int2", "fp8", "nm_sparse"])
@pytest.mark.parametrize(
    ("shape", "dtype"), [((130, 3072), torch.bfloat16), ((130, 8), torch.float16)], ids=str
)
def test_larger_shapes(device, name, shape, dtype):
    _check(get_codec(name), *_inputs(shape, dtype, device, seed=1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["int1", "int2"])
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((600, 40), torch.bfloat16), ((1030, 24), torch.float32), ((3, 256, 17), torch.float16)],
    ids=str,
)
def test_channel_scales_over_token_blocks(device, name, shape, dtype):
    """Channel sums over several blocks of 256 tokens (3, 5 and 3 blocks: a padded pairwise
    tree), with outlier channels, a zero channel and a spike."""
    codec = get_codec(name)
    x, base = _inputs(shape, dtype, device, seed=4)
    chan = torch.ones(shape[-1])
    chan[::7] = 10.0
    chan[1] = 0.0
    x = (x.float().cpu() * chan).to(dtype).to(device)
    base = (base.float().cpu() * chan).to(dtype).to(device)
    x.view(-1)[123] = 40.0
    _check(codec, x, base)


@pytest.mark.parametrize("device", DEVICES)
def test_unchanged_tensor_stays_exact(device):
    """A tensor that does not change between steps: zero residual, exact base, no NaN."""
    for name in ("int1", "int2"):
        codec = get_codec(name)
        x, _ = _inputs((300, 64), torch.bfloat16, device, seed=5)
        base = x.clone()
        for _ in range(3):
            payload, base = K.encode_residual(codec, x, base)
            assert torch.equal(base, x)
            assert torch.equal(K.decode_residual(codec, payload, x), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["int1", "int2", "fp8", "nm_sparse"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_strided_out_and_inputs(device, name, dtype):
    codec = get_codec(name)
    rows, cols = 11, 96
    x, base = _inputs((rows, cols), dtype, device, seed=2)
    # out: one slot of a gathered buffer, and a column slice with row stride 128
    gathered = torch.full((3, rows, cols), 7.0, dtype=dtype, device=device)
    got = _check(codec, x, base, out=gathered[1])
    assert got.data_ptr() == gathered[1].data_ptr()
    assert bool((gathered[0] == 7).all()) and bool((gathered[2] == 7).all())
    wide = torch.full((rows, 128), 7.0, dtype=dtype, device=device)
    _check(codec, x, base, out=wide[:, 16 : 16 + cols])
    assert bool((wide[:, :16] == 7).all()) and bool((wide[:, 16 + cols :] == 7).all())
    # strided x and base (row stride != cols), and a 3-D out slice along a leading dim
    xs = torch.zeros(rows, 2 * cols, dtype=dtype, device=device)
    xs[:, :cols] = x
    bs = torch.zeros(rows, cols + 32, dtype=dtype, device=device)
    bs[:, 32:] = base
    _check(codec, xs[:, :cols], bs[:, 32:])
    # in place: the receiver writes its own base
    b2 = base.clone()
    payload, new_base = K.encode_residual(codec, x, base)
    assert K.decode_residual(codec, payload, b2, out=b2) is b2
    assert torch.equal(b2, new_base)
    # the sender can update its base in place too
    b3 = base.clone()
    payload3, nb3 = K.encode_residual(codec, x, b3, out=b3)
    assert nb3 is b3 and torch.equal(b3, new_base) and torch.equal(payload3, payload)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["int1", "fp8", "nm_sparse"])
def test_error_feedback_steps_agree(device, name):
    codec = get_codec(name)
    x, _ = _inputs((17, 64), torch.bfloat16, device, seed=3)
    send = torch.zeros_like(x)
    recv_kernel = torch.zeros_like(x)
    recv_ref = torch.zeros_like(x).cpu()
    for step in range(4):
        xs = x + 0.1 * step
        payload, send = K.encode_residual(codec, xs, send)
        K.decode_residual(codec, payload, recv_kernel, out=recv_kernel)
        recv_ref = codec.decode_residual(payload.cpu(), recv_ref)
        assert torch.equal(send, recv_kernel)
        assert torch.equal(send.cpu(), recv_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_lowrank_is_routed(device):
    codec = get_codec("lowrank")
    x, base = _inputs((24, 40), torch.float32, device)
    payload, new_base = K.encode_residual(codec, x, base, codec.new_state())
    assert torch.equal(payload.cpu(), codec.encode_residual(x.cpu(), base.cpu())[0])
    assert torch.equal(K.decode_residual(codec, payload, base), new_base)


@pytest.mark.parametrize("device", DEVICES)
def test_misaligned_payload_is_accepted(device):
    codec = get_codec("int2")
    x, base = _inputs((5, 64), torch.bfloat16, device)
    payload, new_base = K.encode_residual(codec, x, base)
    buf = torch.zeros(payload.numel() + 3, dtype=torch.uint8, device=device)
    buf[3:] = payload
    assert torch.equal(K.decode_residual(codec, buf[3:], base), new_base)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_payloads_raise(device):
    codec = get_codec("int1")
    x, base = _inputs((5, 64), torch.float32, device)
    payload, _ = K.encode_residual(codec, x, base)
    with pytest.raises(PayloadError):
        K.decode_residual(codec, payload[:-16], base)
    with pytest.raises(PayloadError):
        K.decode_residual(codec, payload.view(torch.int8), base)
    with pytest.raises(PayloadError):  # a payload for another shape
        K.decode_residual(codec, payload, torch.zeros(5, 65, device=device))
    if device == "cpu":  # the header is only read back where that costs no sync
        bad = payload.clone()
        bad[0] = 0
        with pytest.raises(PayloadError):
            K.decode_residual(codec, bad, base)
        half = codec.encode(x.half())  # int1 sizes do not depend on the dtype: the header does
        assert half.numel() == payload.numel()
        with pytest.raises(PayloadError):
            K.decode_residual(codec, half, base)


def test_supports_and_unsupported():
    int1, fp8, nm = get_codec("int1"), get_codec("fp8"), get_codec("nm_sparse")
    assert K.supports(int1, (4096, 3072), torch.bfloat16)
    assert K.supports(int1, (3, 5, 7), torch.float16)
    assert K.supports(fp8, (2, 16384), torch.float32)
    assert not K.supports(fp8, (2, 16385), torch.float32)
    assert K.supports(nm, (7, 10), torch.bfloat16)
    assert K.supports(get_codec("nm_sparse", n=4, m=32), (7, 10), torch.bfloat16)
    assert not K.supports(get_codec("nm_sparse", n=3, m=8), (7, 64), torch.bfloat16)
    assert not K.supports(get_codec("nm_sparse", n=1, m=64), (7, 64), torch.bfloat16)
    assert not K.supports(get_codec("raw"), (7, 64), torch.bfloat16)
    assert not K.supports(int1, (7, 64), torch.float64)
    assert not K.supports(int1, (0, 64), torch.float32)
    assert K.supports(get_codec("lowrank"), (64, 96), torch.bfloat16)  # routed to lowrank.py
    with pytest.raises(K.KernelUnsupported, match="raw"):
        K.encode_residual(get_codec("raw"), torch.zeros(2, 8), torch.zeros(2, 8))
    assert issubclass(K.KernelUnsupported, ValueError)


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_layouts_raise(device):
    codec = get_codec("int1")
    x, base = _inputs((4, 6, 16), torch.float32, device)
    buf = torch.zeros(4, 10, 16, device=device)
    with pytest.raises(K.KernelUnsupported, match="strided"):
        K.decode_residual(codec, codec.encode(x.cpu()).to(device), base, out=buf[:, 2:8])
    with pytest.raises(K.KernelUnsupported, match="last dimension"):
        K.encode_residual(codec, x.transpose(1, 2).contiguous().transpose(1, 2), base)
    with pytest.raises(K.KernelUnsupported, match="dtype"):
        K.encode_residual(codec, x, base.half())
    with pytest.raises(ValueError, match="out"):
        K.encode_residual(codec, x, base, out=torch.zeros(4, 6, 15, device=device))


def test_benchmark_smoke(tmp_path):
    """``benchmarks/kernels.py --device cpu`` runs end to end and writes its CSV and plot."""
    import csv
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(compactfusion.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
    proc = subprocess.run(
        [sys.executable, os.path.join(script, "kernels.py"), "--device", "cpu"]
        + ["--codecs", "int1", "--reps", "1", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "kernels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["op"], r["impl"]) for r in rows} == {
        (op, impl) for op in ("encode", "decode") for impl in ("triton", "torch")
    }
    assert all(r["torch"] == torch.__version__ and r["device"] for r in rows)
    assert all(float(r["median_us"]) > 0 and int(r["min_bytes"]) > 0 for r in rows)


def test_benchmark_torch_only(tmp_path, capsys):
    """``--torch-only`` times the reference codecs at a given size without Triton and prints
    the auto policy's planning figure per codec."""
    import csv

    bench = _load_benchmark()
    args = bench._parse_args(
        ["--device", "cpu", "--torch-only", "--codecs", "int2", "fp8", "--reps", "2"]
        + ["--size", "64x256", "--size", "8x96", "--threads", "1", "--out", str(tmp_path)]
    )
    bench.run(args)
    with open(tmp_path / "kernels_torch.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["codec"], r["size"], r["op"]) for r in rows} == {
        (c, s, op)
        for c in ("int2", "fp8")
        for s in ("64x256", "8x96")
        for op in ("encode", "decode")
    }
    assert all(r["impl"] == "torch" and float(r["gbps"]) > 0 for r in rows)
    out = capsys.readouterr().out
    assert "policy figure int2:" in out and "policy figure fp8:" in out
    with pytest.raises(SystemExit):
        bench._parse_args(["--size", "64by256"])


def _load_benchmark():
    import importlib.util

    path = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "kernels.py"
    )
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(CUDA, reason="the CUDA tests compile the kernels for real")
def test_kernels_compile_for_sm90():
    """The interpreter never compiles: build every bf16 kernel for an H100 (sm_90) with
    Triton's bundled compiler (no GPU needed) in a fresh process without TRITON_INTERPRET."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(compactfusion.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--compile-sm90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled 14 kernels" in proc.stdout


def _compile_sm90() -> None:
    """Compile the bf16 kernels for sm_90; check correctly rounded division and no spills."""
    import triton
    from compactfusion.kernels import _grouped, fp8, nm_sparse
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not K.interpreted()

    def build(fn, ptr_types, consts, warps):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = ptr_types.get(name, "*u8")
            else:
                sig[name] = "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        ptx = out.asm["ptx"]
        assert "div.full" not in ptx and "div.approx" not in ptx, fn.__name__
        assert "ld.local" not in ptx, f"{fn.__name__} spills registers"
        return ptx

    io = {"x_ptr": "*i16", "base_ptr": "*i16", "out_ptr": "*i16", "scales_ptr": "*i16"}
    io.update(cscale_ptr="*i16", part_ptr="*fp32")
    count = 0
    for bits in (1, 2):
        for cs in (0, 1):
            consts = dict(BITS=bits, GE=256, NB=32 * bits, BLOCK_R=16, DT=2, HDR_N=32, CS=cs)
            assert "div.rn.f32" in build(_grouped.grouped_encode_kernel, io, consts, 8)
            consts = dict(BITS=bits, GE=256, BLOCK_R=4, BLOCK_B=128 * bits, DT=2, CS=cs)
            build(_grouped.grouped_decode_kernel, io, consts, 8)
            count += 2
    build(_grouped.channel_partial_kernel, io, dict(CB=256, BC=16, DT=2), 4)
    consts = dict(NBP=8, LOG_NBP=3, BC=512)
    assert "div.rn.f32" in build(_grouped.channel_scale_kernel, io, consts, 4)
    count += 2
    consts = dict(BLOCK_R=1, BLOCK_C=4096, DT=2, HDR_N=32)
    assert "div.rn.f32" in build(fp8.fp8_encode_kernel, io, consts, 8)
    build(fp8.fp8_decode_kernel, io, dict(BLOCK_R=4, BLOCK_C=1024, DT=2), 8)
    nm_io = {**io, "vals_ptr": "*i16"}
    build(nm_sparse.nm_encode_kernel, nm_io, dict(N=1, M=4, IB=2, BG=256, DT=2, HDR_N=32), 4)
    build(nm_sparse.nm_decode_kernel, nm_io, dict(N=1, M=4, IB=2, BG=256, DT=2), 4)
    count += 4
    print(f"compiled {count} kernels for sm_90")


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    _compile_sm90()
