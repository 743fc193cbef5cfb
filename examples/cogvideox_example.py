"""CogVideoX text-to-video with xDiT (xfuser 0.7.0) and compactfusion, launched with torchrun.

    # 4 GPUs, ring 2 x Ulysses 2, compressed only where it pays on PCIe; 512 px high: the
    # default 480 px (60 latent rows) does not split into 4 ranks x 2-row patches; 512 does
    torchrun --nproc_per_node=4 examples/cogvideox_example.py --model /path/to/CogVideoX-2b \\
        --ring_degree 2 --ulysses_degree 2 --height 512 --enable_tiling \\
        --prompt "a panda playing guitar" --compact-codec int2 --compact-policy auto \\
        --compact-link pcie

    # no weights on disk (or no GPU): a tiny random CogVideoX on CPU + gloo, same flags
    torchrun --nproc_per_node=2 examples/cogvideox_example.py --compact-codec int2

xfuser's own arguments (``--ring_degree``, ``--ulysses_degree``, ``--use_cfg_parallel``,
``--num_frames``, ...) work as in xfuser's examples; with several ranks and no degree given, ring
attention uses them all. The ``--compact-*`` flags choose what compactfusion does
(``--compact-off``: nothing patched). ``--model`` is a local directory or a repo id already in
the local Hugging Face cache; nothing is downloaded, and without local weights a tiny random
CogVideoX built from a config runs instead. Rank 0 writes the frames as PNGs
(``cogvideox_frames/``), ``cogvideox.gif``, ``cogvideox.mp4`` when imageio-ffmpeg is installed,
and ``stats.json`` to ``--output-dir`` (default ``outputs/cogvideox_example``).
"""

from __future__ import annotations

import importlib.util
import os

import _common  # also puts the repository root on sys.path
import _validation

DEFAULT_PROMPT = "A panda in a small red jacket playing an acoustic guitar in a bamboo forest"
FPS = 8  # CogVideoX is trained on 8 fps clips


def load(path: str, engine_config, dtype):
    """Real weights: xfuser's pipeline class loads the diffusers checkpoint and wraps it."""
    from xfuser import xFuserCogVideoXPipeline

    return xFuserCogVideoXPipeline.from_pretrained(
        path, engine_config=engine_config, torch_dtype=dtype
    )


def build_tiny(engine_config, dtype):
    """A random 2-block CogVideoX (4 heads x 64, RoPE, tiny 3-D VAE) in xfuser's wrapper."""
    from xfuser import xFuserCogVideoXPipeline

    from compactfusion.testing import tiny_cogvideox

    return xFuserCogVideoXPipeline(tiny_cogvideox(dtype=dtype, head_dim=64), engine_config)


def call_kwargs(pipe, inputs, tiny, generator):
    kwargs = {
        "height": inputs["height"],
        "width": inputs["width"],
        "num_frames": inputs["num_frames"],
        "num_inference_steps": inputs["num_inference_steps"],
        "guidance_scale": inputs["guidance_scale"],
        "generator": generator,
    }
    if tiny:
        from compactfusion.testing import make_inputs

        kwargs.update(make_inputs("cogvideox", pipe, seed=inputs["seed"]))
        return kwargs
    kwargs["prompt"] = inputs["prompt"]
    for name in ("negative_prompt", "max_sequence_length"):
        if name in inputs:
            kwargs[name] = inputs[name]
    return kwargs


def geometry(transformer: dict, vae: dict) -> _validation.Geometry:
    """CogVideoX: VAE factor 8 (8 px per latent row), patch size 2; 30 heads (2B) or 48 (5B);
    2B's sin-cos positions fix the text length to ``max_text_seq_length`` (226)."""
    positions = not transformer.get("use_rotary_positional_embeddings", False)
    fixed = positions or transformer.get("use_learned_positional_embeddings", False)
    return _validation.Geometry(
        row_pixels=_validation.vae_scale_factor(vae),
        patch_size=transformer.get("patch_size", 2),
        heads=transformer["num_attention_heads"],
        fixed_text_len=transformer.get("max_text_seq_length", 226) if fixed else None,
    )


def check(args, inputs, geometry, sp: int) -> list[str]:
    """CogVideoX-specific rules: a text length the positional embedding has room for."""
    text_len = inputs.get("max_sequence_length")
    if text_len is not None and text_len < 1:
        return [f"max_sequence_length {text_len} must be at least 1"]
    fixed = geometry.fixed_text_len
    if text_len is not None and fixed is not None and text_len != fixed:
        return [
            f"max_sequence_length {text_len}: this CogVideoX embeds exactly {fixed} text "
            f"positions (sin-cos positional embedding, as CogVideoX-2B): use "
            f"--max_sequence_length {fixed} or leave the flag out"
        ]
    return []


def save(videos, out_dir: str, stem: str) -> list[str]:
    paths = []
    for i, frames in enumerate(videos):
        name = stem if len(videos) == 1 else f"{stem}_{i}"
        frame_dir = os.path.join(out_dir, f"{name}_frames")
        os.makedirs(frame_dir, exist_ok=True)
        for j, frame in enumerate(frames):
            frame.save(os.path.join(frame_dir, f"frame_{j:03d}.png"))
        paths.append(frame_dir)
        gif = os.path.join(out_dir, f"{name}.gif")
        frames[0].save(gif, save_all=True, append_images=frames[1:], duration=1000 // FPS, loop=0)
        paths.append(gif)
        if importlib.util.find_spec("imageio") and importlib.util.find_spec("imageio_ffmpeg"):
            from diffusers.utils import export_to_video

            paths.append(export_to_video(frames, os.path.join(out_dir, f"{name}.mp4"), fps=FPS))
    return paths


def to_array(videos):
    import numpy as np

    return np.stack(
        [np.stack([np.asarray(f, dtype=np.float32) / 255.0 for f in frames]) for frames in videos]
    )


EXAMPLE = _common.Example(
    kind="cogvideox",
    description=__doc__.splitlines()[0],
    default_model="THUDM/CogVideoX-2b",
    defaults={
        "height": 480,
        "width": 720,
        "num_frames": 49,
        "num_inference_steps": 50,
        "guidance_scale": 6.0,
        "prompt": DEFAULT_PROMPT,
    },
    tiny_defaults={
        "height": 32,
        "width": 32,
        "num_frames": 5,
        "num_inference_steps": 8,
        "guidance_scale": 6.0,
    },
    load=load,
    build_tiny=build_tiny,
    call_kwargs=call_kwargs,
    save=save,
    to_array=to_array,
    pipeline_class="CogVideoXPipeline",
    geometry=geometry,
    # compactfusion.testing.tiny_cogvideox: VAE factor 2, patch 2, 4 heads, RoPE
    tiny_geometry=_validation.Geometry(row_pixels=2, patch_size=2, heads=4),
    check=check,
)

if __name__ == "__main__":
    _common.main(EXAMPLE)
