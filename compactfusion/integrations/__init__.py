"""Framework adapters. Each registers how to recognise, patch and unpatch its pipelines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Adapter:
    """How compactfusion patches one family of pipelines."""

    name: str
    matches: Callable[[Any], bool]
    patch: Callable[[Any, Any], Any]  # (pipe, config) -> state
    unpatch: Callable[[Any], None]


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> Adapter:
    """Register an adapter (later registrations are tried first)."""
    _ADAPTERS.insert(0, adapter)
    return adapter


def find_adapter(pipe: Any) -> Adapter:
    """The adapter for ``pipe``; ``TypeError`` saying what is supported otherwise."""
    for adapter in _ADAPTERS:
        if adapter.matches(pipe):
            return adapter
    kind = type(pipe).__name__
    hint = ""
    if any(c.__module__.startswith("diffusers") for c in type(pipe).__mro__):
        hint = (
            " It is a plain diffusers pipeline (or model) without context parallelism. Either "
            "enable diffusers' own: pipe.transformer.enable_parallelism(config="
            "ContextParallelConfig(ring_degree=N)) (or ulysses_degree=N), or wrap it in xfuser "
            "(e.g. xFuserFluxPipeline.from_pretrained(..., engine_config=...)) with "
            "ring_degree or ulysses_degree > 1."
        )
    supported = ", ".join(a.name for a in _ADAPTERS)
    raise TypeError(f"compactfusion cannot patch a {kind}; supported: {supported}.{hint}")


def _register_builtin() -> None:
    from . import diffusers, xdit, xdit_runner

    register_adapter(
        Adapter(
            name="xfuser (xDiT) pipelines",
            matches=xdit.is_xdit_pipeline,
            patch=xdit.patch_xdit,
            unpatch=xdit.unpatch_xdit,
        )
    )
    register_adapter(
        Adapter(
            name="xfuser model runner (xFuserModel, or a diffusers pipeline around xfuser's "
            "transformer wrappers)",
            matches=xdit_runner.matches,
            patch=xdit_runner.patch,
            unpatch=xdit_runner.unpatch,
        )
    )
    # Tried first (later registrations are): the runner adapter answers for every other
    # diffusers pipeline and refuses those whose attention does not go through xfuser.
    register_adapter(
        Adapter(
            name="diffusers pipelines and models with context parallelism (enable_parallelism)",
            matches=diffusers.is_diffusers_cp,
            patch=diffusers.patch_diffusers,
            unpatch=diffusers.unpatch_diffusers,
        )
    )


_register_builtin()
