"""Tiny, randomly initialised diffusers pipelines for diffusers' own context parallelism.

The families whose transformers carry a context-parallel plan (``_cp_plan``) in diffusers 0.42.1
and that compactfusion tests: FLUX.1 (``flux``), Wan 2.1 (``wan``, text-to-video, classifier-free
guidance through ``cache_context("cond"/"uncond")``), Qwen-Image (``qwenimage``, true CFG the
same way) and FLUX.2 (``flux2``). Weights come from configs and a seeded generator, nothing is
downloaded, there are no text encoders (``prompt_embeds`` are passed, seeded) and no VAEs are
run (``output_type="latent"``), so every rank builds bit-identical models and inputs.

Typical use inside a rank started by :func:`compactfusion.testing.spawn_ranks`::

    prepare_diffusers_cpu()                                   # CPU only
    pipe = build_diffusers_pipeline("wan")
    single = generate_diffusers(pipe, "wan")                   # before parallelism
    enable_context_parallel(pipe, ring=2)
    out = generate_diffusers(pipe, "wan")                      # every rank gets the full output
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from compactfusion.testing.tiny_pipelines import _seeded, tiny_flux

__all__ = [
    "DIFFUSERS_KINDS",
    "build_diffusers_pipeline",
    "enable_context_parallel",
    "generate_diffusers",
    "tiny_flux2",
    "tiny_qwenimage",
    "tiny_wan",
]


@_seeded
def tiny_wan(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    heads: int = 4,
    head_dim: int = 16,
    num_layers: int = 2,
    text_dim: int = 32,
    two_stage: bool = False,
):
    """A diffusers ``WanPipeline`` (text to video) with a tiny random transformer, no VAE.

    Without a VAE the pipeline assumes Wan's factors (8 spatial, 4 temporal): 64x64 px and 5
    frames are 2 latent frames of 8x8, i.e. 2 x 4 x 4 = 32 tokens after the 1x2x2 patches.
    With ``two_stage`` it is a Wan 2.2-style pipeline: a second transformer
    (``transformer_2``) denoises the low-noise half (``boundary_ratio=0.5``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    def transformer():
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=head_dim,
            in_channels=4,
            out_channels=4,
            text_dim=text_dim,
            freq_dim=32,
            ffn_dim=64,
            num_layers=num_layers,
            rope_max_seq_len=32,
        )

    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer(),
        transformer_2=transformer() if two_stage else None,
        boundary_ratio=0.5 if two_stage else None,
    )
    return _finish(pipe, dtype)


@_seeded
def tiny_qwenimage(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    heads: int = 4,
    head_dim: int = 16,
    num_layers: int = 2,
    text_dim: int = 32,
):
    """A diffusers ``QwenImagePipeline`` with a tiny random transformer, no VAE.

    Without a VAE the pipeline assumes a factor of 8 and 2x2 patches: 64x64 px are 4x4 = 16
    image tokens.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    if head_dim % 8 != 0:
        raise ValueError(f"head_dim must be a multiple of 8 for Qwen-Image RoPE, got {head_dim}")
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    return _finish(pipe, dtype)


@_seeded
def tiny_flux2(
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    heads: int = 4,
    head_dim: int = 16,
    num_layers: int = 1,
    num_single_layers: int = 1,
    text_dim: int = 32,
):
    """A diffusers ``Flux2Pipeline`` with a tiny random transformer and a tiny VAE (the
    pipeline reads the VAE's dtype; it is not run with ``output_type="latent"``).

    The VAE has spatial factor 2: 32x32 px are 16x16 latents, 8x8 = 64 packed image tokens.
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )

    if head_dim % 4 != 0:
        raise ValueError(f"head_dim must be a multiple of 4 for FLUX.2 RoPE, got {head_dim}")
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_dim,
        timestep_guidance_channels=32,
        axes_dims_rope=(head_dim // 4,) * 4,
    )
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = Flux2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
    )
    return _finish(pipe, dtype)


def _finish(pipe, dtype: torch.dtype):
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class _DiffusersKind:
    builder: Callable[..., Any]
    height: int
    width: int
    text_len: int  # divisible by 4: FLUX splits the text tokens across the ranks too
    guidance: str | None  # the call argument that turns classifier-free guidance on


DIFFUSERS_KINDS: dict[str, _DiffusersKind] = {
    "flux": _DiffusersKind(tiny_flux, 32, 32, 8, None),
    "wan": _DiffusersKind(tiny_wan, 64, 64, 8, "guidance_scale"),
    "qwenimage": _DiffusersKind(tiny_qwenimage, 64, 64, 8, "true_cfg_scale"),
    "flux2": _DiffusersKind(tiny_flux2, 32, 32, 8, None),
}


def _kind(kind: str) -> _DiffusersKind:
    if kind not in DIFFUSERS_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(DIFFUSERS_KINDS)}")
    return DIFFUSERS_KINDS[kind]


def build_diffusers_pipeline(kind: str, **kwargs: Any):
    """A tiny seeded pipeline of ``kind`` (``DIFFUSERS_KINDS``); ``kwargs`` go to its builder
    (``seed``, ``dtype``, ``heads``, ``head_dim``, ...)."""
    return _kind(kind).builder(**kwargs)


def enable_context_parallel(pipe, ring: int = 1, ulysses: int = 1, backend: str | None = None):
    """``enable_parallelism(ContextParallelConfig(ring, ulysses))`` on ``pipe.transformer``
    (and ``pipe.transformer_2`` when there is one).

    ``backend`` defaults to ``"_native_flash"`` when ``ring > 1`` (ring attention needs an op
    returning the log-sum-exp; on CPU see :func:`~compactfusion.testing.prepare_diffusers_cpu`)
    and to diffusers' default otherwise.
    """
    from diffusers import ContextParallelConfig

    if backend is None and ring > 1:
        backend = "_native_flash"
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        if backend is not None:
            model.set_attention_backend(backend)
        model.enable_parallelism(
            config=ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses)
        )
    return pipe


def generate_diffusers(
    pipe,
    kind: str,
    steps: int = 3,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    *,
    cfg: bool = False,
    **call_kwargs: Any,
) -> torch.Tensor:
    """One seeded generation of ``steps`` steps; returns the latents as a CPU tensor.

    The noise comes from a CPU generator seeded with ``seed`` and the text conditioning from
    the same seed, so runs with and without parallelism start from identical inputs. With
    ``cfg`` the pipeline runs classifier-free guidance (a negative prompt and a guidance scale
    of 4: two transformer calls per step, inside ``cache_context("cond")`` / ``("uncond")``);
    only Wan and Qwen-Image have it.
    """
    spec = _kind(kind)
    if cfg and spec.guidance is None:
        raise ValueError(f"{kind!r} has no classifier-free guidance in diffusers")
    transformer = pipe.transformer
    text_dim = (
        transformer.config.text_dim if kind == "wan" else transformer.config.joint_attention_dim
    )
    text = torch.Generator("cpu").manual_seed(seed + 1)

    def embeds() -> torch.Tensor:
        x = torch.randn(1, spec.text_len, text_dim, generator=text)
        return x.to(device=transformer.device, dtype=transformer.dtype)

    kwargs: dict[str, Any] = dict(
        height=height or spec.height,
        width=width or spec.width,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent",
        return_dict=False,
        prompt_embeds=embeds(),
    )
    negative = embeds()
    if kind == "wan":
        kwargs.update(num_frames=5, guidance_scale=4.0 if cfg else 1.0)
        if cfg:
            kwargs["negative_prompt_embeds"] = negative
    elif kind == "qwenimage":
        kwargs.update(true_cfg_scale=4.0 if cfg else 1.0, max_sequence_length=spec.text_len)
        if cfg:
            kwargs["negative_prompt_embeds"] = negative
    elif kind == "flux":
        kwargs.update(
            pooled_prompt_embeds=torch.randn(
                1, transformer.config.pooled_projection_dim, generator=text
            ).to(transformer.dtype),
            max_sequence_length=spec.text_len,
        )
    else:  # flux2: guidance-distilled, the scale is an input of the model
        kwargs.update(guidance_scale=4.0, max_sequence_length=spec.text_len)
    kwargs.update(call_kwargs)
    output = pipe(**kwargs)[0]
    return output.detach().to("cpu")
