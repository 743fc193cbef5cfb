"""diffusers' own context parallelism (``enable_parallelism``) with compactfusion, via torchrun.

    # 2 GPUs, ring attention, K/V sent as 2-bit residuals (weights from a local directory)
    torchrun --nproc_per_node=2 examples/diffusers_cp_example.py \\
        --model /path/to/FLUX.1-dev --ring 2 --preset int2 --prompt "a cat holding a sign"

    # no weights (or no GPU): a tiny random model on CPU + gloo; also run uncompressed first
    # (same seed) and report the error of the compressed run against it
    torchrun --nproc_per_node=2 examples/diffusers_cp_example.py --ulysses 2 --compare

No xfuser is involved: the pipeline is a plain diffusers one whose transformer runs diffusers'
ring (``--ring``), Ulysses (``--ulysses``) or unified (both) context parallelism, and
``compactfusion.patch(pipe, config)`` compresses what its ranks exchange. ``--model`` is a local
directory or a repo id already in the local Hugging Face cache (nothing is downloaded); without
local weights a tiny random ``--tiny-kind`` pipeline (flux, wan, qwenimage, flux2) runs instead.
Rank 0 writes ``stats.json`` (bytes per step, ratio, error with ``--compare``, settings,
versions) and, with real weights, the image to ``--output-dir``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

import compactfusion as cf  # noqa: E402
from compactfusion import PRESETS, CompactConfig  # noqa: E402
from compactfusion.config import MODES, preset_name  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _preset(name: str) -> str:
    """The preset name, with the deprecated "sparse"/"off" replaced (and the warning shown)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", DeprecationWarning)
        return preset_name(name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default="tiny", help="local weights directory, cached repo id or 'tiny'"
    )
    p.add_argument("--tiny-kind", default="flux", choices=("flux", "wan", "qwenimage", "flux2"))
    p.add_argument("--ring", type=int, default=None, help="ring degree (default: all ranks)")
    p.add_argument("--ulysses", type=int, default=1, help="Ulysses degree")
    p.add_argument("--attention-backend", default=None,
                   help="diffusers attention backend (default: _native_cudnn on CUDA, "
                        "_native_flash on CPU, when ring attention needs the LSE)")  # fmt: skip
    p.add_argument("--preset", default="int2", type=_preset, choices=sorted(PRESETS),
                   help="compactfusion preset (a codec's name)")  # fmt: skip
    p.add_argument("--mode", default="allgather", choices=MODES, help="ring-attention strategy")
    p.add_argument("--off", action="store_true", help="plain diffusers: nothing is patched")
    p.add_argument("--compare", action="store_true",
                   help="run uncompressed first (same seed) and report the error")  # fmt: skip
    p.add_argument("--prompt", default="A cat holding a sign that says hello world")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--output-dir", default="outputs/diffusers_cp_example")
    args = p.parse_args(argv)
    if args.off and args.compare:
        p.error("--compare compares with compactfusion on: drop --off")
    return args


def _init_distributed() -> tuple[torch.device, bool]:
    """The process group from torchrun's variables (NCCL on CUDA, gloo on CPU), unless the
    caller already created one; a plain ``python`` launch is a world of one."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), True
    from compactfusion.testing import prepare_diffusers_cpu

    prepare_diffusers_cpu()
    return torch.device("cpu"), False


def _load(args, dtype, device):
    """``(pipe, tiny)``: real weights from a local path / the cache, else a tiny model."""
    path = None
    if args.model != "tiny":
        if os.path.isdir(args.model):
            path = args.model
        else:
            try:
                from huggingface_hub import snapshot_download

                path = snapshot_download(repo_id=args.model, local_files_only=True)
            except Exception as exc:  # not a repo id, not cached: run the tiny model
                _say(f"no local weights for {args.model!r} ({type(exc).__name__}): tiny model")
    if path is None:
        from compactfusion.testing import build_diffusers_pipeline

        pipe = build_diffusers_pipeline(args.tiny_kind, dtype=dtype, head_dim=64)
        return pipe.to(device), True
    from diffusers import DiffusionPipeline

    _say(f"loading {path}")
    return DiffusionPipeline.from_pretrained(path, torch_dtype=dtype).to(device), False


def _enable_parallelism(pipe, args, cuda: bool) -> None:
    from diffusers import ContextParallelConfig

    world = dist.get_world_size()
    ring = args.ring if args.ring is not None else world // args.ulysses
    backend = args.attention_backend
    if backend is None and ring > 1:
        backend = "_native_cudnn" if cuda else "_native_flash"
    if backend is not None:
        pipe.transformer.set_attention_backend(backend)
    pipe.transformer.enable_parallelism(
        config=ContextParallelConfig(ring_degree=ring, ulysses_degree=args.ulysses)
    )
    args.ring = ring


def _generate(pipe, args, tiny: bool, device):
    if tiny:
        from compactfusion.testing import generate_diffusers

        return generate_diffusers(
            pipe, args.tiny_kind, steps=args.steps or 8, seed=args.seed,
            height=args.height or 64, width=args.width or 64,
        )  # fmt: skip
    return pipe(
        prompt=args.prompt,
        height=args.height or 1024,
        width=args.width or 1024,
        num_inference_steps=args.steps or 28,
        generator=torch.Generator(device).manual_seed(args.seed),
        output_type="pt",
        return_dict=False,
    )[0]


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns (and on rank 0 writes) the summary."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    device, cuda = _init_distributed()
    dtype = DTYPES[args.dtype]
    pipe, tiny = _load(args, dtype, device)
    _enable_parallelism(pipe, args, cuda)
    config = CompactConfig.preset(args.preset, mode=args.mode)
    summary: dict = {
        "model": "tiny " + args.tiny_kind if tiny else args.model,
        "world": dist.get_world_size(),
        "ring": args.ring,
        "ulysses": args.ulysses,
        "dtype": args.dtype,
        "config": None if args.off else config.as_dict(),
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "diffusers")},
    }
    reference = None
    if args.compare:
        start = time.perf_counter()
        reference = _generate(pipe, args, tiny, device)
        summary["seconds_uncompressed"] = time.perf_counter() - start
    if not args.off:
        cf.patch(pipe, config)
    start = time.perf_counter()
    output = _generate(pipe, args, tiny, device)
    summary["seconds"] = time.perf_counter() - start
    if not args.off:
        st = cf.stats(pipe)
        summary.update(
            bytes_per_step=st["bytes_per_step"],
            raw_bytes_per_step=st["raw_bytes_per_step"],
            ratio_after_warmup=st["ratio_after_warmup"],
        )
        cf.unpatch(pipe)
    if reference is not None:
        ref, out = reference.float(), output.float()
        summary["relative_l2_vs_uncompressed"] = float((out - ref).norm() / ref.norm())
    if dist.get_rank() == 0:
        _write(summary, output, args, tiny)
    return summary


def _write(summary: dict, output, args, tiny: bool) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    if not tiny and output.ndim == 4:  # images [B, 3, H, W] in [0, 1]
        from PIL import Image

        pixels = (output[0].float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
        Image.fromarray(pixels.cpu().numpy()).save(os.path.join(args.output_dir, "image.png"))
    elif not tiny:  # video frames: keep the tensor
        torch.save(output.cpu(), os.path.join(args.output_dir, "output.pt"))
    with open(os.path.join(args.output_dir, "stats.json"), "w") as f:
        json.dump(summary, f, indent=2)
    shown = {k: summary.get(k) for k in ("ratio_after_warmup", "relative_l2_vs_uncompressed")}
    _say(f"wrote {args.output_dir}/stats.json: {shown}")


def _say(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
