"""xfuser 0.7's model runner: plain diffusers pipelines around xfuser's transformer wrappers.

xfuser's runner (the ``xdit`` launcher, ``xFuserModelRunner``, ``MODEL_REGISTRY``) loads a plain
diffusers pipeline (``WanPipeline``, ``HunyuanVideoPipeline``, ``Flux2Pipeline``,
``QwenImagePipeline``, ...) whose transformer is one of xfuser's wrappers: its attention
processors call ``usp.USP``, which moves activations through the same two functions as the
legacy pipelines (``usp.ring_attn`` and ``usp._sdpa_all_to_all_single``, see :mod:`.xdit`).
This adapter accepts

* such a pipeline, once xfuser's groups and runtime state are initialised with a ring or
  Ulysses degree > 1 (``initialize_runtime_state(pipe, engine_config)``);
* an ``xFuserModel`` from the runner's registry after ``initialize``: its ``pipe`` (and a
  ``second_pipe`` where the model has one) is patched.

Every transformer of a pipeline is patched (Wan 2.2's ``transformer_2`` too); the layer names
of a second transformer are prefixed with its attribute name so that sites never collide.
Branch tracking (diffusers' ``cache_context("cond"/"uncond")``) gives each guidance branch its
own bases. What cannot be compressed correctly is refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import CompactConfig
from .state import STATE_ATTR, PipelineState
from .xdit import (
    check_xfuser_runtime,
    install,
    is_xdit_pipeline,
    unpatch_xdit,
    xfuser_modules,
)

# Pipeline attributes that hold a denoising transformer (Wan 2.2 has two experts).
TRANSFORMER_ATTRS = ("transformer", "transformer_2")
# xfuser attention backends whose work depends on per-step layouts compactfusion does not
# track (block masks computed from q/k, head permutations): refused rather than guessed.
_REFUSED_BACKEND_PREFIXES = ("AITER_SPARSE", "AITER_SPARGE", "AITER_VSA", "FLEX_BLOCK")
_REFUSED_BACKEND_SUFFIXES = ("_SPARGE", "_VSA_H3")


# --------------------------------------------------------------------------------------------
# Recognition (no xfuser import: a plain diffusers pipeline must be refused without it)
# --------------------------------------------------------------------------------------------
def _mro_has(obj: Any, name: str, module_prefix: str) -> bool:
    return any(
        c.__name__ == name and c.__module__.startswith(module_prefix) for c in type(obj).__mro__
    )


def is_runner_model(obj: Any) -> bool:
    """Whether ``obj`` is one of xfuser's runner models (``xFuserModel``)."""
    return _mro_has(obj, "xFuserModel", "xfuser")


def is_diffusers_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers pipeline (the runner's, or any other)."""
    return _mro_has(obj, "DiffusionPipeline", "diffusers")


def matches(obj: Any) -> bool:
    """The objects this adapter answers for (it refuses unsuitable pipelines itself)."""
    if is_xdit_pipeline(obj):  # the legacy xFuser*Pipeline wrappers have their own adapter
        return False
    return is_runner_model(obj) or is_diffusers_pipeline(obj)


def _is_xfuser_processor(module: torch.nn.Module) -> bool:
    processor = getattr(module, "processor", None)
    return processor is not None and type(processor).__module__.startswith("xfuser.")


def transformers_of(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """``[(attribute, transformer), ...]`` of ``pipe`` whose attention runs through xfuser's
    processors; ``TypeError`` saying what is missing otherwise."""
    found = []
    for attr in TRANSFORMER_ATTRS:
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            found.append((attr, module))
    kind = type(pipe).__name__
    if not found:
        raise TypeError(
            f"compactfusion cannot patch this plain diffusers pipeline ({kind}): it has no "
            "transformer (only DiT pipelines run sequence parallel in xfuser)"
        )
    for attr, module in found:
        if any(_is_compiled(m) for m in module.modules()):
            raise RuntimeError(
                f"{kind}.{attr} (or one of its blocks) is already torch.compile'd: patch the "
                "pipeline before compiling it (compactfusion-xdit does this for "
                "--use_torch_compile runs)"
            )
    usp_found = [(a, m) for a, m in found if any(_is_xfuser_processor(x) for x in m.modules())]
    if not usp_found:
        raise TypeError(
            f"compactfusion cannot patch this plain diffusers pipeline ({kind}): its "
            "transformer's attention does not go through xfuser's USP (no xfuser attention "
            "processor found). Build the transformer with xfuser's wrapper (e.g. "
            "xFuserWanTransformer3DWrapper, as xfuser's model runner does) or wrap the pipeline "
            "in xfuser (e.g. xFuserFluxPipeline) with ring_degree or ulysses_degree > 1, or "
            "enable diffusers' own context parallelism (pipe.transformer.enable_parallelism("
            "config=ContextParallelConfig(ring_degree=N)), which compactfusion patches too)."
        )
    return usp_found


def _is_compiled(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule"


def _check_runtime() -> tuple[int, int]:
    """xfuser's runtime state as the runner left it; refuses unsupported features."""
    xdist, _, _ = xfuser_modules()
    from xfuser.core.distributed import runtime_state

    ready = xdist.model_parallel_is_initialized() and runtime_state.runtime_state_is_initialized()
    if not ready:
        raise RuntimeError(
            "xfuser's runtime state is not initialised for this pipeline: call "
            "xfuser.core.distributed.initialize_runtime_state(pipe, engine_config) with a ring "
            "or Ulysses degree > 1 first (xfuser's model runner does this in "
            "xFuserModel.initialize)"
        )
    state = runtime_state.get_runtime_state()
    config = state.runtime_config
    if getattr(state, "fp8_comms", None) is not None:
        raise ValueError(
            "xfuser's use_fp8_comms (FP8 Ulysses all-to-all) is enabled: it already quantizes "
            "the traffic compactfusion would compress; disable one of them"
        )
    if getattr(config, "use_spargeattn_head_balance", False):
        raise NotImplementedError(
            "use_spargeattn_head_balance permutes the Ulysses heads from step to step, so a "
            "residual against the previous step's exchange would mix different heads; "
            "compactfusion refuses it"
        )
    backends = [state.attention_backend, getattr(state, "cross_attention_backend", None)]
    schedule = getattr(state, "attention_schedule", None)  # hybrid attention schedules
    backends += list(getattr(schedule, "backends", ()))
    for backend in backends:
        name = getattr(backend, "name", "")
        if name.startswith(_REFUSED_BACKEND_PREFIXES) or name.endswith(_REFUSED_BACKEND_SUFFIXES):
            raise NotImplementedError(
                f"attention backend {name}: sparse/block-sparse backends derive their block "
                "masks and extra Ulysses inputs from the exchanged activations; compactfusion "
                "has not been validated with them and refuses them (use a dense backend)"
            )
    return check_xfuser_runtime(config)


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------
def _attention_sites(attr: str, transformer: torch.nn.Module):
    """(layer name, module) of every xfuser attention module; names of a second transformer
    are prefixed with its attribute (``"transformer_2.blocks.0.attn1"``)."""
    prefix = "" if attr == TRANSFORMER_ATTRS[0] else f"{attr}."
    return [
        (f"{prefix}{name}", module)
        for name, module in transformer.named_modules()
        if _is_xfuser_processor(module)
    ]


def patch_runner_pipeline(pipe: Any, config: CompactConfig) -> PipelineState:
    """Patch one diffusers pipeline built around xfuser's transformer wrappers."""
    transformers = transformers_of(pipe)
    ring, ulysses = _check_runtime()
    state = PipelineState(
        config=config,
        original_class=type(pipe),
        ring_world=ring,
        ulysses_world=ulysses,
    )
    hooked = [(_attention_sites(attr, t), t) for attr, t in transformers]
    return install(pipe, state, hooked)


def unpatch_runner_pipeline(pipe: Any) -> None:
    """Undo :func:`patch_runner_pipeline`: hooks removed, class and xfuser functions restored."""
    unpatch_xdit(pipe)


# --------------------------------------------------------------------------------------------
# Runner models (xFuserModel after initialize)
# --------------------------------------------------------------------------------------------
RUNNER_PIPE_ATTRS = ("pipe", "second_pipe")


@dataclass
class RunnerModelState:
    """What compactfusion keeps on a patched ``xFuserModel``: the config and the patched
    pipelines (their own :class:`PipelineState` holds the bases)."""

    config: CompactConfig
    pipes: dict[str, Any] = field(default_factory=dict)  # attribute -> pipeline

    def pipeline_states(self) -> list[PipelineState]:
        """The :class:`PipelineState` of each patched pipeline, the main one first."""
        return [getattr(pipe, STATE_ATTR) for pipe in self.pipes.values()]

    def stats(self) -> dict[str, Any]:
        """The main pipeline's statistics; a second pipeline's under ``"second_pipe"``."""
        main = getattr(self.pipes["pipe"], STATE_ATTR).stats()
        for attr, pipe in self.pipes.items():
            if attr != "pipe":
                main[attr] = getattr(pipe, STATE_ATTR).stats()
        return main


def _runner_pipes(model: Any) -> dict[str, Any]:
    pipes = {}
    for attr in RUNNER_PIPE_ATTRS:
        pipe = getattr(model, attr, None)
        if pipe is not None and all(pipe is not p for p in pipes.values()):
            pipes[attr] = pipe
    if "pipe" not in pipes:
        raise RuntimeError(
            f"{type(model).__name__} has no pipeline yet: call its initialize(input_args) "
            "before compactfusion.patch (compactfusion-xdit patches at the right moment)"
        )
    return pipes


def patch_runner_model(model: Any, config: CompactConfig) -> RunnerModelState:
    """Patch the pipeline(s) of an initialised ``xFuserModel``."""
    if getattr(model.config, "use_fp8_comms", False):
        raise ValueError(
            "xfuser's use_fp8_comms (FP8 Ulysses all-to-all) is enabled: it already quantizes "
            "the traffic compactfusion would compress; disable one of them"
        )
    pipes = _runner_pipes(model)
    done: dict[str, Any] = {}
    try:
        for attr, pipe in pipes.items():
            patch_runner_pipeline(pipe, config)
            done[attr] = pipe
    except Exception:
        for pipe in done.values():
            unpatch_runner_pipeline(pipe)
        raise
    state = RunnerModelState(config=config, pipes=done)
    setattr(model, STATE_ATTR, state)
    return state


def unpatch_runner_model(model: Any) -> None:
    """Undo :func:`patch_runner_model`."""
    state: RunnerModelState = getattr(model, STATE_ATTR)
    for pipe in state.pipes.values():
        unpatch_runner_pipeline(pipe)
    delattr(model, STATE_ATTR)


def patch(obj: Any, config: CompactConfig):
    """Adapter entry point: a runner model or a runner pipeline."""
    if is_runner_model(obj):
        return patch_runner_model(obj, config)
    return patch_runner_pipeline(obj, config)


def unpatch(obj: Any) -> None:
    """Adapter entry point: undo :func:`patch`."""
    if is_runner_model(obj):
        unpatch_runner_model(obj)
    else:
        unpatch_runner_pipeline(obj)


# --------------------------------------------------------------------------------------------
# The runner's lifecycle
# --------------------------------------------------------------------------------------------
_SEAM = "_enable_options"  # called by xFuserModel.initialize after load and runtime state


def patch_when_initialized(model: Any, config: CompactConfig) -> None:
    """Patch ``model`` (an ``xFuserModel`` not initialised yet) at the right moment of
    ``model.initialize``: after its pipeline is loaded, placed and its runtime state
    initialised, before xfuser's FP8-communication set-up, torch.compile warm-up and step
    caching (``--cache_method``) are applied, so with ``use_torch_compile`` the runner compiles
    (and warms up) the patched transformers, the compressed exchanges being compactfusion's
    custom ops in the compiled graph. Refuses ``use_fp8_comms``.
    """
    if not is_runner_model(model):
        raise TypeError(f"expected one of xfuser's runner models, got {type(model).__name__}")
    if getattr(model, "pipe", None) is not None:
        raise RuntimeError("this model is already initialised: call compactfusion.patch(model)")
    runner_config = model.config
    if getattr(runner_config, "use_fp8_comms", False):
        raise ValueError(
            "xfuser's use_fp8_comms (FP8 Ulysses all-to-all) is enabled: it already quantizes "
            "the traffic compactfusion would compress; disable one of them"
        )
    original = getattr(model, _SEAM)

    def enable_options_then_patch(*args, **kwargs):
        result = original(*args, **kwargs)
        del model.__dict__[_SEAM]  # the instance attribute has done its work
        from ..api import patch as api_patch  # the public entry: idempotence, registry

        api_patch(model, config)
        return result

    setattr(model, _SEAM, enable_options_then_patch)
