"""Fidelity cost and memory saving of compact base storage (``CompactConfig.base_storage``).

Two measurements, per step, for ``base_storage`` = ``full`` (the default), ``int8`` and
``fp8`` with the int2 and int1 codecs (error feedback on, 1 raw warm-up step):

* ``synthetic``: one sender and one receiver ``ResidualCompressor`` on a drifting K/V-like
  trajectory (512 tokens x 256 channels, bf16, 50 steps): a fixed pattern plus a low-rank
  walk and noise, 4 outlier channels ~10x larger than the rest and 2 sink tokens ~5x larger.
  Error: ``||reconstruction - x||_F / ||x||_F`` of the receiver at each step.
* ``tiny-flux``: the default workload of ``benchmarks/quality.py`` (tiny random FLUX, 2+2
  blocks, 4 heads x 64, bf16, 64 px, 20 steps, ring attention over 2 gloo ranks, compressed
  all-gather), with ``quality.KVProbe`` measuring each step's K/V reconstruction error
  against the exact K/V of the same run, the final output's relative error against the
  uncompressed run, and ``stats()["base_bytes"]`` per rank.

Rows go to ``base_storage.csv`` (per step) and ``base_storage.md`` (summary: mean and final
error, growth = mean of the last 5 steps / mean of steps 2-6, base bytes per rank).

    python benchmarks/base_storage.py                  # both measurements
    python benchmarks/base_storage.py --smoke --out /tmp/bs
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._report import machine_stamp, write_csv  # noqa: E402
from compactfusion import CompactConfig, ResidualCompressor  # noqa: E402
from compactfusion.config import BASE_STORAGES  # noqa: E402
from compactfusion.memory import storage_nbytes  # noqa: E402

CODECS = ("int2", "int1")
FIELDS = ["source", "codec", "storage", "step", "kv_rel_err", "device", "torch"]


def _quality_module():
    """``benchmarks/quality.py`` (its KV probe and tiny-model settings), loaded by path."""
    spec = importlib.util.spec_from_file_location(
        "cf_bench_quality", os.path.join(ROOT, "benchmarks", "quality.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
def synthetic_trajectory(steps: int, tokens: int = 512, channels: int = 256, seed: int = 0):
    """Drifting bf16 activations with outlier channels and sink tokens (see the docstring)."""
    g = torch.Generator().manual_seed(seed)
    col = torch.ones(channels)
    col[torch.randperm(channels, generator=g)[:4]] = 10.0
    row = torch.ones(tokens, 1)
    row[:2] = 5.0
    x = torch.randn(tokens, channels, generator=g)
    out = []
    for _ in range(steps):
        u, v = torch.randn(tokens, 4, generator=g), torch.randn(channels, 4, generator=g)
        x = x + 0.05 * (u @ v.T) / 2 + 0.01 * torch.randn(tokens, channels, generator=g)
        out.append((x * col * row).to(torch.bfloat16))
    return out


def synthetic_errors(codec: str, storage: str, steps: int) -> list[float]:
    cfg = CompactConfig(codec=codec, min_numel=0, base_storage=storage)
    tx, rx = ResidualCompressor(cfg), ResidualCompressor(cfg)
    errs = []
    for x in synthetic_trajectory(steps):
        recon = rx.decode("kv", tx.encode("kv", x))
        if not torch.equal(tx.base("kv"), rx.base("kv")):
            raise RuntimeError(f"{codec}/{storage}: sender and receiver bases differ")
        errs.append(float((recon.float() - x.float()).norm() / x.float().norm()))
    return errs


# --------------------------------------------------------------------------------------------
def _rank(rank: int, world: int, opts: dict):
    quality = _quality_module()
    quality._quiet()
    import compactfusion as cf
    from compactfusion.testing import prepare_xfuser_cpu

    prepare_xfuser_cpu()
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    pipe = build_pipeline(
        "flux", ring=world, dtype=torch.bfloat16, head_dim=opts["head_dim"],
        num_layers=2, num_single_layers=2,
    )  # fmt: skip

    def run() -> torch.Tensor:
        return generate(
            pipe, "flux", steps=opts["steps"], height=opts["size"], width=opts["size"],
            output_type="pt",
        ).float()  # fmt: skip

    reference = run()
    results = []
    for codec in opts["codecs"]:
        for storage in opts["storages"]:
            cfg = CompactConfig(codec=codec, base_storage=storage, min_numel=0)
            with cf.patched(pipe, cfg):
                probe = quality.KVProbe(pipe)
                try:
                    out = run()
                finally:
                    probe.close()
                st = cf.stats(pipe)
            errs = [e for e, _ in probe.per_step()]
            results.append(
                {
                    "codec": codec,
                    "storage": storage,
                    "errs": errs,
                    "out_rel_err": float((out - reference).norm() / reference.norm()),
                    "base_bytes": st["base_bytes"],
                    "held_bytes": st["held_bytes"],
                }
            )
    return results if rank == 0 else None


# --------------------------------------------------------------------------------------------
def growth(errs: list[float]) -> float:
    """Mean of the last 5 steps over the mean of steps 2-6 (1 = flat; the warm-up and the
    first compressed step, which starts from an exact base, are left out)."""
    early, late = errs[2:7], errs[-5:]
    return (sum(late) / len(late)) / (sum(early) / len(early))


def _f(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.4g}"


def main(argv=None) -> dict[str, str]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--synthetic-steps", type=int, default=50)
    p.add_argument("--steps", type=int, default=20, help="tiny FLUX denoising steps")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--skip-flux", action="store_true", help="synthetic trajectory only")
    p.add_argument("--smoke", action="store_true", help="12 steps, 32 px, 4x16, int2 only")
    args = p.parse_args(argv)
    codecs = CODECS
    if args.smoke:
        args.synthetic_steps, args.steps, args.size, args.head_dim = 12, 12, 32, 16
        codecs = ("int2",)
    if min(args.synthetic_steps, args.steps) < 8:
        raise SystemExit("--steps and --synthetic-steps must be at least 8 (growth uses 2-6)")
    machine = machine_stamp(cuda=False, detail="no GPU")
    device = machine["device"]
    stamp = {"device": device, "torch": machine["torch"]}
    rows, summary = [], []
    for codec in codecs:
        for storage in BASE_STORAGES:
            errs = synthetic_errors(codec, storage, args.synthetic_steps)
            rows += [
                {"source": "synthetic", "codec": codec, "storage": storage, "step": i,
                 "kv_rel_err": f"{e:.6g}", **stamp}
                for i, e in enumerate(errs)
            ]  # fmt: skip
            summary.append(
                {"source": "synthetic (512x256 bf16)", "codec": codec, "storage": storage,
                 "errs": errs, "out_rel_err": None,
                 "base_bytes": storage_nbytes((512, 256), torch.bfloat16, storage),
                 "held_bytes": None}
            )  # fmt: skip
    wall = 0.0
    if not args.skip_flux:
        from compactfusion.testing import spawn_ranks

        opts = {"codecs": list(codecs), "storages": list(BASE_STORAGES), "steps": args.steps,
                "size": args.size, "head_dim": args.head_dim}  # fmt: skip
        start = time.perf_counter()
        results = spawn_ranks(_rank, 2, opts, timeout=1800)[0]
        wall = time.perf_counter() - start
        for r in results:
            rows += [
                {"source": "tiny-flux", "codec": r["codec"], "storage": r["storage"], "step": i,
                 "kv_rel_err": f"{e:.6g}", **stamp}
                for i, e in enumerate(r["errs"])
            ]  # fmt: skip
            summary.append({"source": "tiny-flux (2 ranks, allgather, bf16)", **r})
    os.makedirs(args.out, exist_ok=True)
    paths = {
        "csv": os.path.join(args.out, "base_storage.csv"),
        "md": os.path.join(args.out, "base_storage.md"),
    }
    write_csv(paths["csv"], FIELDS, rows)
    lines = [
        "## Compact base storage: fidelity and memory (measured)\n",
        f"Measured by `benchmarks/base_storage.py` on {device}, torch {torch.__version__}"
        + (f"; tiny FLUX on 2 gloo ranks, {args.steps} steps, {args.size} px, 4x"
           f"{args.head_dim} heads (run {wall:.0f} s)" if not args.skip_flux else "")
        + ". K/V error: relative Frobenius error of the receivers' reconstruction per step "
        "(what the attention reads). Growth: mean error of the last 5 steps / steps 2-6. "
        "Base bytes: per rank (tiny FLUX: `stats()['base_bytes']`; synthetic: one base).\n",
        "| source | codec | storage | mean K/V err | final K/V err | growth | output rel. err "
        "| base bytes | held bytes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for s in summary:
        errs = s["errs"][1:]
        lines.append(
            f"| {s['source']} | {s['codec']} | {s['storage']} | {_f(sum(errs) / len(errs))} | "
            f"{_f(errs[-1])} | {_f(growth(s['errs']))} | {_f(s['out_rel_err'])} | "
            f"{s['base_bytes']} | {s['held_bytes'] if s['held_bytes'] is not None else 'n/a'} |"
        )
    text = "\n".join(lines) + "\n"
    with open(paths["md"], "w") as f:
        f.write(text)
    print(text)
    print("wrote " + ", ".join(paths.values()))
    return paths


if __name__ == "__main__":
    main()
