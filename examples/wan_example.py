"""Wan 2.1 text-to-video through xfuser 0.7's model runner, with compactfusion, under torchrun.

    # 2 GPUs, Ulysses, q/k/v/output all-to-alls sent as 2-bit residuals (local weights)
    torchrun --nproc_per_node=2 examples/wan_example.py \\
        --model /path/to/Wan2.1-T2V-1.3B-Diffusers --ulysses_degree 2 --compact-codec int2

    # no weights on disk (or no GPU): a tiny random Wan 2.1 on CPU + gloo, same flags
    torchrun --nproc_per_node=2 examples/wan_example.py --ring_degree 2

The model is xfuser's own runner class for Wan 2.1 T2V (``xFuserWan21T2VModel``) reading the
checkpoint at ``--model`` (a local diffusers directory; nothing is downloaded). Without one, a
tiny random checkpoint (random transformer, tokenizer, text encoder and VAE) is written to a
temporary directory and used instead, and the script says so. compactfusion is patched in
during ``initialize``, as ``compactfusion-xdit`` does. With no degree given, Ulysses spans all
ranks. Rank 0 writes the first frame (``wan.png``), the frames (``wan_frames.npy``) and
``stats.json`` to ``--output-dir``. For the full runner (all of ``xdit``'s flags, video files,
timings) use ``compactfusion-xdit`` instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)

from compactfusion.cli.flags import add_compact_flags, compact_config  # noqa: E402
from compactfusion.cli.xdit import import_xfuser  # noqa: E402

TINY = {"height": 128, "width": 128, "num_frames": 9, "steps": 4}
TINY_SIZES = {"heads": 4, "head_dim": 48}  # shards above CompactConfig.min_numel
REAL = {"height": 480, "width": 832, "num_frames": 33, "steps": 30}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local Wan 2.1 T2V diffusers directory")
    parser.add_argument("--ulysses_degree", type=int, default=None)
    parser.add_argument("--ring_degree", type=int, default=None)
    parser.add_argument("--prompt", default="a cat surfing a wave at sunset")
    for name in ("height", "width", "num_frames", "steps"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="outputs/wan_example")
    add_compact_flags(parser)
    args = parser.parse_args()
    return args, compact_config(args, parser)


def main() -> None:
    args, config = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk only
    import_xfuser()
    import torch.distributed as dist

    import compactfusion as cf
    from compactfusion.integrations.xdit_runner import patch_when_initialized
    from compactfusion.testing.tiny_runner_models import local_runner_model, save_tiny_checkpoint

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    real = args.model is not None and os.path.isdir(args.model)
    path = args.model
    if not real:
        if rank == 0:
            print(f"no local Wan weights at --model {args.model!r}: using a TINY RANDOM Wan 2.1")
            path = save_tiny_checkpoint(
                "wan2.1", tempfile.mkdtemp(prefix="tiny-wan-"), **TINY_SIZES
            )
        box = [path]
        dist.broadcast_object_list(box, src=0)  # one checkpoint, written once
        path = box[0]
    sizes = {k: getattr(args, k) or (REAL if real else TINY)[k] for k in TINY}
    ring = args.ring_degree or 1
    ulysses = args.ulysses_degree or world // ring
    model = local_runner_model("wan2.1", path, ulysses_degree=ulysses, ring_degree=ring)
    if config is not None:
        patch_when_initialized(model, config)
    inputs = dict(
        prompt=args.prompt,
        num_inference_steps=sizes["steps"],
        seed=args.seed,
        height=sizes["height"],
        width=sizes["width"],
        num_frames=sizes["num_frames"],
        dataset_path=None,
        input_images=[],
    )
    inputs = model.preprocess_args(inputs)
    model.initialize(inputs)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    frames = model.pipe(
        prompt=args.prompt,
        height=sizes["height"],
        width=sizes["width"],
        num_frames=sizes["num_frames"],
        num_inference_steps=sizes["steps"],
        guidance_scale=inputs["guidance_scale"],
        negative_prompt=inputs["negative_prompt"],
        generator=generator,
        output_type="np",
    ).frames[0]
    stats = cf.stats(model) if config is not None else None
    if rank == 0:
        import numpy as np
        from PIL import Image

        os.makedirs(args.output_dir, exist_ok=True)
        np.save(os.path.join(args.output_dir, "wan_frames.npy"), frames)
        first = (np.clip(frames[0], 0, 1) * 255).astype("uint8")
        Image.fromarray(first).save(os.path.join(args.output_dir, "wan.png"))
        report = {
            "model": path if real else "tiny random Wan 2.1",
            "world": world,
            "ring": ring,
            "ulysses": ulysses,
            "sizes": sizes,
            "compactfusion": None if config is None else config.as_dict(),
            "stats": stats,
        }
        with open(os.path.join(args.output_dir, "stats.json"), "w") as f:
            json.dump(report, f, indent=2, default=str)
        if stats is not None:
            print(f"ratio after warm-up: {stats['ratio_after_warmup']:.1f}x")
        print(f"wrote {args.output_dir}/wan.png, wan_frames.npy, stats.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
