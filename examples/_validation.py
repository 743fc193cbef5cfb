"""Argument checks of the torchrun examples, run before any process group or weight exists.

xfuser 0.7.0 and diffusers reject some sizes and flags only once the pipeline is loaded (for a
real checkpoint: after minutes of loading) or fail deep inside a library. The examples run
:func:`problems` first: it reads nothing but the checkpoint's small JSON configs and returns
every problem with what would work instead (the nearest valid height, a divisible text length).

**The height rule** (xfuser 0.7.0, ``DiTRuntimeState._calc_patches_metadata`` for FLUX and
``_calc_cogvideox_patches_metadata`` for CogVideoX, run by ``set_input_parameters`` /
``set_video_input_parameters`` at the start of every generation): the latent image has
``rows = height // row_pixels`` rows, where ``row_pixels`` is the VAE's spatial factor, doubled
for FLUX because its pipeline packs 2x2 latent pixels into one token (FLUX.1: 16; CogVideoX:
8). Sequence parallelism (``sp = ring_degree x ulysses_degree``) splits those rows into ``sp``
bands of whole transformer patches (``patch_size`` rows: FLUX 1, CogVideoX 2), so xfuser
requires ``rows % (patch_size x sp) == 0`` (with PipeFusion, per pipeline patch; mirrored in
:func:`xfuser_accepts_rows`). The checks also require ``height % row_pixels == 0`` and
``width % (row_pixels x patch_size) == 0``, which diffusers otherwise floors (FLUX resizes the
image with a warning; CogVideoX fails): with one pipeline patch a valid height is a multiple
of ``row_pixels x patch_size x sp`` pixels, e.g. 16 x sp for FLUX.1 and CogVideoX alike. The
CogVideoX default 480 px (60 rows) works for sp 1, 2 or 3 (on 4 ranks: sp 2 with CFG
parallel), not for sp 4: 448 or 512 px do. The number of frames does not matter (every frame
is split alike).

Further rules: Ulysses splits attention heads (``heads % ulysses_degree == 0``, xfuser's
``_check_model_and_parallel_config``); the parallel degrees multiply to the world size; the
CPU offload flags need a GPU to offload to; model-specific rules (FLUX's text length and CFG
parallel) come from the example (:attr:`Example.check` in ``_common.py``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Geometry",
    "alternatives",
    "nearest_valid",
    "problems",
    "read_configs",
    "vae_scale_factor",
    "xfuser_accepts_rows",
]


@dataclass(frozen=True)
class Geometry:
    """What the checks need to know about a model, from its config files (no weights).

    Attributes:
        row_pixels: image rows per latent row as xfuser counts them (VAE spatial factor; x2
            for FLUX's 2x2 packing).
        patch_size: latent rows per transformer patch (``transformer.config.patch_size``).
        heads: attention heads (``transformer.config.num_attention_heads``).
        fixed_text_len: the only text length (``--max_sequence_length``) the transformer
            accepts, or None for any: CogVideoX with sin-cos or learned positions (2B) embeds
            exactly ``max_text_seq_length`` (226) text positions; with RoPE (5B) any works.
    """

    row_pixels: int
    patch_size: int
    heads: int
    fixed_text_len: int | None = None


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    """The VAE's spatial factor as diffusers pipelines compute it: 2 ** (blocks - 1)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def read_configs(path: str, pipeline_class: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(transformer config, vae config)`` of the diffusers checkpoint at ``path``.

    Raises ``ValueError`` naming the missing or unexpected file: a directory that is not a
    ``pipeline_class`` checkpoint is reported before anything is loaded from it.
    """

    def load(*parts: str) -> dict[str, Any]:
        file = os.path.join(path, *parts)
        try:
            with open(file) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"--model {path} is not a complete diffusers checkpoint: cannot read {file} "
                f"({type(exc).__name__})"
            ) from None

    index = load("model_index.json")
    found = index.get("_class_name")
    if found != pipeline_class:
        raise ValueError(
            f"--model {path} holds a {found} checkpoint (model_index.json); this example loads "
            f"a {pipeline_class}"
        )
    return load("transformer", "config.json"), load("vae", "config.json")


def xfuser_accepts_rows(rows: int, sp: int, patch_size: int, pipeline_patches: int = 1) -> bool:
    """Whether xfuser 0.7.0 accepts ``rows`` latent rows for ``sp`` sequence-parallel ranks.

    Mirrors ``DiTRuntimeState._calc_patches_metadata``: rows divisible by ``sp``; the rows cut
    into ``pipeline_patches`` PipeFusion patches of a height rounded up to whole
    ``patch_size x sp`` bands, and the last patch also a multiple of ``patch_size x sp``.
    """
    if rows < 1 or rows % sp:
        return False
    band = patch_size * sp
    per_patch = math.ceil(math.ceil(rows / pipeline_patches) / band) * band
    count = math.ceil(rows / per_patch)
    return (rows - per_patch * (count - 1)) % band == 0


def nearest_valid(value: int, step: int, ok: Callable[[int], bool], limit: int = 4096):
    """The nearest multiples of ``step`` below and above ``value`` for which ``ok`` holds
    (``[below, above]``, either left out when none is found within ``limit`` steps)."""
    out = []
    below = (value - 1) // step * step
    for k in range(limit):
        candidate = below - k * step
        if candidate < step:
            break
        if ok(candidate):
            out.append(candidate)
            break
    above = (value // step + 1) * step
    for k in range(limit):
        if ok(above + k * step):
            out.append(above + k * step)
            break
    return out


def alternatives(flag: str, values: list[int]) -> str:
    """``"--height 448 or --height 512"`` (the values are the nearest valid ones)."""
    return " or ".join(f"{flag} {v}" for v in values) if values else "none found"


def _sizes(args, inputs: dict[str, Any], geometry: Geometry, sp: int, patches: int) -> list[str]:
    height, width = inputs["height"], inputs["width"]
    unit = geometry.row_pixels
    found = []

    def height_ok(h: int) -> bool:
        return h % unit == 0 and xfuser_accepts_rows(h // unit, sp, geometry.patch_size, patches)

    if height < 1 or not height_ok(height):
        band = unit * geometry.patch_size * sp
        rule = (
            f"a multiple of {band} px ({unit} px per latent row x {geometry.patch_size}-row "
            f"patches x ring_degree {args.ring_degree} x ulysses_degree {args.ulysses_degree})"
        )
        if patches > 1:
            rule = f"such that xfuser can cut it into {patches} PipeFusion patches of whole bands"
        found.append(
            f"height {height} px does not split across {sp} sequence-parallel ranks: xfuser "
            f"0.7.0 needs the height to be {rule}. Nearest valid: "
            f"{alternatives('--height', nearest_valid(height, unit, height_ok))}"
        )
    col = unit * geometry.patch_size
    if width < 1 or width % col:
        near = nearest_valid(width, col, lambda w: True)
        found.append(
            f"width {width} px is not a multiple of {col} px ({unit} px per latent column x "
            f"{geometry.patch_size}-column patches). Nearest valid: "
            f"{alternatives('--width', near)}"
        )
    return found


def _degrees(args, geometry: Geometry, world: int) -> list[str]:
    found = []
    ulysses = args.ulysses_degree
    if ulysses > geometry.heads or geometry.heads % ulysses:
        fits = [d for d in range(1, geometry.heads + 1) if geometry.heads % d == 0]
        found.append(
            f"--ulysses_degree {ulysses} must divide the model's {geometry.heads} attention "
            f"heads (Ulysses gives each rank whole heads); possible degrees: {fits}"
        )
    cfg = 2 if args.use_cfg_parallel else 1
    degrees = {
        "data_parallel_degree": args.data_parallel_degree,
        "cfg (--use_cfg_parallel)": cfg,
        "ring_degree": args.ring_degree,
        "ulysses_degree": args.ulysses_degree,
        "pipefusion_parallel_degree": args.pipefusion_parallel_degree,
        "tensor_parallel_degree": args.tensor_parallel_degree,
    }
    bad = [f"--{name} {value}" for name, value in degrees.items() if value < 1]
    if bad:
        found.append(f"parallel degrees must be at least 1: {', '.join(bad)}")
    elif not args.use_parallel_vae and not args.dit_parallel_size:
        product = math.prod(degrees.values())
        if product != world:
            used = " x ".join(f"{name} {v}" for name, v in degrees.items() if v > 1) or "1"
            found.append(
                f"the parallel degrees ({used} = {product}) must multiply to the number of "
                f"ranks ({world}; torchrun --nproc_per_node)"
            )
    return found


def _offload(args, device_type: str) -> list[str]:
    found = []
    if args.enable_group_cpu_offload:
        found.append(
            "--enable_group_cpu_offload is not supported by the examples; use "
            "--enable_model_cpu_offload or --enable_sequential_cpu_offload (GPU only)"
        )
    if device_type != "cuda":
        for name in ("enable_model_cpu_offload", "enable_sequential_cpu_offload"):
            if getattr(args, name):
                found.append(
                    f"--{name} needs a GPU: it keeps weights in CPU memory and moves them to "
                    "the GPU when used. On a CPU they are in CPU memory already: drop the flag"
                )
    return found


def problems(
    args,
    inputs: dict[str, Any],
    geometry: Geometry,
    *,
    world: int,
    device_type: str,
    compressing: bool,
    check: Callable[..., list[str]] | None = None,
) -> list[str]:
    """Every problem with the resolved arguments, each with what would work; [] if none.

    ``args``: the parsed xfuser + example arguments (parallel degrees already defaulted);
    ``inputs``: the generation inputs after model defaults (``height``, ``width``, ...);
    ``compressing``: compactfusion will patch (PipeFusion is refused then); ``check``: the
    example's own ``(args, inputs, geometry, sp) -> list[str]``.
    """
    sp = args.ring_degree * args.ulysses_degree
    found = _degrees(args, geometry, world)
    pp = args.pipefusion_parallel_degree
    patches = (args.num_pipeline_patch or pp) if pp > 1 else 1
    if sp >= 1:
        found += _sizes(args, inputs, geometry, sp, patches)
        if check is not None:
            found += check(args, inputs, geometry, sp)
    if compressing and pp > 1:
        found.append(
            f"--pipefusion_parallel_degree {pp}: compactfusion compresses ring and Ulysses "
            "attention only and refuses PipeFusion; use ring/Ulysses degrees or --compact-off"
        )
    found += _offload(args, device_type)
    return found
