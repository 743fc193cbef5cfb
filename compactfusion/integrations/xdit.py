"""xDiT (``xfuser==0.7.0``) adapter: where xfuser moves activations, and how to patch its pipelines.

- ``xfuser.model_executor.layers.usp.ring_attn(attention_function, q, k, v, ...)`` runs torch's
  templated ring attention over ``PROCESS_GROUP.RING_PG``. While a patched pipeline runs it is
  replaced by the shared strategy of ``CompactConfig.mode`` (``strategies.kv_attention``:
  compressed all-gather, ring relay or stale).
- ``usp._sdpa_all_to_all_single(x)`` carries every Ulysses all-to-all (q, k, v, combined qkv
  and the attention output); it is replaced by ``strategies.ulysses_all_to_all``.

The module-level functions are swapped only while at least one pipeline is patched, and the
replacements defer to the originals unless a patched pipeline is running in the current
context (``tracking.active_state``), so other pipelines in the process behave exactly as
before. While a generation of a patched pipeline runs, its own bound replacements (``_Bound``) are
installed instead: under torch.compile they carry the pipeline's state into the traced code
and keep one compiled graph per patched pipeline. All per-pipeline state lives in one
:class:`~.state.PipelineState` attached to the pipeline.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator
from typing import Any

import torch

from ..attention import attend
from ..config import CompactConfig
from . import tracking
from .generation import patched_call_class
from .state import STATE_ATTR, PipelineState
from .strategies import kv_attention, ulysses_all_to_all

SUPPORTED_XFUSER = ("0.7.0",)


# --------------------------------------------------------------------------------------------
# Validation and discovery
# --------------------------------------------------------------------------------------------
def xfuser_modules():
    """``(xfuser.core.distributed, usp, xFuserPipelineBaseWrapper)``, imported on demand."""
    try:
        from xfuser.core import distributed as xdist
        from xfuser.model_executor.layers import usp
        from xfuser.model_executor.pipelines.base_pipeline import xFuserPipelineBaseWrapper
    except ImportError as exc:
        raise ImportError(
            "compactfusion.patch needs xfuser==0.7.0 (pip install 'compactfusion[xdit]'); "
            f"importing it failed: {exc}"
        ) from exc
    return xdist, usp, xFuserPipelineBaseWrapper


def is_xdit_pipeline(pipe: Any) -> bool:
    """Whether ``pipe`` is an xfuser pipeline wrapper (without importing xfuser needlessly)."""
    return any(
        c.__name__ == "xFuserPipelineBaseWrapper" and c.__module__.startswith("xfuser")
        for c in type(pipe).__mro__
    )


def check_xfuser_runtime(runtime_config: Any) -> tuple[int, int]:
    """Refuse what compactfusion cannot compress under xfuser's current parallel layout;
    returns ``(ring_degree, ulysses_degree)``. ``runtime_config`` is xfuser's
    ``RuntimeConfig`` (or None when unknown). Shared by the legacy and the runner adapters."""
    xdist, usp, _ = xfuser_modules()
    version = importlib.metadata.version("xfuser")
    if version not in SUPPORTED_XFUSER:
        raise RuntimeError(
            f"compactfusion supports xfuser {', '.join(SUPPORTED_XFUSER)}, found {version}"
        )
    if runtime_config is not None and getattr(runtime_config, "use_fp8_comms", False):
        raise ValueError(
            "xfuser's use_fp8_comms (FP8 Ulysses all-to-all) is enabled: it already quantizes "
            "the traffic compactfusion would compress; disable one of them"
        )
    if not xdist.model_parallel_is_initialized():
        raise RuntimeError(
            "xfuser's parallel groups are not initialised: build the engine config and call "
            "xfuser's initialize_runtime_state(pipe, engine_config) first (xfuser's model "
            "runner does this in xFuserModel.initialize)"
        )
    if xdist.get_pipeline_parallel_world_size() > 1:
        raise NotImplementedError(
            "PipeFusion (pipefusion_parallel_degree > 1) is not supported by compactfusion yet"
        )
    ring, ulysses = xdist.get_ring_parallel_world_size(), xdist.get_ulysses_parallel_world_size()
    if ring * ulysses == 1:
        raise ValueError(
            "this pipeline runs without sequence parallelism (ring_degree = ulysses_degree = "
            "1): there is no activation traffic for compactfusion to compress"
        )
    if usp.PROCESS_GROUP is None:
        raise RuntimeError(
            "xfuser's USP process groups are not initialised (usp.PROCESS_GROUP is None); "
            "on CPU call compactfusion.testing.prepare_xfuser_cpu() before importing xfuser"
        )
    return ring, ulysses


def _check_supported(pipe: Any) -> tuple[int, int]:
    _, _, base = xfuser_modules()
    if not isinstance(pipe, base):
        raise TypeError(f"expected an xfuser pipeline, got {type(pipe).__name__}")
    engine = getattr(pipe, "engine_config", None)
    return check_xfuser_runtime(getattr(engine, "runtime_config", None))


def _attention_modules(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    transformer = getattr(pipe.module, "transformer", None)
    if transformer is None:
        raise ValueError(
            "this xfuser pipeline has no transformer; only DiT pipelines are supported"
        )
    found = [
        (name, m)
        for name, m in transformer.named_modules()
        if hasattr(m, "processor") and hasattr(m, "to_q")
    ]
    if not found:
        raise ValueError(
            "no attention modules (with .processor and .to_q) found in the transformer"
        )
    return found


# --------------------------------------------------------------------------------------------
# The module-level function swap (shared by all patched pipelines, reference counted)
# --------------------------------------------------------------------------------------------
class FunctionSwap:
    """Holds xfuser's original functions while at least one pipeline is patched."""

    users = 0
    originals: dict[str, Any] = {}

    @classmethod
    def acquire(cls) -> None:
        _, usp, _ = xfuser_modules()
        if cls.users == 0:
            cls.originals = {
                "ring_attn": usp.ring_attn,
                "_sdpa_all_to_all_single": usp._sdpa_all_to_all_single,
            }
            usp.ring_attn = _patched_ring_attn
            usp._sdpa_all_to_all_single = _patched_all_to_all_single
        cls.users += 1

    @classmethod
    @contextlib.contextmanager
    def bound(cls, replacements: dict[str, Any]) -> Iterator[None]:
        """Install one pipeline's :class:`_Bound` replacements for the duration of a generation."""
        _, usp, _ = xfuser_modules()
        with tracking.attributes_set(usp, replacements):
            yield

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0:
            _, usp, _ = xfuser_modules()
            for name, fn in cls.originals.items():
                setattr(usp, name, fn)
            cls.originals = {}


class _Bound:
    """One patched pipeline's replacement for an xfuser function, installed while that
    pipeline's generations run (``FunctionSwap.bound``, entered through ``PipelineState.bind``).

    In eager mode it is the shared replacement (which finds the running pipeline through a
    ``ContextVar``). While compiling it uses its own pipeline's state directly: dynamo cannot
    read a ``ContextVar``, and because dynamo guards the module global it was loaded from, each
    patched pipeline gets its own compiled graph, separate from unpatched runs."""

    def __init__(self, state: PipelineState, shared, for_state):
        self.state, self.shared, self.for_state = state, shared, for_state

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.for_state(self.state, *args, **kwargs)
        return self.shared(*args, **kwargs)


def _patched_ring_attn(
    attention_function,
    query,
    key,
    value,
    dropout_p=0.0,
    is_causal=False,
    joint_attn_kwargs=None,
    attention_kwargs=None,
):
    state = None if torch.compiler.is_compiling() else tracking.active_state()
    if state is None:
        return FunctionSwap.originals["ring_attn"](
            attention_function, query, key, value, dropout_p, is_causal, joint_attn_kwargs,
            attention_kwargs,
        )  # fmt: skip
    return _ring_attn_for(
        state, attention_function, query, key, value, dropout_p, is_causal, joint_attn_kwargs,
        attention_kwargs,
    )  # fmt: skip


def _ring_attn_for(
    state,
    attention_function,
    query,
    key,
    value,
    dropout_p=0.0,
    is_causal=False,
    joint_attn_kwargs=None,
    attention_kwargs=None,
):
    if is_causal:
        raise NotImplementedError("compactfusion ring attention does not support causal masks")
    _, usp, _ = xfuser_modules()
    attend_fn = xfuser_attend_fn(
        attention_function,
        dropout_p=dropout_p,
        is_causal=is_causal,
        joint_attn_kwargs=joint_attn_kwargs,
        attention_kwargs=attention_kwargs,
    )
    layer = tracking.current_layer(state)
    return kv_attention(state, layer, attend_fn, query, key, value, usp.PROCESS_GROUP.RING_PG)


def xfuser_attend_fn(attention_function, **kw):
    """``attend_fn(q, k, v, with_joint)`` for the strategies, over one of xfuser's attention
    functions and the keyword arguments ``ring_attn`` received (joint tokens handled by
    :func:`compactfusion.attention.attend`)."""

    def attend_fn(q, k, v, with_joint):
        return attend(attention_function, q, k, v, with_joint=with_joint, **kw)

    return attend_fn


def _patched_all_to_all_single(x):
    state = None if torch.compiler.is_compiling() else tracking.active_state()
    if state is None:
        return FunctionSwap.originals["_sdpa_all_to_all_single"](x)
    return _all_to_all_for(state, x)


def _all_to_all_for(state, x):
    if not state.config.compress_ulysses:
        return FunctionSwap.originals["_sdpa_all_to_all_single"](x)
    _, usp, _ = xfuser_modules()
    return ulysses_all_to_all(state, tracking.current_layer(state), x, usp.PROCESS_GROUP.ULYSSES_PG)


# --------------------------------------------------------------------------------------------
# Patching a pipeline instance
# --------------------------------------------------------------------------------------------
def bound_replacements(state: PipelineState) -> dict[str, Any]:
    """``state``'s own replacements of xfuser's functions, installed while its generations
    run (see :class:`_Bound`). Made once per patched pipeline: dynamo guards the identity of
    the module global, so new objects every call would recompile every generation."""
    return {
        "ring_attn": _Bound(state, _patched_ring_attn, _ring_attn_for),
        "_sdpa_all_to_all_single": _Bound(state, _patched_all_to_all_single, _all_to_all_for),
    }


def patch_xdit(pipe: Any, config: CompactConfig) -> PipelineState:
    """Patch one xfuser pipeline instance (see the module docstring)."""
    ring, ulysses = _check_supported(pipe)
    modules = _attention_modules(pipe)
    state = PipelineState(
        config=config,
        original_class=type(pipe),
        ring_world=ring,
        ulysses_world=ulysses,
    )
    return install(pipe, state, [(modules, pipe.module.transformer)])


def install(pipe: Any, state: PipelineState, transformers) -> PipelineState:
    """Hook every ``(attention modules, transformer)`` pair, swap xfuser's functions in and
    give ``pipe`` its patched class; on failure everything is undone. Shared by the xfuser
    adapters (legacy pipelines and the model runner)."""
    try:
        for modules, transformer in transformers:
            tracking.install_layer_hooks(state, modules)
            tracking.install_step_hooks(state, transformer)
            tracking.install_branch_tracking(state, transformer)
    except Exception:
        tracking.remove_hooks(state)
        raise
    replacements = bound_replacements(state)
    state.bind = lambda: FunctionSwap.bound(replacements)
    FunctionSwap.acquire()
    try:
        pipe.__class__ = patched_call_class(type(pipe))
    except Exception:
        FunctionSwap.release()
        tracking.remove_hooks(state)
        raise
    setattr(pipe, STATE_ATTR, state)
    return state


def unpatch_xdit(pipe: Any) -> None:
    """Undo ``patch_xdit`` (or the runner adapter's pipeline patch): hooks removed, class and
    xfuser functions restored."""
    state: PipelineState = getattr(pipe, STATE_ATTR)
    tracking.remove_hooks(state)
    state.new_generation()  # waits for any outstanding asynchronous gathers
    pipe.__class__ = state.original_class
    delattr(pipe, STATE_ATTR)
    FunctionSwap.release()
