"""diffusers adapter: compress the traffic of diffusers' own context parallelism.

Since 0.36 diffusers parallelises a transformer itself::

    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
    compactfusion.patch(pipe)            # every rank, same config
    pipe(...)                            # ring / Ulysses / unified traffic compressed

What is patched (all undone by ``unpatch``):

- ``diffusers.models.attention_dispatch``'s ``TemplatedRingAttention``,
  ``TemplatedUlyssesAttention`` and ``SeqAllToAllDim`` are replaced while any model is patched
  (reference counted) by subclasses that compress only the calls of a patched pipeline running
  in the current context, and during each of its generations by the pipeline's own subclasses
  (one compiled graph per patched pipeline under torch.compile; :mod:`.diffusers_attention`).
- Forward hooks on every attention module (the layer name, e.g. ``"transformer_blocks.0.attn"``,
  qualified by the guidance branch of ``cache_context("cond"/"uncond")``) and on each
  transformer (one call is one step).
- A pipeline's class is swapped for a subclass whose ``__call__`` is one generation.

Pipelines: every component of a ``DiffusionPipeline`` that has context parallelism enabled is
patched (Wan 2.2's ``transformer`` and ``transformer_2`` alike; layer names are then prefixed
with the component name). A transformer can be patched on its own for a hand-written denoising
loop; mark each generation with ``with compactfusion.generation(transformer): ...`` (calling it
outside one raises).
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any

import torch

from ..config import CompactConfig
from . import tracking
from .diffusers_attention import REPLACED, DiffusersState, Swap, dispatch_module
from .generation import patched_call_class
from .state import STATE_ATTR

logger = logging.getLogger(__name__)

SUPPORTED_DIFFUSERS = ("0.42.1",)
_OWNER_ATTR = "_compactfusion_owner"  # on a transformer patched through its pipeline


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------
def _from_diffusers(obj: Any) -> bool:
    return any(c.__module__.split(".")[0] == "diffusers" for c in type(obj).__mro__)


def context_parallel_config(module: Any):
    """The ``ContextParallelConfig`` of a diffusers model with context parallelism enabled,
    else None."""
    parallel = getattr(module, "_parallel_config", None)
    return getattr(parallel, "context_parallel_config", None)


def cp_transformers(obj: Any) -> list[tuple[str, torch.nn.Module]]:
    """``[(component name, model)]`` of the models with context parallelism in ``obj`` (a
    pipeline, or ``[("", obj)]`` for such a model itself)."""
    if isinstance(obj, torch.nn.Module):
        return [("", obj)] if context_parallel_config(obj) is not None else []
    components = getattr(obj, "components", None)
    if not isinstance(components, dict):
        return []
    return [
        (name, m)
        for name, m in components.items()
        if isinstance(m, torch.nn.Module) and context_parallel_config(m) is not None
    ]


def is_diffusers_cp(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers pipeline or model with context parallelism enabled."""
    return _from_diffusers(obj) and bool(cp_transformers(obj))


def _check_supported() -> None:
    version = importlib.metadata.version("diffusers")
    if version not in SUPPORTED_DIFFUSERS:
        raise RuntimeError(
            f"compactfusion supports diffusers {', '.join(SUPPORTED_DIFFUSERS)} for its context "
            f"parallelism, found {version}"
        )
    module = dispatch_module()
    missing = [name for name in REPLACED if not isinstance(getattr(module, name, None), type)]
    if missing:
        raise RuntimeError(f"diffusers.models.attention_dispatch lacks {missing}")


def _attention_modules(transformer: torch.nn.Module, prefix: str):
    found = [
        (prefix + name, m)
        for name, m in transformer.named_modules()
        if hasattr(getattr(m, "processor", None), "_parallel_config")
    ]
    if not found:
        raise ValueError(
            f"no attention modules with a context-parallel processor found in "
            f"{type(transformer).__name__}"
        )
    return found


def _layout(targets) -> tuple[int, int]:
    degrees = {
        (c.ring_degree, c.ulysses_degree) for c in (context_parallel_config(m) for _, m in targets)
    }
    if len(degrees) > 1:
        raise NotImplementedError(
            f"the patched transformers use different context-parallel degrees {sorted(degrees)}"
        )
    return degrees.pop()


def _log_uncompressed_modes(state: DiffusersState, targets) -> None:
    for name, m in targets:
        cp = context_parallel_config(m)
        for flag in ("ring_anything", "ulysses_anything"):
            if getattr(cp, flag, False):
                logger.warning(
                    "compactfusion: %s uses diffusers' %s mode (uneven splits); its traffic is "
                    "sent uncompressed",
                    name or type(m).__name__,
                    flag,
                )
    if state.config.mode != "allgather" and state.ring_world == 1:
        logger.warning(
            "compactfusion: mode=%r has no effect without ring attention (Ulysses all-to-alls "
            "are compressed as they are)",
            state.config.mode,
        )


# --------------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------------
def patch_diffusers(obj: Any, config: CompactConfig) -> DiffusersState:
    """Patch one diffusers pipeline or model instance (see the module docstring)."""
    _check_supported()
    targets = cp_transformers(obj)
    is_model = isinstance(obj, torch.nn.Module)
    for name, m in targets:
        if getattr(m, _OWNER_ATTR, None) is not None or (m is not obj and hasattr(m, STATE_ATTR)):
            raise ValueError(
                f"{name or type(m).__name__} is already patched by compactfusion (through its "
                "pipeline or on its own); unpatch it first"
            )
    ring, ulysses = _layout(targets)
    cps = tuple(context_parallel_config(m) for _, m in targets)
    state = DiffusersState(
        config=config,
        original_class=None if is_model else type(obj),
        ring_world=ring,
        ulysses_world=ulysses,
        cp_configs=cps,
        ulysses_groups=tuple(c._ulysses_mesh.get_group() for c in cps) if ulysses > 1 else (),
    )
    _log_uncompressed_modes(state, targets)
    try:
        for name, m in targets:
            prefix = f"{name}." if len(targets) > 1 else ""
            tracking.install_layer_hooks(state, _attention_modules(m, prefix))
            tracking.install_step_hooks(state, m)
            tracking.install_branch_tracking(state, m)
            if is_model:
                _install_generation_guard(state, m)
            else:
                setattr(m, _OWNER_ATTR, True)
                state.hooks.append(tracking.AttributeRemoval(m, _OWNER_ATTR))
        Swap.acquire()
    except Exception:
        tracking.remove_hooks(state)
        raise
    classes = Swap.bound_classes(state)
    state.bind = lambda: Swap.bound(classes)
    if not is_model:
        obj.__class__ = patched_call_class(type(obj))
    setattr(obj, STATE_ATTR, state)
    return state


def unpatch_diffusers(obj: Any) -> None:
    """Undo :func:`patch_diffusers`: hooks removed, class and diffusers' classes restored."""
    state: DiffusersState = getattr(obj, STATE_ATTR)
    tracking.remove_hooks(state)
    state.new_generation()  # waits for any outstanding asynchronous gathers
    if state.original_class is not None:
        obj.__class__ = state.original_class
    delattr(obj, STATE_ATTR)
    Swap.release()


def _install_generation_guard(state: DiffusersState, model: torch.nn.Module) -> None:
    """A patched model called outside ``compactfusion.generation(model)`` raises: without
    generation boundaries its bases would carry residuals across generations."""

    def guard(module, args):
        if tracking.active_state() is not state:
            raise RuntimeError(
                f"this {type(module).__name__} is patched by compactfusion: call it inside "
                "`with compactfusion.generation(model):` (one block per generation), or patch "
                "the pipeline instead of the model"
            )

    state.hooks.append(model.register_forward_pre_hook(guard))
