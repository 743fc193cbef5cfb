"""Make xfuser 0.7.0 importable and runnable on a CPU-only machine with gloo (tests only).

xfuser assumes an accelerator from the moment it is imported. :func:`prepare_xfuser_cpu` applies
the minimum set of fixes that lets its real code paths (ring attention, Ulysses all-to-alls,
CFG-parallel all-gathers) run between CPU processes, so that multi-rank behaviour can be tested
in CI without GPUs. It must be called before anything imports ``xfuser``; it refuses to run
where CUDA is available, because on a GPU machine none of this is needed and patching would
only hide real problems.

Checked with torch 2.13.0+cpu, xfuser 0.7.0, yunchang 0.6.4, distvae 0.1.0, diffusers 0.42.1.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import torch

__all__ = ["prepare_xfuser_cpu"]

# The only module-level state: whether the fixes below are in place in this process.
_APPLIED = False


def prepare_xfuser_cpu() -> None:
    """Apply the CPU/gloo fixes to xfuser and import it. Idempotent; call before ``import xfuser``.

    The fixes, and why each is needed:

    1. **No "No Accelerators" error on import.** ``xfuser.config.config`` reads
       ``envs.CUDA_VERSION`` at import time, which calls ``envs.get_device_version()``, which
       raises on a machine with no GPU; ``init_distributed_environment`` and
       ``initialize_model_parallel`` likewise default to ``envs.get_torch_distributed_backend()``,
       which raises too. ``xfuser.envs`` is therefore loaded on its own (without running the
       package ``__init__``, which imports everything), and these two functions are replaced by
       ones returning ``None`` (no device version) and ``"gloo"``.
    2. **yunchang is reported missing.** ``PACKAGES_CHECKER.check_long_ctx_attn`` returns False
       without CUDA even when yunchang is installed; xfuser then refuses any ring/Ulysses degree
       > 1 and builds sequence-parallel groups without ring/Ulysses subgroups. The flag
       ``packages_info["has_long_ctx_attn"]`` is set to True (after checking that yunchang really
       imports) before any xfuser module copies it into its own ``HAS_LONG_CTX_ATTN`` constant.
    3. **``usp.PROCESS_GROUP`` stays None.** ``xfuser.model_executor.layers.usp`` binds
       ``PROCESS_GROUP`` to yunchang's process-group singleton only when CUDA (or an NPU) is
       available; otherwise ring attention and the Ulysses all-to-alls would dereference None.
       It is set to ``yunchang.globals.PROCESS_GROUP``, the object that xfuser's
       ``initialize_model_parallel`` fills with ``RING_PG`` / ``ULYSSES_PG``.
    4. **No CPU attention backend returns the log-sum-exp.** Ring attention merges per-block
       outputs by their LSE, so the attention function must return ``(out, lse)``. On CPU
       xfuser would pick the plain ``SDPA`` backend (returns ``lse=None``, rejected for
       ``ring_degree > 1``), and its ``SDPA_FLASH`` function calls the CUDA-only
       ``aten._scaled_dot_product_flash_attention``. torch's CPU kernel
       ``aten._scaled_dot_product_flash_attention_for_cpu`` returns ``(out, lse)`` with the same
       layouts ([B, H, S, D] and [B, H, S]), so it is registered in
       ``ATTENTION_FUNCTION_REGISTRY`` under ``AttentionBackendType.SDPA_FLASH``. ``USP`` (and
       through it ``ring_attn`` and the Ulysses path) looks the function up in that registry on
       every call, so all of them use it. So that it is actually selected,
       ``RuntimeState._select_attention_backend`` is wrapped to return ``SDPA_FLASH`` when the
       engine config names no backend (an explicitly configured backend is left alone).
    5. **``torch.cuda.synchronize`` in the group coordinator.**
       ``xfuser.core.distributed.group_coordinator`` imports ``synchronize`` from
       ``torch.cuda`` and calls it around the PipeFusion shape handshake; on CPU there is
       nothing to synchronize, so the module attribute is replaced by a no-op.

    Two further requirements are not patched here: xfuser imports ``triton`` without declaring
    it (install triton), and xfuser's examples create CUDA generators and call ``.to("cuda")``
    (build pipelines directly, as :mod:`compactfusion.testing.tiny_pipelines` does).

    Raises:
        RuntimeError: if CUDA is available, or if ``xfuser`` was already imported in this
            process before the fixes could be applied.
        ImportError: if xfuser, yunchang or another package xfuser needs is not installed.
    """
    global _APPLIED
    if _APPLIED:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "prepare_xfuser_cpu() is for CPU-only machines: CUDA is available here, so xfuser "
            "runs unpatched (import xfuser directly)."
        )
    for package in ("xfuser", "yunchang", "distvae", "diffusers", "triton"):
        if importlib.util.find_spec(package) is None:
            raise ImportError(
                f"prepare_xfuser_cpu() needs the package {package!r}, which is not installed; "
                "install the xdit extra: pip install 'compactfusion[xdit]'"
            )
    if "xfuser.config.config" in sys.modules:
        raise RuntimeError(
            "xfuser was imported before prepare_xfuser_cpu(): its import-time constants "
            "(e.g. HAS_LONG_CTX_ATTN) are already wrong for CPU. Call prepare_xfuser_cpu() "
            "before anything imports xfuser, in every process (spawned ranks included)."
        )

    _load_envs_and_patch()
    _exec_xfuser_package()
    _patch_imported_modules()
    _APPLIED = True


def _load_envs_and_patch() -> None:
    """Load ``xfuser.envs`` without the package ``__init__`` and apply fixes 1 and 2.

    The package module object is created from its spec and registered in ``sys.modules`` but
    not executed yet, so that importing ``xfuser.envs`` (and the tiny ``xfuser.compat`` and
    ``xfuser.logger`` it needs) does not trigger the import of all of xfuser.
    """
    # A failed ``import xfuser`` leaves its completed (and broken half-initialised) submodules
    # behind; since the package never imported successfully, none of them is usable: start over.
    for name in [name for name in sys.modules if name == "xfuser" or name.startswith("xfuser.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("xfuser")
    sys.modules["xfuser"] = importlib.util.module_from_spec(spec)
    try:
        envs = importlib.import_module("xfuser.envs")
        # Fix 1: no accelerator version, gloo as the default backend.
        envs.get_device_version = _no_device_version
        envs.get_torch_distributed_backend = _gloo_backend
        # Fix 2: yunchang is usable without CUDA (xfuser's check only tries it on CUDA/NPU).
        importlib.import_module("yunchang")
        envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True
    except Exception:
        sys.modules.pop("xfuser", None)
        raise


def _exec_xfuser_package() -> None:
    """Run the real ``xfuser/__init__.py`` in the module registered by ``_load_envs_and_patch``.

    This is exactly what a normal import does (create from spec, register, execute), only
    delayed until after the patches to ``xfuser.envs``.
    """
    package = sys.modules["xfuser"]
    try:
        package.__spec__.loader.exec_module(package)
    except Exception:
        sys.modules.pop("xfuser", None)
        raise


def _patch_imported_modules() -> None:
    """Apply fixes 3, 4 and 5 to modules that the package import has loaded."""
    from xfuser.core.distributed import attention_backend, group_coordinator, runtime_state
    from xfuser.model_executor.layers import usp
    from yunchang.globals import PROCESS_GROUP

    # Fix 3: the Ulysses/ring groups live in yunchang's singleton.
    usp.PROCESS_GROUP = PROCESS_GROUP

    # Fix 4: an LSE-returning CPU kernel as SDPA_FLASH, selected by default.
    backend_type = attention_backend.AttentionBackendType
    attention_backend.ATTENTION_FUNCTION_REGISTRY[backend_type.SDPA_FLASH] = _sdpa_flash_cpu
    original_select = runtime_state.RuntimeState._select_attention_backend
    if not getattr(original_select, "_compactfusion_cpu", False):

        def _select_attention_backend(self, engine_config=None):
            if engine_config is not None and engine_config.runtime_config.attention_backend:
                return original_select(self, engine_config)
            return backend_type.SDPA_FLASH

        _select_attention_backend._compactfusion_cpu = True
        _select_attention_backend.__doc__ = original_select.__doc__
        runtime_state.RuntimeState._select_attention_backend = _select_attention_backend

    # Fix 5: nothing to synchronize on CPU.
    group_coordinator.synchronize = _no_synchronize


def _no_device_version() -> None:
    """CPU replacement for ``xfuser.envs.get_device_version``: there is no device version."""
    return None


def _gloo_backend() -> str:
    """CPU replacement for ``xfuser.envs.get_torch_distributed_backend``."""
    return "gloo"


def _no_synchronize(*args, **kwargs) -> None:
    """CPU replacement for ``torch.cuda.synchronize`` inside xfuser's group coordinator."""


def _sdpa_flash_cpu(query, key, value, dropout_p, is_causal, attention_kwargs=None):
    """xfuser attention-backend function for CPU returning ``(out, lse)``.

    Same contract as xfuser's ``_sdpa_flash_attn_call``: ``query``/``key``/``value`` are
    [B, H, S, D]; returns the output [B, H, S_q, D] and the log-sum-exp [B, H, S_q] that ring
    attention needs to merge blocks. ``attention_kwargs["attn_mask"]`` is honoured when given.
    """
    attn_mask = attention_kwargs.get("attn_mask") if attention_kwargs else None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, bool(is_causal), attn_mask=attn_mask
    )
    return out, lse
