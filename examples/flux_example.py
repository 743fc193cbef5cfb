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

DEFAULT_PROMPT = "A cat holding a sign that says hello world"


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
    if tiny:
        from compactfusion.testing import make_inputs

        text_len = -(-8 // sp) * sp  # xfuser 0.7.0 splits FLUX text tokens across SP ranks
        kwargs.update(make_inputs("flux", pipe, seed=inputs["seed"], text_len=text_len))
        return kwargs
    text_len = inputs["max_sequence_length"]
    if text_len % sp:
        raise ValueError(
            f"--max_sequence_length {text_len} must be divisible by ring_degree x ulysses_degree "
            f"({sp}): xfuser 0.7.0 splits FLUX text tokens across those ranks"
        )
    kwargs.update(prompt=inputs["prompt"], max_sequence_length=text_len)
    return kwargs


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
)

if __name__ == "__main__":
    _common.main(EXAMPLE)
