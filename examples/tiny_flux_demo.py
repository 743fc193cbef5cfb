"""The main job: a tiny FLUX through xfuser's ring attention on 2 CPU ranks, with and without
compactfusion.

Builds a small random FLUX transformer from a config (no download), wraps it in
``xFuserFluxPipeline`` with ``ring_degree=2`` on two gloo ranks, and generates the same image
uncompressed, with ``int2`` and with ``int1``. Prints, per run, the bytes each rank sent per
denoising step (after warm-up), the ratio against the uncompressed K/V, the time per step, and
the PSNR of the image against the uncompressed run; saves the images under ``--out``.

    python examples/tiny_flux_demo.py [--steps 8 --size 64 --out outputs/demo]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing

from compactfusion.metrics import psnr  # noqa: E402
from compactfusion.testing import spawn_ranks  # noqa: E402

RUNS = [("uncompressed", "raw"), ("int2", "int2"), ("int1", "int1")]


def _rank(rank: int, world: int, steps: int, size: int, head_dim: int):
    os.environ.setdefault("LOG_LEVEL", "error")  # xfuser logs every wrapped layer otherwise
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kept in float32.*")
    from compactfusion.testing import prepare_xfuser_cpu

    prepare_xfuser_cpu()
    from diffusers.utils import logging as diffusers_logging

    import compactfusion as cf
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    diffusers_logging.set_verbosity_error()
    torch.set_num_threads(1)
    pipe = build_pipeline("flux", ring=world, dtype=torch.bfloat16, head_dim=head_dim)
    results = {}
    for label, preset in RUNS:
        with cf.patched(pipe, cf.CompactConfig.preset(preset, mode="allgather")):
            start = time.perf_counter()
            image = generate(pipe, "flux", steps=steps, height=size, width=size, output_type="pt")
            total = time.perf_counter() - start
            st = cf.stats(pipe)
        results[label] = {"image": image.float(), "stats": st, "seconds": total}
    return results


def save_png(image: torch.Tensor, path: str) -> None:
    from PIL import Image

    arr = (image[0].clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(arr).resize((256, 256), Image.NEAREST).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--out", default="outputs/demo")
    args = p.parse_args()
    world = 2
    os.makedirs(args.out, exist_ok=True)
    results = spawn_ranks(_rank, world, args.steps, args.size, args.head_dim, timeout=1200)[0]
    ref = results["uncompressed"]["image"]
    base_bytes = results["uncompressed"]["stats"]["bytes_per_step"]
    print(
        f"tiny FLUX (4 heads x {args.head_dim}, 2+2 blocks, bf16), {args.size}x{args.size} px, "
        f"{args.steps} steps, xFuserFluxPipeline ring_degree={world} on {world} gloo CPU ranks, "
        f"torch {torch.__version__}"
    )
    header = ("run", "bytes/rank/step", "ratio", "s/step (median)", "PSNR vs uncompressed")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    summary = {}
    for label, _ in RUNS:
        r = results[label]
        st = r["stats"]
        after = st["bytes_per_step"][1:]
        sent = statistics.median(after)
        ratio = statistics.median(base_bytes[1:]) / sent
        step_s = statistics.median(st["seconds_per_step"])
        quality = psnr(r["image"], ref)
        print(
            f"{label} | {sent / 1024:.1f} KiB | {ratio:.1f}x | {step_s * 1e3:.1f} ms | "
            f"{quality:.1f} dB"
        )
        save_png(r["image"], os.path.join(args.out, f"{label}.png"))
        summary[label] = {
            "bytes_per_step": st["bytes_per_step"],
            "seconds_per_step": st["seconds_per_step"],
            "ratio_vs_uncompressed": ratio,
            "psnr_db": quality,
        }
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"images and stats.json written to {args.out}/")


if __name__ == "__main__":
    main()
