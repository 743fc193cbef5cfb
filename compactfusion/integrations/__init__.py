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
    supported = ", ".join(a.name for a in _ADAPTERS)
    raise TypeError(f"compactfusion cannot patch a {kind}; supported: {supported}")


def _register_builtin() -> None:
    from . import xdit, xdit_runner

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


_register_builtin()
