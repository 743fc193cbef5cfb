"""FLUX.1 text-to-image with xDiT (xfuser 0.7.0) and compactfusion, launched with torchrun.

    # 2 GPUs, ring attention, K/V sent as 2-bit residuals (weights from a local directory)
    torchrun --nproc_per_node=2 examples/flux_example.py --model /path/to/FLUX.1-dev \\
        --ring_degree 2 --prompt "a cat holding a sign" --compact-codec int2

    # no weights on disk (or no GPU): a tiny random FLUX on CPU + gloo, same flags
    torchrun --nproc_per_node=2 examples/flux_example.py --compact-codec int1

xfuser's own arguments (``--ring_degree``, ``--ulysses_degree``, ``--height``, ...) work as in
xfuser's examples; with several ranks and no degree given, ring attention uses them all. The
``--compact-*`` flags choose what compactfusion does (``--compact-off``: nothing patched).
``--model`` is a local directory or a repo id already in the local Hugging Face cache; nothing is
downloaded, and without local weights a tiny random FLUX built from a config runs instead.
Rank 0 writes ``flux.png`` and ``stats.json`` (bytes per step, ratio, time per step, settings,
versions) to ``--output-dir`` (default ``outputs/flux_example``).
"""

from __future__ import annotations

import os

import _common  # also puts the repository root on sys.path
import _validation

DEFAULT_PROMPT = "A cat holding a sign that says hello world"
MAX_TEXT_LEN = 512  # diffusers' FluxPipeline.check_inputs refuses longer T5 prompts


def load(path: str, engine_config, dtype):
    """Real weights: xfuser's pipeline class loads the diffusers checkpoint and wraps it."""
    from xfuser import xFuserFluxPipeline

    return xFuserFluxPipeline.from_pretrained(path, engine_config=engine_config, torch_dtype=dtype)


def build_tiny(engine_config, dtype):
    """A random 2+2-block FLUX (4 heads x 64, tiny VAE, no text encoders) in xfuser's wrapper."""
    from xfuser import xFuserFluxPipeline

    from compactfusion.testing import tiny_flux

    return xFuserFluxPipeline(tiny_flux(dtype=dtype, head_dim=64), engine_config)


def call_kwargs(pipe, inputs, tiny, generator):
    parallel = pipe.engine_config.parallel_config
    sp = parallel.ring_degree * parallel.ulysses_degree
    kwargs = {
        "height": inputs["height"],
        "width": inputs["width"],
        "num_inference_steps": inputs["num_inference_steps"],
        "guidance_scale": inputs["guidance_scale"],
        "generator": generator,
    }
    text_len = inputs.get("max_sequence_length")  # divisible by sp: see check()
    if tiny:
        from compactfusion.testing import make_inputs

        text_len = text_len or -(-8 // sp) * sp  # 8 text tokens, rounded up to whole shards
        kwargs.update(make_inputs("flux", pipe, seed=inputs["seed"], text_len=text_len))
        return kwargs
    kwargs.update(prompt=inputs["prompt"], max_sequence_length=text_len)
    return kwargs


def geometry(transformer: dict, vae: dict) -> _validation.Geometry:
    """FLUX.1: the VAE factor 8, doubled by the pipeline's 2x2 packing (16 px per latent row as
    xfuser counts them), patch size 1; 24 heads."""
    return _validation.Geometry(
        row_pixels=2 * _validation.vae_scale_factor(vae),
        patch_size=transformer.get("patch_size", 1),
        heads=transformer["num_attention_heads"],
    )


def check(args, inputs, geometry, sp: int) -> list[str]:
    """FLUX-specific rules: no CFG parallelism; the text length divisible by ``sp``, at most
    512 (diffusers' limit for FLUX's T5)."""
    found = []
    if args.use_cfg_parallel:
        found.append(
            "--use_cfg_parallel: xfuser's FLUX pipeline refuses CFG parallelism (FLUX.1 embeds "
            "the guidance scale: one transformer call per step, nothing to split)"
        )
    text_len = inputs.get("max_sequence_length")
    if text_len is None:
        return found
    if not 1 <= text_len <= MAX_TEXT_LEN:
        found.append(f"max_sequence_length {text_len} must be in 1..{MAX_TEXT_LEN}")
    elif text_len % sp:
        # Otherwise xfuser keeps the whole text on every rank inside the local Q/K/V and
        # ring/Ulysses attention counts the text keys once per rank: silently wrong images.
        near = _validation.nearest_valid(text_len, sp, lambda n: n <= MAX_TEXT_LEN)
        found.append(
            f"max_sequence_length {text_len} must be divisible by ring_degree x "
            f"ulysses_degree ({sp}): xfuser 0.7.0 splits FLUX's text tokens across those "
            f"ranks. Nearest valid: {_validation.alternatives('--max_sequence_length', near)}"
        )
    return found


def save(images, out_dir: str, stem: str) -> list[str]:
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(out_dir, f"{stem}.png" if len(images) == 1 else f"{stem}_{i}.png")
        image.save(path)
        paths.append(path)
    return paths


def to_array(images):
    import numpy as np

    return np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])


EXAMPLE = _common.Example(
    kind="flux",
    description=__doc__.splitlines()[0],
    default_model="black-forest-labs/FLUX.1-dev",
    defaults={
        "height": 1024,
        "width": 1024,
        "num_inference_steps": 28,
        "guidance_scale": 3.5,
        "prompt": DEFAULT_PROMPT,
        "max_sequence_length": 512,
    },
    tiny_defaults={"height": 64, "width": 64, "num_inference_steps": 8, "guidance_scale": 3.5},
    load=load,
    build_tiny=build_tiny,
    call_kwargs=call_kwargs,
    save=save,
    to_array=to_array,
    pipeline_class="FluxPipeline",
    geometry=geometry,
    # compactfusion.testing.tiny_flux: VAE factor 2 (x2 packing), patch 1, 4 heads
    tiny_geometry=_validation.Geometry(row_pixels=4, patch_size=1, heads=4),
    check=check,
)

if __name__ == "__main__":
    _common.main(EXAMPLE)
