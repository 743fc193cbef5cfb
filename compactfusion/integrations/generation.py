"""Generation boundaries, shared by the framework adapters.

A *generation* is one run of the denoising loop: bases, buffers and per-step statistics start
afresh with it, and compression is active only while it runs. A patched pipeline marks its own
generations (its class is swapped for one whose ``__call__`` runs :func:`generation_of`);
users who run their own denoising loop around a patched transformer mark them with
``compactfusion.generation(transformer)``, which runs the same function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import tracking
from .state import STATE_ATTR, PipelineState


@contextlib.contextmanager
def generation_of(state: PipelineState) -> Iterator[PipelineState]:
    """Start a generation of ``state``'s pipeline (configs checked across ranks once, bases
    forgotten) and mark it as running in this context until the block ends, with the
    adapter's own replacements (``state.bind``) installed meanwhile. With
    ``CompactConfig(verify=True)`` the bases are compared across ranks when the block ends
    normally (``BaseDivergenceError`` on every rank if any differ).

    The calling thread holds the pipeline's compressor for the whole generation: a generation
    started from another thread meanwhile raises ``ConcurrentUseError`` before it changes
    anything (one generation at a time per pipeline; the next may run in any thread)."""
    with state.compressor.held():
        state.ensure_checked()
        state.new_generation()
        bound = state.bind() if state.bind is not None else contextlib.nullcontext()
        with tracking.running(state), bound:
            yield state
        if state.config.verify:  # every rank compares its bases; raises on all of them
            from ..verify import check_state

            check_state(state)


def patched_call_class(cls: type) -> type:
    """A subclass of the pipeline class ``cls`` whose ``__call__`` is one generation of the
    state attached to the instance (``STATE_ATTR``). Assigned to ``pipe.__class__`` by an
    adapter, and undone by assigning the original class back."""

    def __call__(self, *args, **kwargs):
        with generation_of(getattr(self, STATE_ATTR)):
            return cls.__call__(self, *args, **kwargs)

    namespace = {"__call__": __call__, "__module__": cls.__module__, "__doc__": cls.__doc__}
    return type(cls)(cls.__name__, (cls,), namespace)
