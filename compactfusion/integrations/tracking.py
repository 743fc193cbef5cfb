"""Which patched pipeline is running in this context, and which attention layer inside it.

Framework functions that compactfusion replaces (xfuser's ``ring_attn``, ...) are shared by
every pipeline in the process, so the replacements ask :func:`active_state` whether a patched
pipeline is running here (a ``ContextVar``, set for the duration of the pipeline call) and
:func:`current_layer` which attention module called them (set by forward hooks). Step
boundaries come from forward hooks on the transformer.

Pipelines that call the transformer twice per step (the conditional and the unconditional
branch of classifier-free guidance, inside diffusers' ``transformer.cache_context("cond")`` /
``("uncond")``) must keep separate bases per branch: a residual across branches is as large
as the activation. :func:`install_branch_tracking` records the running branch and
:func:`current_layer` appends it to the layer name (``"blocks.0.attn1@uncond"``), so every
site of a branch is its own site.
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


def current_layer(state: PipelineState | None = None, default: str = "attn") -> str:
    """The name of the attention module running now (``default`` outside one), qualified by
    ``state``'s running branch when it has one."""
    name = _LAYER.get() or default
    if state is not None and state.branch is not None:
        return f"{name}@{state.branch}"
    return name


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
                state.a2a_index[current_layer(state)] = 0

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


class _AttributeRestore:
    """A hook-like handle whose ``remove()`` deletes an instance attribute we set."""

    def __init__(self, obj, name: str):
        self.obj, self.name = obj, name

    def remove(self) -> None:
        if self.name in vars(self.obj):
            delattr(self.obj, self.name)


def install_branch_tracking(state: PipelineState, transformer: torch.nn.Module) -> None:
    """Record the branch name of diffusers' ``transformer.cache_context(name)`` in
    ``state.branch`` while it is entered (an instance attribute wrapping the model's method,
    removed with the other hooks). Models without ``cache_context`` have no branches."""
    original = getattr(transformer, "cache_context", None)
    if original is None or "cache_context" in vars(transformer):
        return

    @contextlib.contextmanager
    def cache_context(name, *args, **kwargs):
        previous = state.branch
        state.branch = str(name)
        try:
            with original(name, *args, **kwargs):
                yield
        finally:
            state.branch = previous

    transformer.cache_context = cache_context
    state.hooks.append(_AttributeRestore(transformer, "cache_context"))


def remove_hooks(state: PipelineState) -> None:
    for h in state.hooks:
        h.remove()
    state.hooks.clear()
