"""Tiny random-weight pipelines built the way xfuser 0.7's model runner builds them, for tests.

xfuser's runner (``xdit`` -> ``xfuser.runner`` -> ``MODEL_REGISTRY``) loads a *plain* diffusers
pipeline (``WanPipeline``, ``HunyuanVideoPipeline``, ``Flux2Pipeline``, ``QwenImagePipeline``)
around one of xfuser's transformer wrappers (``xFuserWanTransformer3DWrapper``, ...) and then
calls ``initialize_runtime_state(pipe, engine_config)``. :func:`runner_pipeline` does exactly
that with a tiny seeded transformer; :func:`save_tiny_checkpoint` writes such a model to a
directory so that the runner's own model classes (``xFuserWan21T2VModel``, ...) load it with
``from_pretrained`` (see :func:`local_runner_model`).

There are no text encoders and no VAE: the conditioning is passed as ``prompt_embeds`` (drawn
from a seeded generator, identical on every rank) and the output is the denoised latents.
Call :func:`~compactfusion.testing.prepare_xfuser_cpu` first on a CPU-only machine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .tiny_pipelines import build_engine_config, init_xfuser_distributed, share_output

__all__ = [
    "RUNNER_KINDS",
    "runner_generate",
    "runner_inputs",
    "runner_pipeline",
    "prepare_runner_cpu",
    "save_tiny_checkpoint",
    "local_runner_model",
    "tiny_transformer",
]


# --------------------------------------------------------------------------------------------
# Transformers (xfuser wrappers with tiny configs)
# --------------------------------------------------------------------------------------------
def _wan_config(heads: int, head_dim: int, layers: int) -> dict[str, Any]:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


def _hunyuan_config(heads: int, head_dim: int, layers: int) -> dict[str, Any]:
    rope_hw = 2 * (head_dim // 6)
    return dict(
        in_channels=16,
        out_channels=16,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=layers,
        num_single_layers=layers,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(head_dim - 2 * rope_hw, rope_hw, rope_hw),
    )


def _flux2_config(heads: int, head_dim: int, layers: int) -> dict[str, Any]:
    quarter = head_dim // 4
    return dict(
        patch_size=1,
        in_channels=16,
        num_layers=layers,
        num_single_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(quarter, quarter, quarter, head_dim - 3 * quarter),
        guidance_embeds=True,
    )


def _qwen_config(heads: int, head_dim: int, layers: int) -> dict[str, Any]:
    rope_hw = 2 * (head_dim // 6)
    return dict(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        axes_dims_rope=(head_dim - 2 * rope_hw, rope_hw, rope_hw),
    )


@dataclass(frozen=True)
class _RunnerKind:
    """One model family as xfuser's runner builds it."""

    wrapper: str  # "module:Class" of xfuser's transformer wrapper
    base: str  # the diffusers transformer class it subclasses
    pipeline: str  # diffusers pipeline class
    config: Callable[[int, int, int], dict[str, Any]]
    runner_model: str | None  # MODEL_REGISTRY key whose class loads it (None: not wired)
    height: int = 32
    width: int = 32
    num_frames: int | None = None
    guidance_scale: float = 1.0  # default: one transformer call per step
    text_len: int = 8


_XT = "xfuser.model_executor.models.transformers"
_RUNNER_KINDS: dict[str, _RunnerKind] = {
    "wan2.1": _RunnerKind(
        f"{_XT}.transformer_wan:xFuserWanTransformer3DWrapper",
        "WanTransformer3DModel",
        "WanPipeline",
        _wan_config,
        "Wan2.1-T2V",
        num_frames=5,
    ),
    "wan2.2": _RunnerKind(  # two experts: transformer (high noise) and transformer_2
        f"{_XT}.transformer_wan:xFuserWanTransformer3DWrapper",
        "WanTransformer3DModel",
        "WanPipeline",
        _wan_config,
        "Wan2.2-T2V",
        num_frames=5,
    ),
    "hunyuanvideo": _RunnerKind(
        f"{_XT}.transformer_hunyuan_video:xFuserHunyuanVideoTransformer3DWrapper",
        "HunyuanVideoTransformer3DModel",
        "HunyuanVideoPipeline",
        _hunyuan_config,
        None,
        num_frames=5,
        guidance_scale=6.0,  # embedded guidance: still one call per step
    ),
    "flux2": _RunnerKind(
        f"{_XT}.transformer_flux2:xFuserFlux2Transformer2DWrapper",
        "Flux2Transformer2DModel",
        "Flux2Pipeline",
        _flux2_config,
        None,
        height=64,  # 16 image tokens after the VAE factor 8 and 2x2 packing
        width=64,
        guidance_scale=4.0,  # embedded guidance
    ),
    "qwen-image": _RunnerKind(
        f"{_XT}.transformer_qwen:xFuserQwenImageTransformerWrapper",
        "QwenImageTransformer2DModel",
        "QwenImagePipeline",
        _qwen_config,
        None,
        height=64,
        width=64,
    ),
}
RUNNER_KINDS: tuple[str, ...] = tuple(_RUNNER_KINDS)


def _runner_kind(kind: str) -> _RunnerKind:
    try:
        return _RUNNER_KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown runner kind {kind!r}; expected one of {RUNNER_KINDS}") from None


def _import(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def tiny_transformer(
    kind: str,
    *,
    seed: int = 0,
    heads: int = 2,
    head_dim: int = 24,
    layers: int = 2,
    dtype: torch.dtype = torch.float32,
    xfuser: bool = True,
) -> torch.nn.Module:
    """xfuser's transformer wrapper for ``kind`` with a tiny config and seeded random weights
    (identical on every rank; the caller's RNG state is kept). ``xfuser=False`` builds the
    diffusers class it subclasses instead, with the same weights (no xfuser import)."""
    spec = _runner_kind(kind)
    wrapper = _import(spec.wrapper) if xfuser else _import(f"diffusers:{spec.base}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # from_config: the Hunyuan wrapper installs its attention processors there.
        model = wrapper.from_config(spec.config(heads, head_dim, layers))
    return model.to(dtype).eval()


def _scheduler(kind: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if kind.startswith("wan"):
        return FlowMatchEulerDiscreteScheduler(shift=5.0)
    if kind == "hunyuanvideo":
        return FlowMatchEulerDiscreteScheduler(shift=7.0)
    # FLUX.2 and Qwen-Image shift by resolution.
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        shift_terminal=None,
    )


def _pipeline(kind: str, transformer, transformer_2=None):
    import diffusers

    spec = _runner_kind(kind)
    cls = getattr(diffusers, spec.pipeline)
    components: dict[str, Any] = dict(
        transformer=transformer,
        scheduler=_scheduler(kind),
        vae=None,
        text_encoder=None,
        tokenizer=None,
    )
    if kind == "hunyuanvideo":
        components.update(text_encoder_2=None, tokenizer_2=None)
    if kind.startswith("wan"):
        components["transformer_2"] = transformer_2
        if transformer_2 is not None:
            components["boundary_ratio"] = 0.875
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def runner_pipeline(
    kind: str,
    ring: int = 1,
    ulysses: int = 1,
    cfg: int = 1,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **sizes: Any,
):
    """A diffusers pipeline around xfuser's transformer wrapper(s), with xfuser's groups and
    runtime state initialised for ``ring`` x ``ulysses`` x ``cfg`` ranks as the model runner
    does (``initialize_runtime_state(pipe, engine_config)``). ``"wan2.2"`` has two experts
    (``transformer`` and ``transformer_2``). ``sizes``: ``heads``, ``head_dim``, ``layers``.
    """
    from xfuser.core.distributed import initialize_runtime_state

    transformer = tiny_transformer(kind, seed=seed, dtype=dtype, **sizes)
    second = None
    if kind == "wan2.2":
        second = tiny_transformer(kind, seed=seed + 1, dtype=dtype, **sizes)
    pipe = _pipeline(kind, transformer, second)
    engine_config = build_engine_config(ring, ulysses, cfg, dtype=dtype)
    init_xfuser_distributed(engine_config)
    initialize_runtime_state(pipe, engine_config)
    return pipe


# --------------------------------------------------------------------------------------------
# Inputs and generation
# --------------------------------------------------------------------------------------------
def runner_inputs(
    kind: str, pipe, *, seed: int = 0, guidance_scale: float | None = None
) -> dict[str, Any]:
    """Seeded text conditioning replacing the text encoders (batch 1). For Wan, a
    ``guidance_scale`` > 1 adds ``negative_prompt_embeds`` (classifier-free guidance: the
    conditional and unconditional branches are two transformer calls per step); for
    Qwen-Image the same is done through ``true_cfg_scale``."""
    spec = _runner_kind(kind)
    transformer = pipe.transformer
    device, dtype = transformer.device, transformer.dtype
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    guidance = spec.guidance_scale if guidance_scale is None else guidance_scale

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    n = spec.text_len
    if kind.startswith("wan"):
        dim = transformer.config.text_dim
        out = {"prompt_embeds": randn(1, n, dim), "guidance_scale": guidance}
        if guidance > 1:
            out["negative_prompt_embeds"] = randn(1, n, dim)
        return out
    if kind == "hunyuanvideo":
        mask = torch.ones(1, n, dtype=torch.long, device=device)
        return {
            "prompt_embeds": randn(1, n, transformer.config.text_embed_dim),
            "pooled_prompt_embeds": randn(1, transformer.config.pooled_projection_dim),
            "prompt_attention_mask": mask,
            "guidance_scale": guidance,
        }
    if kind == "flux2":
        return {
            "prompt_embeds": randn(1, n, transformer.config.joint_attention_dim),
            "guidance_scale": guidance,
        }
    dim = transformer.config.joint_attention_dim  # qwen-image
    mask = torch.ones(1, n, dtype=torch.long, device=device)
    out = {"prompt_embeds": randn(1, n, dim), "prompt_embeds_mask": mask}
    if guidance > 1:
        out.update(
            negative_prompt_embeds=randn(1, n, dim),
            negative_prompt_embeds_mask=mask.clone(),
            true_cfg_scale=guidance,
        )
    return out


def runner_generate(
    pipe,
    kind: str,
    steps: int = 3,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    *,
    num_frames: int | None = None,
    guidance_scale: float | None = None,
) -> torch.Tensor:
    """One seeded generation (latents, CPU tensor); every rank gets the same output."""
    spec = _runner_kind(kind)
    kwargs: dict[str, Any] = dict(
        height=height or spec.height,
        width=width or spec.width,
        num_inference_steps=steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent",
        return_dict=False,
    )
    if spec.num_frames is not None:
        kwargs["num_frames"] = num_frames or spec.num_frames
    kwargs.update(runner_inputs(kind, pipe, seed=seed, guidance_scale=guidance_scale))
    result = pipe(**kwargs)
    output = result[0] if isinstance(result, tuple) else result
    output = None if output is None else output.detach().to("cpu")
    if torch.distributed.is_initialized():
        return share_output(output)
    return output


# --------------------------------------------------------------------------------------------
# Checkpoints for the runner's own model classes
# --------------------------------------------------------------------------------------------
def _tiny_text_components(text_dim: int):
    """A character-level T5 tokenizer and a one-layer UMT5 encoder of width ``text_dim``
    (seeded by the caller), enough for the Wan pipeline's ``encode_prompt``."""
    from transformers import UMT5Config, UMT5EncoderModel

    from .tiny_text import char_t5_tokenizer

    tokenizer = char_t5_tokenizer()
    encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=8,
            d_ff=2 * text_dim,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
        )  # fmt: skip
    )
    return tokenizer, encoder


def save_tiny_checkpoint(kind: str, directory: str | os.PathLike, *, seed: int = 0, **sizes):
    """Write a tiny random ``kind`` model as a complete diffusers checkpoint (transformer(s),
    scheduler, a tiny VAE, a character-level tokenizer and a one-layer UMT5 text encoder) that
    the runner's model class for ``kind`` loads with ``from_pretrained``, prompts included.
    Only the Wan kinds are wired to runner classes. Needs no xfuser import."""
    from diffusers import AutoencoderKLWan

    spec = _runner_kind(kind)
    if spec.runner_model is None:
        raise NotImplementedError(f"no runner model class is wired for {kind!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    names = ["transformer", "transformer_2"] if kind == "wan2.2" else ["transformer"]
    for i, name in enumerate(names):
        model = tiny_transformer(kind, seed=seed + i, xfuser=False, **sizes)
        model.save_pretrained(os.path.join(directory, name))
    text_dim = model.config.text_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        tokenizer, encoder = _tiny_text_components(text_dim)
        vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
    encoder.save_pretrained(os.path.join(directory, "text_encoder"))
    vae.save_pretrained(os.path.join(directory, "vae"))
    _scheduler(kind).save_pretrained(os.path.join(directory, "scheduler"))
    import diffusers

    index = {
        "_class_name": spec.pipeline,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    for name in names:
        index[name] = ["diffusers", spec.base]
    if kind == "wan2.2":
        index["boundary_ratio"] = 0.875
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return directory


def prepare_runner_cpu() -> None:
    """Let xfuser's runner models load on a CPU-only machine (tests only; idempotent).

    ``xFuserModel.initialize`` places the loaded pipeline with
    ``loading.placement.place_pipeline_components``, which moves it to ``cuda:<local rank>``
    and applies GPU GEMM quantization. Without CUDA the pipeline is left where it was loaded
    (the CPU); nothing is quantized. ``xFuserModel._run_timed_pipe`` (the torch.compile
    warm-up and timed runs) times with CUDA events; without CUDA it times with the host clock.
    Refuses to run where CUDA is available.
    """
    if torch.cuda.is_available():
        raise RuntimeError("prepare_runner_cpu() is for CPU-only machines")
    from xfuser.model_executor.models.runner_models import base_model
    from xfuser.model_executor.models.runner_models.loading import placement

    placement.place_pipeline_components = _place_on_cpu
    base_model.xFuserModel._run_timed_pipe = _run_timed_pipe_on_cpu


def _place_on_cpu(loader) -> None:
    """CPU replacement for xfuser's ``place_pipeline_components``: keep the pipeline as loaded."""


def _run_timed_pipe_on_cpu(self, input_args: dict):
    """CPU replacement for ``xFuserModel._run_timed_pipe``: the same run (replica barrier
    first), timed with ``time.perf_counter`` instead of CUDA events."""
    from xfuser.core.distributed import get_model_replica_group

    self.prepare_run(input_args)
    get_model_replica_group().barrier()
    start = time.perf_counter()
    out = self._run_pipe(input_args)
    return out, time.perf_counter() - start


def local_runner_model(kind: str, path: str | os.PathLike, **args: Any):
    """The runner's registered model class for ``kind`` (e.g. ``xFuserWan21T2VModel``) reading
    the diffusers checkpoint at ``path`` (real weights, or one from
    :func:`save_tiny_checkpoint`), built from runner arguments (``ulysses_degree=2``, ...) with
    xfuser's groups created for them, but not yet initialised (call
    ``model.initialize(model.preprocess_args(args))``). The model name it loads is redirected
    to ``path`` in the instance's own settings (nothing global changes)."""
    from xfuser import xFuserArgs
    from xfuser.model_executor.models.runner_models.base_model import MODEL_REGISTRY

    spec = _runner_kind(kind)
    if spec.runner_model is None:
        raise NotImplementedError(f"no runner model class is wired for {kind!r}")
    if not torch.cuda.is_available():
        prepare_runner_cpu()
    base = MODEL_REGISTRY[spec.runner_model]
    local = os.fspath(path)

    class _LocalCheckpoint(base):
        def _customize_settings(self, config):
            super()._customize_settings(config)
            self.settings.model_name = local

    _LocalCheckpoint.__name__ = base.__name__
    _LocalCheckpoint.__qualname__ = base.__qualname__
    config = xFuserArgs(model=spec.runner_model, **args)
    model = _LocalCheckpoint(config)
    # xfuser's groups for this configuration (the runner creates them from env:// on a fresh
    # process; here earlier configurations of the same ranks are torn down first).
    engine_config, _ = config.create_config()
    init_xfuser_distributed(engine_config)
    return model
