"""Which patched pipeline is running in this context, and which attention layer inside it.

Framework functions that compactfusion replaces (xfuser's ``ring_attn``, ...) are shared by
every pipeline in the process, so the replacements ask :func:`active_state` whether a patched
pipeline is running here (a ``ContextVar``, set for the duration of the pipeline call) and
:func:`current_layer` which attention module called them (set by forward hooks). Step
boundaries come from forward hooks on the transformer.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator

import torch

from .state import PipelineState

_ACTIVE: contextvars.ContextVar[PipelineState | None] = contextvars.ContextVar(
    "compactfusion_active_pipeline", default=None
)
_LAYER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "compactfusion_layer", default=None
)


def active_state() -> PipelineState | None:
    """The state of the patched pipeline running in this context (None outside any)."""
    return _ACTIVE.get()


def current_layer(default: str = "attn") -> str:
    """The name of the attention module running now (``default`` outside one)."""
    return _LAYER.get() or default


@contextlib.contextmanager
def running(state: PipelineState) -> Iterator[None]:
    """Mark ``state``'s pipeline as running in this context (reset in ``finally``)."""
    token = _ACTIVE.set(state)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def install_layer_hooks(
    state: PipelineState, modules: Iterable[tuple[str, torch.nn.Module]]
) -> None:
    """Forward hooks that name the running attention layer (appended to ``state.hooks``)."""
    tokens: list[contextvars.Token] = []

    def pre_hook(name):
        def hook(module, args):
            if _ACTIVE.get() is state:
                tokens.append(_LAYER.set(name))
                state.a2a_index[name] = 0

        return hook

    def post_hook(module, args, output):
        if _ACTIVE.get() is state and tokens:
            _LAYER.reset(tokens.pop())

    for name, module in modules:
        state.hooks.append(module.register_forward_pre_hook(pre_hook(name)))
        state.hooks.append(module.register_forward_hook(post_hook))


def install_step_hooks(state: PipelineState, transformer: torch.nn.Module) -> None:
    """Forward hooks on the transformer: one call is one denoising step."""

    def step_begin(module, args):
        if _ACTIVE.get() is state:
            state.begin_step()

    def step_end(module, args, output):
        if _ACTIVE.get() is state:
            state.end_step()

    state.hooks.append(transformer.register_forward_pre_hook(step_begin))
    state.hooks.append(transformer.register_forward_hook(step_end))


def remove_hooks(state: PipelineState) -> None:
    for h in state.hooks:
        h.remove()
    state.hooks.clear()
