"""Stream a slowly drifting activation through every codec across 2 gloo ranks (CPU).

Each rank owns half of a ``rows x cols`` bf16 activation (default 4096x3072, the size of a FLUX
K or V at 1024x1024) that drifts a little every "denoising step", and all-gathers it with
``compressed_all_gather``. Printed per codec: the wire ratio against bf16 for the full tensor,
the bytes each rank sent after warm-up, and the relative error of the gathered activation per
step (step 0 is the raw warm-up).

    python examples/codec_demo.py [--rows 4096 --cols 3072 --steps 6]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compactfusion import CompactConfig, ResidualCompressor, get_codec  # noqa: E402
from compactfusion.collectives import check_consistent, compressed_all_gather  # noqa: E402
from compactfusion.testing import spawn_ranks  # noqa: E402

CODECS = [
    ("raw", {}, "raw"),
    ("fp8", {}, "fp8"),
    ("int2", {}, "int2"),
    ("int1", {}, "int1"),
    ("nm_sparse", {"n": 1, "m": 4}, "nm_sparse 1:4"),
    ("lowrank", {"rank": 16}, "lowrank r16 int8"),
]


def activation(rank: int, step: int, rows: int, cols: int) -> torch.Tensor:
    """Rank ``rank``'s shard at ``step``: a fixed pattern plus a smooth low-rank drift."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(rows, cols, generator=g)
    u = torch.randn(rows, 4, generator=g)
    v = torch.randn(4, cols, generator=g)
    noise = torch.randn(rows, cols, generator=g)
    t = 0.04 * step
    return (x + t * (u @ v) / 2 + 0.02 * t * noise).to(torch.bfloat16)


def _rank(rank: int, world: int, rows: int, cols: int, steps: int):
    shard_rows = rows // world
    report = {}
    for codec, params, label in CODECS:
        cfg = CompactConfig(codec=codec, codec_params=params, warmup_steps=1)
        comp = ResidualCompressor(cfg)
        check_consistent(cfg.fingerprint())
        errors, buf, start = [], None, time.perf_counter()
        for step in range(steps):
            x = activation(rank, step, shard_rows, cols)
            buf = compressed_all_gather(comp, "x", x, out=buf)
            exact = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(exact, x)
            ref = torch.stack(exact).float()
            errors.append(float((buf.float() - ref).norm() / ref.norm()))
        st = comp.stats()
        sent = st["sites"][repr(("x", rank))]
        report[label] = {
            "errors": errors,
            "seconds": time.perf_counter() - start,
            "bytes_after_warmup": (
                sent["payload_bytes"] - comp.raw_payload_nbytes(x.shape, x.dtype)
            )
            / max(steps - 1, 1),
        }
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=3072)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    world = 2
    results = spawn_ranks(_rank, world, args.rows, args.cols, args.steps, timeout=1200)
    report = results[0]
    raw_bytes = args.rows * args.cols * 2
    print(
        f"activation {args.rows}x{args.cols} bf16 ({raw_bytes / 2**20:.1f} MiB), {world} gloo "
        f"ranks, {args.steps} steps (step 0 = raw warm-up), torch {torch.__version__}"
    )
    head = ["codec", "ratio vs bf16", "sent/rank/step"] + [f"err s{i}" for i in range(args.steps)]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for codec, params, label in CODECS:
        ratio = raw_bytes / get_codec(codec, **params).payload_nbytes(
            (args.rows, args.cols), torch.bfloat16
        )
        r = report[label]
        cells = [label, f"{ratio:.1f}x", f"{r['bytes_after_warmup'] / 2**10:.0f} KiB"]
        cells += [f"{e:.4f}" for e in r["errors"]]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
