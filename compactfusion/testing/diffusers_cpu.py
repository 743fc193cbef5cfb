"""Make diffusers' own context parallelism (``enable_parallelism``) run on a CPU with gloo
(tests only).

diffusers >= 0.36 parallelises a transformer itself with
``transformer.enable_parallelism(config=ContextParallelConfig(ring_degree=... |
ulysses_degree=...))``. Two things stop it on a machine without an accelerator;
:func:`prepare_diffusers_cpu` fixes both, so that the real ring, Ulysses and unified code paths
of ``diffusers.models.attention_dispatch`` run between CPU processes and can be tested in CI
without GPUs. It refuses to run where CUDA is available: there nothing here is needed, and
patching would only hide real problems.

Checked with torch 2.13.0+cpu and diffusers 0.42.1.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

__all__ = ["prepare_diffusers_cpu"]

# Marks the functions installed below, so that applying the fixes twice is a no-op.
_MARK = "_compactfusion_cpu"


def prepare_diffusers_cpu() -> None:
    """Apply the CPU/gloo fixes to diffusers' context parallelism. Idempotent.

    Call it in every process (spawned ranks included) before ``enable_parallelism``. Unlike
    :func:`~compactfusion.testing.prepare_xfuser_cpu` it may run after diffusers was imported:
    both fixes replace attributes that diffusers looks up at call time.

    The fixes, and why each is needed:

    1. **No accelerator in ``enable_parallelism``.** ``ModelMixin._resolve_parallel_config``
       (run by ``enable_parallelism`` and by ``from_pretrained(..., parallel_config=...)``)
       computes the rank's device as ``rank % torch.accelerator.device_count()``, which is
       ``ZeroDivisionError`` when there is no accelerator (the count is 0). The device is only
       recorded on the config (``cpu:0`` for every rank here), so ``device_count`` pretends one
       device *during that call only*; everywhere else it is torch's own.
    2. **No CPU attention op that returns the log-sum-exp.** Ring attention (and the ring half
       of the unified mode) merges per-block outputs by their LSE, so the backend's forward op
       is called with ``return_lse=True``. The default ``native`` backend refuses that, and the
       ``_native_flash`` backend calls the CUDA-only ``aten._scaled_dot_product_flash_attention``.
       torch's CPU kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` returns
       ``(out, lse)`` with the same layouts, so ``attention_dispatch._native_flash_attention_
       forward_op`` (a module global that ``_native_flash_attention`` reads at every call) is
       wrapped to use it for CPU tensors; tensors on any other device go to the original.
       Select that backend before enabling parallelism:
       ``transformer.set_attention_backend("_native_flash")``. Ulysses alone works with the
       default ``native`` backend (it needs no LSE).

    Only the forward pass is covered (inference): the backward op of ``_native_flash`` still
    expects the CUDA kernel's saved tensors.

    Raises:
        RuntimeError: if CUDA is available.
        ImportError: if diffusers is not installed.
    """
    if torch.cuda.is_available():
        raise RuntimeError(
            "prepare_diffusers_cpu() is for CPU-only machines: CUDA is available here, so "
            "diffusers' context parallelism runs unpatched."
        )
    try:
        from diffusers.models import attention_dispatch
        from diffusers.models.modeling_utils import ModelMixin
    except ImportError as exc:
        raise ImportError(
            "prepare_diffusers_cpu() needs diffusers (pip install 'compactfusion[xdit]'); "
            f"importing it failed: {exc}"
        ) from exc

    # Fix 1: one pretend device while the parallel config is resolved.
    resolve = ModelMixin._resolve_parallel_config
    if not getattr(resolve, _MARK, False):

        @functools.wraps(resolve)
        def _resolve_parallel_config(self, config):
            with _one_device_if_none():
                return resolve(self, config)

        setattr(_resolve_parallel_config, _MARK, True)
        ModelMixin._resolve_parallel_config = _resolve_parallel_config

    # Fix 2: an LSE-returning CPU kernel behind the _native_flash backend.
    forward_op = attention_dispatch._native_flash_attention_forward_op
    if not getattr(forward_op, _MARK, False):
        attention_dispatch._native_flash_attention_forward_op = _cpu_flash_forward_op(forward_op)


@contextlib.contextmanager
def _one_device_if_none() -> Iterator[None]:
    """``torch.accelerator.device_count()`` returns 1 instead of 0 inside the block."""
    original = torch.accelerator.device_count

    def device_count() -> int:
        return original() or 1

    torch.accelerator.device_count = device_count
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def _cpu_flash_forward_op(original):
    """Wrap diffusers' ``_native_flash_attention_forward_op`` so that CPU tensors use
    ``aten._scaled_dot_product_flash_attention_for_cpu``.

    Same contract as the original: ``query``/``key``/``value`` in diffusers' layout
    ``[B, S, H, D]``; returns ``out`` ``[B, S_q, H, D]`` and, with ``return_lse``, also the
    natural-log LSE ``[B, S_q, H]`` in float32. ``attn_mask`` is honoured (the CPU kernel
    accepts one); GQA is refused like the original.
    """

    @functools.wraps(original)
    def forward_op(
        ctx,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        _save_ctx=True,
        _parallel_config=None,
    ):
        if query.device.type != "cpu":
            return original(
                ctx,
                query,
                key,
                value,
                attn_mask,
                dropout_p,
                is_causal,
                scale,
                enable_gqa,
                return_lse,
                _save_ctx=_save_ctx,
                _parallel_config=_parallel_config,
            )
        if enable_gqa:
            raise ValueError("`enable_gqa` is not supported by the CPU flash attention op")
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, bool(is_causal), attn_mask=attn_mask, scale=scale
        )
        out = out.transpose(1, 2)
        return (out, lse.transpose(1, 2)) if return_lse else out

    setattr(forward_op, _MARK, True)
    return forward_op
