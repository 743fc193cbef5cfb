"""Which patched pipeline is running in this context, and which attention layer inside it.

Framework functions that compactfusion replaces (xfuser's ``ring_attn``, ...) are shared by
every pipeline in the process, so the replacements ask :func:`active_state` whether a patched
pipeline is running here (a ``ContextVar``, set for the duration of the pipeline call) and
:func:`current_layer` which attention module called them (``PipelineState.layer``, set by
forward pre-hooks on the attention modules). Step boundaries come from forward hooks on the
transformer.

torch.compile: dynamo cannot read a ``ContextVar``, and Python side effects of traced code
(attribute stores) are applied after the compiled graph runs, so nothing here may be decided
inside the compiled graph at run time. The layer pre-hooks, which dynamo traces along with the
transformer, therefore store plain attributes on the state (the layer name and the per-layer
exchange counter), which become constants of the compiled graph (``compactfusion.ops`` takes
them as string arguments); the adapter hands the traced code its pipeline's state directly
(xdit's ``_Bound``), so :func:`active_state` is only used in eager mode. The transformer's step
hooks are excluded from compilation (``torch.compiler.disable``): with
``torch.compile(transformer)`` they run before and after the compiled forward, as in eager
mode.

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


def active_state() -> PipelineState | None:
    """The state of the patched pipeline running in this context (None outside any). Eager
    mode only: torch.compile cannot trace a ``ContextVar`` read."""
    return _ACTIVE.get()


def current_layer(state: PipelineState | None = None, default: str = "attn") -> str:
    """The name of the attention module running now (``default`` outside one), qualified by
    ``state``'s running branch when it has one."""
    if state is None or state.layer is None:
        return default
    if state.branch is not None:
        return f"{state.layer}@{state.branch}"
    return state.layer


@contextlib.contextmanager
def running(state: PipelineState) -> Iterator[None]:
    """Mark ``state``'s pipeline as running in this context (reset in ``finally``)."""
    token = _ACTIVE.set(state)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def attributes_set(obj, values: dict) -> Iterator[None]:
    """Set ``obj``'s attributes to ``values`` for the block (the adapters install a pipeline's
    own replacements of module-level framework functions this way); the previous values come
    back when it ends."""
    saved = {name: getattr(obj, name) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def install_layer_hooks(
    state: PipelineState, modules: Iterable[tuple[str, torch.nn.Module]]
) -> None:
    """Forward hooks that name the running attention layer (appended to ``state.hooks``).

    While compiling, the hooks always record (the compiled graph is specialised to the
    patched pipeline); in eager mode only while ``state``'s pipeline is running here."""
    name_prefix = "_orig_mod."  # torch.compile(module) names submodules under _orig_mod

    def pre_hook(name):
        name = name.removeprefix(name_prefix)

        def hook(module, args):
            if not torch.compiler.is_compiling() and _ACTIVE.get() is not state:
                return
            state.layer = name
            state.layer_exchanges = 0

        return hook

    def post_hook(module, args, output):
        if not torch.compiler.is_compiling() and _ACTIVE.get() is not state:
            return
        state.layer = None

    for name, module in modules:
        state.hooks.append(module.register_forward_pre_hook(pre_hook(name)))
        state.hooks.append(module.register_forward_hook(post_hook))


def install_step_hooks(state: PipelineState, transformer: torch.nn.Module) -> None:
    """Forward hooks on the transformer: one call is one denoising step (never compiled)."""

    @torch.compiler.disable
    def step_begin(module, args):
        if _ACTIVE.get() is state:
            state.begin_step()

    @torch.compiler.disable
    def step_end(module, args, output):
        if _ACTIVE.get() is state:
            state.end_step()

    state.hooks.append(transformer.register_forward_pre_hook(step_begin))
    state.hooks.append(transformer.register_forward_hook(step_end))


class AttributeRemoval:
    """A hook-like handle whose ``remove()`` deletes an instance attribute an adapter set
    (kept in ``PipelineState.hooks`` with the real hook handles)."""

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
    state.hooks.append(AttributeRemoval(transformer, "cache_context"))


def remove_hooks(state: PipelineState) -> None:
    for h in state.hooks:
        h.remove()
    state.hooks.clear()
