"""Public API: ``patch``, ``unpatch``, ``is_patched``, ``stats``, ``patched`` and
``generation``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .config import CompactConfig, preset_name
from .integrations import find_adapter
from .integrations.generation import generation_of
from .integrations.state import STATE_ATTR


def _as_config(config: CompactConfig | str | None) -> CompactConfig:
    if config is None:
        return CompactConfig.preset("int2")
    if isinstance(config, str):
        return CompactConfig.preset(config)
    if not isinstance(config, CompactConfig):
        raise TypeError(
            f"config must be a CompactConfig, a preset name or None, got {type(config).__name__}"
        )
    return config


def patch(pipe: Any, config: CompactConfig | str | None = None) -> Any:
    """Compress the activations ``pipe``'s ranks exchange; returns ``pipe``.

    ``pipe`` is an xfuser (xDiT) pipeline, or a diffusers pipeline whose transformer has
    diffusers' own context parallelism enabled (``enable_parallelism``), or such a diffusers
    transformer itself (then mark each generation with :func:`generation`).

    ``config`` is a :class:`CompactConfig`, a preset name (a codec's name: ``"int2"``,
    ``"int1"``, ``"fp8"``, ``"lowrank"``, ``"nm_sparse"``, ``"raw"``; see
    :meth:`CompactConfig.preset`) or None for the ``int2`` preset. Patching is per pipeline
    instance. Patching again with an equal config does nothing; with a different one it raises
    ``ValueError`` (``unpatch`` first). Call it on every rank with the same config.
    """
    if isinstance(config, str):
        config = preset_name(config)  # a deprecated alias warns here, pointing at the caller
    config = _as_config(config)
    state = getattr(pipe, STATE_ATTR, None)
    if state is not None:
        if state.config == config:
            return pipe
        raise ValueError(
            "this pipeline is already patched with a different CompactConfig; call "
            "compactfusion.unpatch(pipe) first"
        )
    find_adapter(pipe).patch(pipe, config)
    return pipe


def unpatch(pipe: Any) -> Any:
    """Restore ``pipe`` exactly as it was before ``patch``; returns ``pipe``."""
    if getattr(pipe, STATE_ATTR, None) is None:
        raise ValueError("this pipeline is not patched by compactfusion")
    find_adapter(pipe).unpatch(pipe)
    return pipe


def is_patched(pipe: Any) -> bool:
    """Whether ``pipe`` is currently patched."""
    return getattr(pipe, STATE_ATTR, None) is not None


def stats(pipe: Any) -> dict[str, Any]:
    """This rank's statistics for the latest generation of a patched pipeline (plain dict):
    bytes sent per step, raw bytes they replace, ratio, seconds per step, per-site detail, and
    base memory (``base_bytes``, ``peak_base_bytes``, ``held_bytes``, ``raw_by_budget``; see
    ``compactfusion.memory``)."""
    state = getattr(pipe, STATE_ATTR, None)
    if state is None:
        raise ValueError("this pipeline is not patched by compactfusion")
    return state.stats()


@contextlib.contextmanager
def patched(pipe: Any, config: CompactConfig | str | None = None) -> Iterator[Any]:
    """``with compactfusion.patched(pipe, "int1"): pipe(...)`` — unpatched again on exit."""
    if isinstance(config, str):  # frames: this generator, contextlib's __enter__, the caller
        config = preset_name(config, stacklevel=3)
    patch(pipe, config)
    try:
        yield pipe
    finally:
        unpatch(pipe)


@contextlib.contextmanager
def generation(model: Any) -> Iterator[Any]:
    """One generation of a patched model that you call from your own denoising loop::

        compactfusion.patch(transformer)          # diffusers model with enable_parallelism
        with compactfusion.generation(transformer):
            for t in timesteps:
                noise = transformer(latents, timestep=t, ...)

    On entry the configs are checked across ranks (first time only) and the bases of the
    previous generation are forgotten; compression is active inside the block. Every rank
    must enter it. A patched pipeline marks its generations itself (each call is one).
    """
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not patched by compactfusion")
    with generation_of(state):
        yield model
