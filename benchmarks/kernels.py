"""Benchmark the fused codec kernels against the eager torch reference codecs.

For each codec (int1, int2, fp8, nm_sparse) and activation size, times the sender
(``encode_residual``: residual, compress, pack, base update) and the receiver
(``decode_residual`` into a preallocated buffer) and reports:

* the median time and its spread (20th-80th percentile), from ``triton.testing.do_bench`` on
  CUDA (a wall-clock loop on CPU);
* GB/s counting the minimum bytes a one-pass kernel must move: encode = read x + read base +
  write base + write payload; decode = read payload + read base + write base;
* that bandwidth as a % of the device's copy bandwidth, measured in the same run
  (``torch.Tensor.copy_`` of a 1 GiB buffer on CUDA);
* the speed-up over the same codec's eager torch reference on the same device.

Rows go to ``kernels.csv`` (each stamped with the device name and the torch and triton
versions) and the plot ``kernels.png`` is drawn from that CSV.

``--torch-only`` times just the torch reference codecs at the real sizes (no Triton, no
interpreter) into ``kernels_torch.csv`` and prints, per codec, the throughput the ``auto``
policy plans with (``compactfusion.policy``: encode + decode bytes over encode + decode time,
at the largest size): the figure to put in ``COMPACTFUSION_CODEC_GBPS`` for a CPU run.

    python benchmarks/kernels.py                      # CUDA, FLUX / CogVideoX sizes, bf16
    python benchmarks/kernels.py --device cpu --out /tmp/bench   # CI smoke run (interpreter)
    python benchmarks/kernels.py --device cpu --torch-only --threads 1 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Appended, not prepended: benchmarks._report comes from the checkout, compactfusion from where
# it is installed (gpu_check.sh may test a wheel, whose compactfusion.kernels the checkout lacks).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import device_name, read_csv, version, write_csv  # noqa: E402

SIZES_CUDA = {
    "small 256x3072": (256, 3072),
    "FLUX ring shard 1024x3072": (1024, 3072),
    "CogVideoX shard 4440x1920": (4440, 1920),
    "FLUX K 4608x3072": (4608, 3072),
}
SIZES_CPU = {"tiny 8x256": (8, 256), "tiny 33x96": (33, 96)}  # the interpreter is slow
CODECS = ["int1", "int2", "fp8", "nm_sparse"]
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
FIELDS = [
    "codec",
    "size",
    "rows",
    "cols",
    "dtype",
    "op",
    "impl",
    "median_us",
    "p20_us",
    "p80_us",
    "min_bytes",
    "gbps",
    "pct_copy_bw",
    "speedup_vs_torch",
    "copy_gbps",
    "device",
    "torch",
    "triton",
]


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", default="benchmarks/results", help="directory for the CSV and plot")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--codecs", nargs="+", choices=CODECS, default=CODECS)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default per device)")
    p.add_argument(
        "--torch-only",
        action="store_true",
        help="time only the torch reference codecs, at the real sizes (the auto policy's figure)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument(
        "--size",
        action="append",
        type=_size,
        help="ROWSxCOLS to time instead of the default sizes (repeatable)",
    )
    return p.parse_args(argv)


def _size(text: str) -> tuple[str, tuple[int, int]]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 1024x3072, got {text!r}") from None
    if rows <= 0 or cols <= 0:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return f"{rows}x{cols}", (rows, cols)


def _sizes(args, default: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return dict(args.size) if args.size else default


def _timer(device: str, reps: int):
    """``bench(fn) -> (median, p20, p80)`` in microseconds."""
    if device == "cuda":
        import triton.testing

        def bench(fn):
            q = triton.testing.do_bench(fn, warmup=25, rep=max(reps, 50), quantiles=[0.5, 0.2, 0.8])
            return tuple(1e3 * v for v in q)

        return bench

    def bench(fn):
        fn()  # warm-up (interpreter set-up, allocations)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(1e6 * (time.perf_counter() - t0))
        # "inclusive": quantiles within the observed range (the default method extrapolates
        # beyond it with few samples: a negative p20 from 3 repetitions).
        qs = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) > 1 else [ts[0]] * 4
        return statistics.median(ts), qs[0], qs[3]

    return bench


def _time_case(bench, kernels, codec, x, base, payload, out):
    """Median/p20/p80 of the fused and the eager sender and receiver for one input."""
    fns = {
        ("encode", "triton"): lambda: kernels.encode_residual(codec, x, base),
        ("encode", "torch"): lambda: codec.encode_residual(x, base),
        ("decode", "triton"): lambda: kernels.decode_residual(codec, payload, base, out),
        ("decode", "torch"): lambda: codec.decode_residual(payload, base, out),
    }
    return {key: bench(fn) for key, fn in fns.items()}


def _copy_gbps(torch, device: str, bench) -> float:
    """Measured copy bandwidth (read + write bytes per second) of ``Tensor.copy_``."""
    n = (1 << 30) if device == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _, _ = bench(lambda: dst.copy_(src))
    return 2 * n / (med * 1e-6) / 1e9


def run(args) -> str:
    if args.torch_only:
        return run_torch_only(args)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated
    import compactfusion.kernels as kernels
    import torch
    import triton

    from compactfusion.codecs import get_codec

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for the smoke run")
    if args.device == "cpu" and not kernels.interpreted():
        raise SystemExit("--device cpu needs TRITON_INTERPRET=1 before the kernels are imported")
    dtype = getattr(torch, DTYPES[args.dtype])
    sizes = _sizes(args, SIZES_CUDA if args.device == "cuda" else SIZES_CPU)
    reps = args.reps or (100 if args.device == "cuda" else 3)
    bench = _timer(args.device, reps)
    cuda = args.device == "cuda"
    device = device_name(cuda, "" if cuda else "Triton interpreter")
    stamp = {"device": device, "torch": version("torch"), "triton": triton.__version__}
    copy_gbps = _copy_gbps(torch, args.device, bench)
    print(f"{device}: copy bandwidth {copy_gbps:.1f} GB/s")
    if args.device == "cpu":
        print("smoke run: interpreter timings say nothing about GPU speed")

    rows_out = []
    for name in args.codecs:
        codec = get_codec(name)
        for label, (rows, cols) in sizes.items():
            if not kernels.supports(codec, (rows, cols), dtype):
                print(f"skip {name} {label}: not supported by the kernels")
                continue
            g = torch.Generator(device=args.device).manual_seed(0)
            x = torch.randn(rows, cols, generator=g, device=args.device).to(dtype)
            base = (0.9 * x.float() + 0.1 * torch.randn_like(x.float())).to(dtype)
            out = torch.empty_like(base)
            payload, _ = kernels.encode_residual(codec, x, base)
            ref_payload, _ = codec.encode_residual(x, base)
            if not torch.equal(payload, ref_payload):
                raise SystemExit(f"{name} {label}: kernel payload differs from the reference")
            act = rows * cols * dtype.itemsize
            nbytes = {
                "encode": 3 * act + payload.numel(),
                "decode": payload.numel() + 2 * act,
            }
            times = _time_case(bench, kernels, codec, x, base, payload, out)
            for (op, impl), (med, p20, p80) in times.items():
                row = _row(name, label, rows, cols, args.dtype, op, impl, (med, p20, p80),
                           nbytes[op], copy_gbps, times[(op, "torch")][0] / med, stamp)  # fmt: skip
                gbps = float(row["gbps"])
                rows_out.append(row)
                print(
                    f"{name:9s} {label:28s} {op} {impl:6s} {med:10.1f} us "
                    f"[{p20:.1f}, {p80:.1f}] {gbps:8.1f} GB/s {row['pct_copy_bw']:>6s}% copy "
                    f"x{row['speedup_vs_torch']} vs torch"
                )

    path = _write_csv(rows_out, args.out, "kernels.csv")
    plot(path, os.path.join(args.out, "kernels.png"))
    return path


def _row(codec, size, rows, cols, dtype, op, impl, quantiles, min_bytes, copy_gbps, speedup,
         stamp) -> dict:  # fmt: skip
    """One CSV row (``quantiles``: median, p20, p80 in microseconds)."""
    med, p20, p80 = quantiles
    gbps = min_bytes / (med * 1e-6) / 1e9
    return {
        "codec": codec,
        "size": size,
        "rows": rows,
        "cols": cols,
        "dtype": dtype,
        "op": op,
        "impl": impl,
        "median_us": f"{med:.2f}",
        "p20_us": f"{p20:.2f}",
        "p80_us": f"{p80:.2f}",
        "min_bytes": min_bytes,
        "gbps": f"{gbps:.4g}",
        "pct_copy_bw": f"{100 * gbps / copy_gbps:.4g}",
        "speedup_vs_torch": f"{speedup:.4g}",
        "copy_gbps": f"{copy_gbps:.1f}",
        **stamp,
    }


def _write_csv(rows: list[dict], out_dir: str, name: str) -> str:
    path = write_csv(os.path.join(out_dir, name), FIELDS, rows)
    print(f"wrote {path}")
    return path


def run_torch_only(args) -> str:
    """Time the torch reference codecs (encode_residual / decode_residual) at the real sizes."""
    import torch

    from compactfusion.codecs import get_codec

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, DTYPES[args.dtype])
    reps = args.reps or (50 if args.device == "cuda" else 10)
    bench = _timer(args.device, reps)
    cuda = args.device == "cuda"
    device = device_name(cuda, "" if cuda else f"{torch.get_num_threads()} thread(s)")
    stamp = {"device": device, "torch": version("torch"), "triton": ""}
    copy_gbps = _copy_gbps(torch, args.device, bench)
    print(f"{device}: copy bandwidth {copy_gbps:.1f} GB/s")
    rows_out, policy = [], {}  # codec -> (numel, label, GB/s) of its largest size
    for name in args.codecs:
        codec = get_codec(name)
        for label, (rows, cols) in _sizes(args, SIZES_CUDA).items():
            g = torch.Generator(device=args.device).manual_seed(0)
            x = torch.randn(rows, cols, generator=g, device=args.device).to(dtype)
            base = (0.9 * x.float() + 0.1 * torch.randn_like(x.float())).to(dtype)
            out = torch.empty_like(base)
            payload, _ = codec.encode_residual(x, base)
            act = rows * cols * dtype.itemsize
            nbytes = {"encode": 3 * act + payload.numel(), "decode": payload.numel() + 2 * act}
            times = {
                "encode": bench(lambda c=codec, x=x, b=base: c.encode_residual(x, b)),
                "decode": bench(
                    lambda c=codec, p=payload, b=base, o=out: c.decode_residual(p, b, o)
                ),
            }
            for op, (med, p20, p80) in times.items():
                row = _row(name, label, rows, cols, args.dtype, op, "torch", (med, p20, p80),
                           nbytes[op], copy_gbps, 1.0, stamp)  # fmt: skip
                gbps = float(row["gbps"])
                rows_out.append(row)
                print(
                    f"{name:9s} {label:28s} {op} torch {med:10.1f} us [{p20:.1f}, {p80:.1f}] "
                    f"{gbps:8.2f} GB/s"
                )
            total_s = (times["encode"][0] + times["decode"][0]) * 1e-6
            gbps = (nbytes["encode"] + nbytes["decode"]) / total_s / 1e9
            print(f"{name:9s} {label:28s} policy figure {gbps:.2f} GB/s (encode + decode)")
            if name not in policy or rows * cols > policy[name][0]:
                policy[name] = (rows * cols, label, gbps)
    for name, (_, label, gbps) in policy.items():
        print(f"policy figure {name}: {gbps:.2f} GB/s (encode + decode, largest size {label})")
    return _write_csv(rows_out, args.out, "kernels_torch.csv")


def plot(csv_path: str, png_path: str) -> None:
    """Bars of % of copy bandwidth (fused kernels) and speed-up over torch, from the CSV."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = [r for r in read_csv(csv_path) if r["impl"] == "triton"]
    if not rows:
        return
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    width = 0.8 / len(codecs)
    for col, op in enumerate(("encode", "decode")):
        for row_i, (field, ylabel) in enumerate(
            (("pct_copy_bw", "% of copy bandwidth"), ("speedup_vs_torch", "speed-up vs torch"))
        ):
            ax = axes[row_i][col]
            for k, codec in enumerate(codecs):
                vals = []
                for s in sizes:
                    match = [r for r in rows if r["codec"] == codec and r["size"] == s]
                    match = [r for r in match if r["op"] == op]
                    vals.append(float(match[0][field]) if match else 0.0)
                xs = [i + (k - (len(codecs) - 1) / 2) * width for i in range(len(sizes))]
                ax.bar(xs, vals, width, label=codec)
            target = 80.0 if field == "pct_copy_bw" else 3.0  # issue #3's targets (GPU)
            ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op}")
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels(sizes, rotation=15, fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    r0 = rows[0]
    fig.suptitle(
        f"compactfusion fused kernels, {r0['dtype']} - {r0['device']} - torch {r0['torch']}, "
        f"triton {r0['triton']} (copy {r0['copy_gbps']} GB/s)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    print(f"wrote {png_path}")


if __name__ == "__main__":
    run(_parse_args())
