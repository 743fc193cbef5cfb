"""Tiny, randomly initialised diffusion pipelines run through xfuser, for multi-rank tests.

Everything here is built from configs with seeded random weights: nothing is downloaded and
there are no text encoders (``prompt_embeds`` and friends are passed directly, drawn from a
seeded generator). The same seed gives bit-identical weights and inputs on every rank, so a
parallel run can be compared with the single-process reference.

Typical use inside a rank started by :func:`compactfusion.testing.spawn_ranks`::

    prepare_xfuser_cpu()                       # on CPU, before xfuser is imported
    ref = generate(build_pipeline("flux"), "flux")               # single process, no xfuser
    out = generate(build_pipeline("flux", ring=2), "flux")       # xfuser, 2 ranks
    # every rank gets the full ``out``; compare it with ``ref``

Parallel pipelines use xfuser's process-global state (its groups and runtime state). Building a
parallel pipeline therefore (re)initialises that state for the whole process, tearing down the
groups of any parallel pipeline built before it; use one parallel pipeline at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "KINDS",
    "build_engine_config",
    "build_pipeline",
    "destroy_xfuser_distributed",
    "generate",
    "init_xfuser_distributed",
    "make_inputs",
    "share_output",
    "tiny_cogvideox",
    "tiny_flux",
    "tiny_pixart",
    "tiny_sd3",
]


# --------------------------------------------------------------------------------------------
# Tiny diffusers pipelines (no xfuser needed)
# --------------------------------------------------------------------------------------------


def _seeded(builder: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``builder`` with the torch CPU RNG seeded by its ``seed`` argument.

    The weights are then identical in every process, and the caller's RNG state is restored.
    """

    @functools.wraps(builder)
    def wrapper(*, seed: int = 0, **kwargs: Any):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return builder(seed=seed, **kwargs)

    return wrapper


def _tiny_vae_2d(latent_channels: int, scaling_factor: float, shift_factor: float | None):
    """A two-level AutoencoderKL (spatial factor 2) with a handful of channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


@_seeded
def tiny_flux(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    num_single_layers: int = 2,
    heads: int = 4,
    head_dim: int = 16,
    text_dim: int = 32,
    pooled_dim: int = 32,
):
    """A diffusers ``FluxPipeline`` with a tiny random transformer and VAE.

    Defaults: 2 double-stream + 2 single-stream blocks, 4 heads x 16, 4 latent channels
    (16 packed), a VAE with spatial factor 2 (32x32 px -> 8x8 = 64 image tokens).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    if head_dim % 4 != 0:
        raise ValueError(f"head_dim must be a multiple of 4 for FLUX RoPE, got {head_dim}")
    rope_t = head_dim // 4
    rope_hw = (head_dim - rope_t) // 2
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=(head_dim - 2 * rope_hw, rope_hw, rope_hw),
    )
    vae = _tiny_vae_2d(latent_channels=4, scaling_factor=1.5035, shift_factor=0.0609)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    return _finish(pipe, dtype)


@_seeded
def tiny_cogvideox(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    heads: int = 4,
    head_dim: int = 16,
    text_dim: int = 32,
    text_len: int = 8,
    rotary: bool = True,
):
    """A diffusers ``CogVideoXPipeline`` with a tiny random transformer and 3-D VAE.

    Defaults: 2 blocks, 4 heads x 16, patch size 2, 4 latent channels, a VAE with spatial factor
    2 and temporal factor 4 (32x32 px, 5 frames -> 2 latent frames x 16x16 -> 128 video tokens),
    ``text_len`` text tokens (the transformer's ``max_text_seq_length``), RoPE as in
    CogVideoX-5B when ``rotary`` (sin-cos positional embeddings as in CogVideoX-2B otherwise).
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=text_dim,
        num_layers=num_layers,
        sample_width=16,
        sample_height=16,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=text_len,
        use_rotary_positional_embeddings=rotary,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )
    return _finish(pipe, dtype)


@_seeded
def tiny_sd3(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    heads: int = 4,
    head_dim: int = 16,
    text_dim: int = 32,
    pooled_dim: int = 32,
):
    """A diffusers ``StableDiffusion3Pipeline`` with a tiny random MMDiT and VAE.

    Defaults: 2 joint blocks, 4 heads x 16, patch size 2, 4 latent channels, a VAE with
    spatial factor 2 (32x32 px -> 16x16 latents -> 64 image tokens).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=pooled_dim,
        out_channels=4,
        pos_embed_max_size=32,
    )
    vae = _tiny_vae_2d(latent_channels=4, scaling_factor=1.5305, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return _finish(pipe, dtype)


@_seeded
def tiny_pixart(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    num_layers: int = 2,
    heads: int = 4,
    head_dim: int = 16,
    text_dim: int = 32,
):
    """A diffusers ``PixArtAlphaPipeline`` with a tiny random transformer and VAE.

    Defaults: 2 blocks (self-attention ``attn1`` + cross-attention ``attn2``), 4 heads x 16,
    patch size 2, 4 latent channels (8 out: learned sigma), VAE spatial factor 2
    (32x32 px -> 16x16 latents -> 64 image tokens).
    """
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=heads * head_dim,
        sample_size=16,
        patch_size=2,
        caption_channels=text_dim,
        norm_num_groups=4,
    )
    vae = _tiny_vae_2d(latent_channels=4, scaling_factor=0.18215, shift_factor=None)
    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    return _finish(pipe, dtype)


def _finish(pipe, dtype: torch.dtype):
    """Cast to ``dtype`` (weights are created in float32) and silence the progress bar."""
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class _Kind:
    """How to build, feed and wrap one pipeline family."""

    builder: Callable[..., Any]
    xfuser_class: str  # attribute of the ``xfuser`` package
    height: int
    width: int
    text_len: int
    guidance_scale: float  # > 1 means classifier-free guidance (batch of 2)
    num_frames: int | None = None
    cfg_parallel: bool = True  # whether the xfuser pipeline accepts use_cfg_parallel


_KINDS: dict[str, _Kind] = {
    "flux": _Kind(
        tiny_flux,
        "xFuserFluxPipeline",
        height=32,
        width=32,
        text_len=8,
        guidance_scale=3.5,
        cfg_parallel=False,  # FLUX.1 is guidance-distilled: one batch, nothing to split
    ),
    "cogvideox": _Kind(
        tiny_cogvideox,
        "xFuserCogVideoXPipeline",
        height=32,
        width=32,
        text_len=8,
        guidance_scale=6.0,
        num_frames=5,
    ),
    "sd3": _Kind(
        tiny_sd3,
        "xFuserStableDiffusion3Pipeline",
        height=32,
        width=32,
        text_len=8,
        guidance_scale=5.0,
    ),
    "pixart": _Kind(
        tiny_pixart,
        "xFuserPixArtAlphaPipeline",
        height=32,
        width=32,
        text_len=8,
        guidance_scale=4.5,
    ),
}
KINDS: tuple[str, ...] = tuple(_KINDS)


def _kind(kind: str) -> _Kind:
    try:
        return _KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown pipeline kind {kind!r}; expected one of {KINDS}") from None


# --------------------------------------------------------------------------------------------
# xfuser configuration and distributed state
# --------------------------------------------------------------------------------------------


def build_engine_config(
    ring: int = 1,
    ulysses: int = 1,
    cfg: int = 1,
    *,
    dtype: torch.dtype = torch.float32,
    attention_backend: str | None = None,
    use_fp8_comms: bool = False,
):
    """Build xfuser's ``EngineConfig`` for the given degrees, as ``xFuserArgs`` would.

    The world size is taken from the default process group (created from the ``env://``
    variables if it does not exist yet, as ``xFuserArgs.create_config`` does), and the whole
    world is the DiT group (``dit_parallel_size == world_size``, no separate VAE ranks), so
    ``ring * ulysses * cfg`` must equal it. ``runtime_config.dtype`` is set to ``dtype``
    (xfuser's default is float16, and it allocates broadcast buffers with it).

    Args:
        ring: ring-attention degree.
        ulysses: Ulysses (all-to-all) degree.
        cfg: classifier-free-guidance parallel degree, 1 or 2.
        dtype: the pipeline dtype.
        attention_backend: an ``AttentionBackendType`` name; None lets xfuser choose (on CPU,
            after :func:`~compactfusion.testing.prepare_xfuser_cpu`, that is ``SDPA_FLASH``).
        use_fp8_comms: xfuser's own FP8 Ulysses communication (``--use_fp8_comms``).
    """
    from xfuser import xFuserArgs

    for name, value in (("ring", ring), ("ulysses", ulysses)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if cfg not in (1, 2):
        raise ValueError(f"cfg must be 1 or 2, got {cfg!r}")
    _ensure_world()
    world_size = dist.get_world_size()
    if ring * ulysses * cfg != world_size:
        raise ValueError(
            f"ring ({ring}) x ulysses ({ulysses}) x cfg ({cfg}) must equal the world size "
            f"({world_size})"
        )
    args = xFuserArgs(
        ring_degree=ring,
        ulysses_degree=ulysses,
        use_cfg_parallel=cfg == 2,
        attention_backend=attention_backend,
        use_fp8_comms=use_fp8_comms,
    )
    engine_config, _input_config = args.create_config()
    engine_config.runtime_config.dtype = dtype
    return engine_config


def init_xfuser_distributed(engine_config) -> None:
    """Initialise xfuser's world group and model-parallel groups for ``engine_config``.

    Reuses the default ``torch.distributed`` group when it exists (as inside
    :func:`~compactfusion.testing.spawn_ranks`); otherwise xfuser creates it from the
    ``env://`` variables. Groups left by an earlier configuration in this process are torn down
    first, so several configurations can run one after another in the same ranks. Creating
    groups is collective: every rank must call this (and :func:`build_pipeline`) in the same
    order.
    """
    from xfuser.core.distributed import parallel_state

    _ensure_world()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    config = engine_config.parallel_config
    parallel_state.initialize_model_parallel(
        data_parallel_degree=config.dp_degree,
        classifier_free_guidance_degree=config.cfg_degree,
        sequence_parallel_degree=config.sp_degree,
        ulysses_degree=config.ulysses_degree,
        ring_degree=config.ring_degree,
        tensor_parallel_degree=config.tp_degree,
        pipeline_parallel_degree=config.pp_degree,
        fully_shard_degree=config.fs_degree,
        vae_parallel_size=config.vae_parallel_size,
        use_parallel_vae=config.use_parallel_vae,
    )


def _ensure_world() -> None:
    """Make sure the default group and xfuser's world group coordinator exist."""
    import os

    from xfuser.core.distributed import parallel_state

    if not dist.is_initialized():
        missing = [
            var
            for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
            if var not in os.environ
        ]
        if missing:
            raise RuntimeError(
                "torch.distributed is not initialised and the env:// variables "
                f"{missing} are not set: run inside spawn_ranks() or a launcher such as torchrun"
            )
        parallel_state.init_distributed_environment()  # env://, backend chosen by xfuser
    elif parallel_state._WORLD is None:
        parallel_state.init_distributed_environment(
            world_size=dist.get_world_size(), rank=dist.get_rank()
        )


def destroy_xfuser_distributed() -> None:
    """Destroy xfuser's model-parallel and world groups; the default group is left alone.

    Safe to call when xfuser was never imported or never initialised.
    """
    import sys

    parallel_state = sys.modules.get("xfuser.core.distributed.parallel_state")
    if parallel_state is None:
        return
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if parallel_state._WORLD is not None:
        parallel_state._WORLD.destroy()
        parallel_state._WORLD = None


# --------------------------------------------------------------------------------------------
# Building and running pipelines
# --------------------------------------------------------------------------------------------


def build_pipeline(
    kind: str,
    ring: int = 1,
    ulysses: int = 1,
    cfg: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    seed: int = 0,
    attention_backend: str | None = None,
    use_fp8_comms: bool = False,
    **sizes: Any,
):
    """Build a tiny pipeline of ``kind``, wrapped in its xfuser class when any degree is > 1.

    With ``ring == ulysses == cfg == 1`` the plain diffusers pipeline is returned (no xfuser,
    no process group needed): this is the single-process reference. Otherwise the xfuser
    groups are (re)initialised for this world (see :func:`init_xfuser_distributed`) and the
    pipeline is wrapped, e.g. in ``xFuserFluxPipeline``; the diffusers pipeline is then
    ``pipe.module`` and its transformer ``pipe.module.transformer``.

    Args:
        kind: one of :data:`KINDS` (``"flux"``, ``"cogvideox"``, ``"sd3"``, ``"pixart"``).
        ring, ulysses, cfg: parallel degrees; their product must be the world size.
        device: ``"cpu"``, ``"cuda"`` (the current CUDA device) or a torch device.
        dtype: parameter dtype.
        seed: seed of the random weights (the same on every rank).
        attention_backend, use_fp8_comms: see :func:`build_engine_config`.
        **sizes: forwarded to the ``tiny_<kind>`` builder (``num_layers``, ``heads``,
            ``head_dim``, ...).
    """
    spec = _kind(kind)
    if cfg != 1 and not spec.cfg_parallel:
        raise ValueError(f"xfuser's {kind} pipeline does not support CFG parallelism (cfg=1)")
    parallel = ring * ulysses * cfg > 1
    if use_fp8_comms and not parallel:
        raise ValueError("use_fp8_comms needs an xfuser pipeline (a parallel degree > 1)")
    if parallel and not torch.cuda.is_available():
        from compactfusion.testing import xfuser_cpu

        if not xfuser_cpu._APPLIED:
            raise RuntimeError(
                "on a CPU-only machine call compactfusion.testing.prepare_xfuser_cpu() in "
                "this process before building a parallel pipeline"
            )
    device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else device
    pipe = spec.builder(seed=seed, dtype=dtype, **sizes).to(device)
    if not parallel:
        return pipe

    import xfuser

    engine_config = build_engine_config(
        ring,
        ulysses,
        cfg,
        dtype=dtype,
        attention_backend=attention_backend,
        use_fp8_comms=use_fp8_comms,
    )
    init_xfuser_distributed(engine_config)
    wrapper_class = getattr(xfuser, spec.xfuser_class)
    return wrapper_class(pipe, engine_config)


def make_inputs(
    kind: str,
    pipe,
    *,
    seed: int = 0,
    text_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """Seeded random text conditioning for ``pipe`` (a tiny diffusers or xfuser pipeline).

    Returns the keyword arguments that replace the text encoders: ``prompt_embeds`` (and
    ``pooled_prompt_embeds`` / ``negative_*`` / attention masks, as the family needs) with
    batch size 1 and ``text_len`` tokens (default: 8; CogVideoX always uses its
    ``max_text_seq_length``, set with ``build_pipeline("cogvideox", text_len=...)``).

    Keep ``text_len`` divisible by ``ring * ulysses`` for FLUX: xfuser 0.7.0 then splits the
    text tokens across the sequence-parallel ranks like image tokens. Otherwise it keeps the
    whole text on every rank *inside* the local Q/K/V, so ring/Ulysses attention sees the text
    keys once per rank and the parallel FLUX output is wrong (relative error ~2e-3 on the tiny
    model). SD3 and CogVideoX handle an indivisible length correctly (joint-attention path).
    """
    spec = _kind(kind)
    transformer = _diffusers_transformer(pipe)
    config = transformer.config
    dtype = transformer.dtype
    device = transformer.device
    generator = torch.Generator("cpu").manual_seed(seed + 1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    if kind == "cogvideox":
        text_len = config.max_text_seq_length
    elif text_len is None:
        text_len = spec.text_len
    if kind == "flux":
        return {
            "prompt_embeds": randn(1, text_len, config.joint_attention_dim),
            "pooled_prompt_embeds": randn(1, config.pooled_projection_dim),
            "max_sequence_length": text_len,
        }
    if kind == "cogvideox":
        return {
            "prompt_embeds": randn(1, text_len, config.text_embed_dim),
            "negative_prompt_embeds": randn(1, text_len, config.text_embed_dim),
            "max_sequence_length": text_len,
        }
    if kind == "sd3":
        return {
            "prompt_embeds": randn(1, text_len, config.joint_attention_dim),
            "negative_prompt_embeds": randn(1, text_len, config.joint_attention_dim),
            "pooled_prompt_embeds": randn(1, config.pooled_projection_dim),
            "negative_pooled_prompt_embeds": randn(1, config.pooled_projection_dim),
        }
    mask = torch.ones(1, text_len, device=device, dtype=torch.long)
    return {  # pixart
        "prompt_embeds": randn(1, text_len, config.caption_channels),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": randn(1, text_len, config.caption_channels),
        "negative_prompt_attention_mask": mask.clone(),
        "negative_prompt": None,
        "use_resolution_binning": False,
        "max_sequence_length": text_len,
    }


def generate(
    pipe,
    kind: str,
    steps: int = 3,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    *,
    num_frames: int | None = None,
    text_len: int | None = None,
    guidance_scale: float | None = None,
    output_type: str = "latent",
    **call_kwargs: Any,
) -> torch.Tensor:
    """Run one seeded generation of ``steps`` steps and return the output as a CPU tensor.

    The initial noise comes from a CPU ``torch.Generator`` seeded with ``seed`` and the text
    conditioning from :func:`make_inputs`, so the single-process reference and every parallel
    configuration start from identical inputs. In a multi-rank world every rank receives the
    full output (xfuser returns it only on the last data-parallel group's last rank; it is
    broadcast from there).

    Args:
        pipe: a pipeline from :func:`build_pipeline`.
        kind: the pipeline family it was built as.
        steps: number of denoising steps.
        seed: seed of the initial noise and of the text conditioning.
        height, width: pixel size (default 32x32).
        num_frames: CogVideoX frame count (default 5, i.e. 2 latent frames).
        text_len: number of text tokens (default 8; ignored for CogVideoX, see
            :func:`make_inputs`).
        guidance_scale: defaults per family; CogVideoX, SD3 and PixArt use classifier-free
            guidance (> 1), which is what CFG parallelism splits.
        output_type: ``"latent"`` (the denoised latents) or ``"pt"`` (decoded by the VAE).
        **call_kwargs: extra keyword arguments for the pipeline call.

    Returns:
        ``"latent"``: FLUX packed latents [B, tokens, 16]; SD3/PixArt [B, C, h, w]; CogVideoX
        [B, F, C, h, w]. ``"pt"``: images [B, 3, H, W] in [0, 1], or CogVideoX frames
        [B, F, 3, H, W].
    """
    spec = _kind(kind)
    if output_type not in ("latent", "pt"):
        raise ValueError(f"output_type must be 'latent' or 'pt', got {output_type!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    kwargs: dict[str, Any] = dict(
        height=height or spec.height,
        width=width or spec.width,
        num_inference_steps=steps,
        guidance_scale=spec.guidance_scale if guidance_scale is None else guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type=output_type,
        return_dict=False,
    )
    if kind == "cogvideox":
        kwargs["num_frames"] = num_frames or spec.num_frames
    elif num_frames is not None:
        raise ValueError(f"num_frames is only meaningful for cogvideox, not {kind!r}")
    kwargs.update(make_inputs(kind, pipe, seed=seed, text_len=text_len))
    kwargs.update(call_kwargs)
    result = pipe(**kwargs)
    output = _first_output(result)
    if not hasattr(pipe, "engine_config"):  # plain diffusers: every rank computed its own
        if output is None:
            raise RuntimeError("the pipeline returned no output")
        return output
    return share_output(output)


def _diffusers_transformer(pipe) -> torch.nn.Module:
    """The diffusers transformer of a diffusers or xfuser pipeline (unwrapping xfuser)."""
    transformer = pipe.transformer
    return getattr(transformer, "module", transformer)


def _first_output(result) -> torch.Tensor | None:
    """The output tensor of a ``return_dict=False`` call, or None on ranks that have none."""
    if result is None:
        return None
    output = result[0]
    if isinstance(output, list):  # xfuser CogVideoX returns [None] * batch off the last rank
        output = None if all(item is None for item in output) else torch.stack(output)
    if output is None:
        return None
    return output.detach().to("cpu")


def share_output(output: torch.Tensor | None) -> torch.Tensor:
    """Give every rank the output held by the last rank that has one (a collective)."""
    has_output: list[bool | None] = [None] * dist.get_world_size()
    dist.all_gather_object(has_output, output is not None)
    holders = [rank for rank, has in enumerate(has_output) if has]
    if not holders:
        raise RuntimeError("no rank received an output from the pipeline")
    box = [output]
    dist.broadcast_object_list(box, src=holders[-1])
    return box[0]
