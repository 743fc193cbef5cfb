"""Choosing between the fused Triton kernels and the torch reference codecs."""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV_VAR = "COMPACTFUSION_BACKEND"
_CHOICES = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Whether ``compactfusion.kernels`` (and so Triton) can be imported."""
    return kernels_import_error() is None


@functools.cache
def kernels_import_error() -> str | None:
    """Why ``compactfusion.kernels`` cannot be imported (None when it can)."""
    try:
        import compactfusion.kernels  # noqa: F401
    except Exception as exc:  # ImportError, or Triton failing to initialise without a driver
        return f"{type(exc).__name__}: {exc}"
    return None


@functools.cache
def _warn_slow_path_on_gpu() -> None:
    """Said once per process: CUDA tensors going through the torch codecs is a large slowdown
    that a user would otherwise not notice (a checkout run without installing, say)."""
    logger.warning(
        "compactfusion: CUDA is available but the fused kernels (compactfusion.kernels) cannot "
        "be imported (%s); the much slower torch codecs are used. Install the package (pip "
        "install -e .) with a working Triton, or set COMPACTFUSION_BACKEND=torch to silence "
        "this.",
        kernels_import_error(),
    )


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend(configured: str) -> str:
    """The backend asked for: ``COMPACTFUSION_BACKEND`` when set (validated), else the config
    field. Part of the cross-rank check, so one rank's environment cannot differ silently."""
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in _CHOICES:
            raise ValueError(f"{ENV_VAR} must be one of {_CHOICES}, got {env!r}")
        return env
    return configured


def resolve_backend(requested: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``COMPACTFUSION_BACKEND`` (``auto``/``torch``/``triton``) overrides the config field.
    ``auto`` picks Triton for CUDA tensors when the kernels import, torch otherwise. Forcing
    ``triton`` for CPU tensors is only possible under ``TRITON_INTERPRET=1``.
    """
    requested = requested_backend(requested)
    if requested == "torch":
        return "torch"
    on_gpu = device.type == "cuda"
    if requested == "auto":
        if on_gpu and not triton_available():
            _warn_slow_path_on_gpu()
        return "triton" if on_gpu and triton_available() else "torch"
    if requested != "triton":
        raise ValueError(f"backend must be one of {_CHOICES}, got {requested!r}")
    if not triton_available():
        raise RuntimeError("backend='triton' was requested but compactfusion.kernels can't import")
    if not on_gpu and not interpreter_enabled():
        raise RuntimeError(
            "backend='triton' for CPU tensors needs TRITON_INTERPRET=1 (the Triton interpreter)"
        )
    return "triton"
