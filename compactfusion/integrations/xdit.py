"""xDiT (``xfuser==0.7.0``) integration: compressed ring attention, patch parallel, Ulysses.

Where xfuser moves activations (see ``../shared/DESIGN.md``):

- ``xfuser.model_executor.layers.usp.ring_attn(attention_function, q, k, v, ...)`` runs torch's
  templated ring attention over ``PROCESS_GROUP.RING_PG``. It is replaced (while a patched
  pipeline runs) by one of three strategies, chosen by ``CompactConfig.mode``:

  * ``allgather``: every rank encodes the residual of its local ``[K; V]`` (one payload), one
    all-gather of fixed-size payloads, peers' blocks decoded into per-layer buffers, then one
    attention call over the gathered keys/values. With codec ``raw`` this is plain patch
    parallelism.
  * ``ring``: the payloads travel around the ring with ``batch_isend_irecv``; the relay of a
    payload is started before it is decoded and attended, so transfer overlaps compute, and
    per-block outputs are merged by log-sum-exp.
  * ``stale`` (DistriFusion): the other ranks' K/V of the previous step, gathered
    asynchronously while the current step computes; only the local block is fresh. With
    codec ``raw`` the K/V travel in full precision; with a lossy codec as compressed residuals
    (started after the attention of step t, decoded before the attention of step t+1 into
    per-layer buffers, the receivers' bases).

- ``usp._sdpa_all_to_all_single(x)`` carries every Ulysses all-to-all (q, k, v, combined qkv
  and the attention output). It is replaced by ``compressed_all_to_all`` with one residual
  site per (layer, n-th exchange in the layer, source, destination).

The module-level functions are swapped only while at least one pipeline is patched, and the
replacements defer to the originals unless a patched pipeline is running in the current
context (a ``ContextVar``), so other pipelines in the process behave exactly as before.
All per-pipeline state lives in one :class:`XDiTState` attached to the pipeline.
"""

from __future__ import annotations

import contextvars
import importlib.metadata
import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..attention import attend, merge
from ..collectives import (
    all_gather_flat,
    check_consistent,
    compressed_all_gather,
    compressed_all_to_all,
    finish_compressed_all_gather,
    gather_buffer,
    host_headers,
    is_retry_marker,
    raw_all_gather,
    retry_marker,
    start_compressed_all_gather,
)
from ..config import CompactConfig
from ..policy import codec_throughput_gbps
from ..residual import ResidualCompressor

SUPPORTED_XFUSER = ("0.7.0",)
STATE_ATTR = "_compactfusion_state"

# The pipeline whose generation is running in this context, and the attention layer inside it.
_ACTIVE: contextvars.ContextVar[XDiTState | None] = contextvars.ContextVar(
    "compactfusion_active_pipeline", default=None
)
_LAYER: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "compactfusion_layer", default=None
)


# --------------------------------------------------------------------------------------------
# Per-pipeline state
# --------------------------------------------------------------------------------------------
@dataclass
class XDiTState:
    """Everything compactfusion keeps for one patched xfuser pipeline."""

    config: CompactConfig
    compressor: ResidualCompressor
    # Undo information.
    original_class: type
    hooks: list = field(default_factory=list)
    # Parallel layout, read once at patch time.
    ring_world: int = 1
    ulysses_world: int = 1
    # Per-generation state.
    step: int = 0  # transformer calls in this generation
    a2a_index: dict[str, int] = field(default_factory=dict)  # exchanges so far in each layer
    kv_buffers: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    stale: dict[str, dict[str, Any]] = field(default_factory=dict)
    checked: bool = False  # config hash exchanged with the other ranks
    # Statistics.
    generations: int = 0
    step_bytes: list[int] = field(default_factory=list)  # payload bytes sent per step
    step_raw_bytes: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    stale_bytes: int = 0
    # Bookkeeping of the step and layer in progress.
    _step_start: float = 0.0
    _step_marks: tuple[int, int] = (0, 0)
    _layer_token: contextvars.Token | None = None

    def new_generation(self) -> None:
        self.compressor.reset()
        self.compressor.reset_stats()  # stats(pipe) describes the latest generation
        self.stale_bytes = 0
        self.step = 0
        self.a2a_index.clear()
        self.kv_buffers.clear()
        for entry in self.stale.values():
            work = entry.get("work")
            if work is not None:
                work.wait()
        self.stale.clear()
        self.generations += 1
        self.step_bytes.clear()
        self.step_raw_bytes.clear()
        self.step_seconds.clear()

    # Step accounting: bytes this rank sent (compressed payloads + stale raw gathers).
    def _sent(self) -> tuple[int, int]:
        payload, raw = self.compressor.sent_bytes()
        return payload + self.stale_bytes, raw + self.stale_bytes

    def begin_step(self) -> None:
        self._step_marks = self._sent()
        _sync_device()
        self._step_start = time.perf_counter()

    def end_step(self) -> None:
        _sync_device()  # GPU work is asynchronous: time the step, not its launches
        sent, raw = self._sent()
        self.step_bytes.append(sent - self._step_marks[0])
        self.step_raw_bytes.append(raw - self._step_marks[1])
        self.step_seconds.append(time.perf_counter() - self._step_start)
        self.step += 1

    def stats(self) -> dict[str, Any]:
        st = self.compressor.stats()
        after = [b for b in self.step_bytes[self.config.warmup_steps :]]
        raw_after = self.step_raw_bytes[self.config.warmup_steps :]
        st.update(
            mode=self.config.mode,
            config=self.config.to_dict(),
            ring_world=self.ring_world,
            ulysses_world=self.ulysses_world,
            generations=self.generations,
            steps=self.step,
            bytes_per_step=list(self.step_bytes),
            raw_bytes_per_step=list(self.step_raw_bytes),
            seconds_per_step=list(self.step_seconds),
            ratio_after_warmup=(sum(raw_after) / sum(after)) if sum(after) else math.nan,
        )
        return st


def _sync_device() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Validation and discovery
# --------------------------------------------------------------------------------------------
def _xfuser_modules():
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


def _check_supported(pipe: Any) -> tuple[int, int]:
    xdist, usp, base = _xfuser_modules()
    version = importlib.metadata.version("xfuser")
    if version not in SUPPORTED_XFUSER:
        raise RuntimeError(
            f"compactfusion supports xfuser {', '.join(SUPPORTED_XFUSER)}, found {version}"
        )
    if not isinstance(pipe, base):
        raise TypeError(f"expected an xfuser pipeline, got {type(pipe).__name__}")
    engine = getattr(pipe, "engine_config", None)
    runtime = getattr(engine, "runtime_config", None)
    if runtime is not None and getattr(runtime, "use_fp8_comms", False):
        raise ValueError(
            "xfuser's use_fp8_comms (FP8 Ulysses all-to-all) is enabled: it already quantizes "
            "the traffic compactfusion would compress; disable one of them"
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
class _Swap:
    """Holds xfuser's original functions while at least one pipeline is patched."""

    users = 0
    originals: dict[str, Any] = {}

    @classmethod
    def acquire(cls) -> None:
        _, usp, _ = _xfuser_modules()
        if cls.users == 0:
            cls.originals = {
                "ring_attn": usp.ring_attn,
                "_sdpa_all_to_all_single": usp._sdpa_all_to_all_single,
            }
            usp.ring_attn = _patched_ring_attn
            usp._sdpa_all_to_all_single = _patched_all_to_all_single
        cls.users += 1

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0:
            _, usp, _ = _xfuser_modules()
            for name, fn in cls.originals.items():
                setattr(usp, name, fn)
            cls.originals = {}


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
    state = _ACTIVE.get()
    if state is None:
        return _Swap.originals["ring_attn"](
            attention_function, query, key, value, dropout_p, is_causal, joint_attn_kwargs,
            attention_kwargs,
        )  # fmt: skip
    _, usp, _ = _xfuser_modules()
    group = usp.PROCESS_GROUP.RING_PG
    layer = _LAYER.get() or "attn"
    kw = dict(
        dropout_p=dropout_p,
        is_causal=is_causal,
        joint_attn_kwargs=joint_attn_kwargs,
        attention_kwargs=attention_kwargs,
    )
    if is_causal:
        raise NotImplementedError("compactfusion ring attention does not support causal masks")
    mode = state.config.mode
    if mode == "stale":
        return _stale_attention(state, layer, attention_function, query, key, value, group, kw)
    if mode == "ring":
        return _ring_relay_attention(state, layer, attention_function, query, key, value, group, kw)
    return _allgather_attention(state, layer, attention_function, query, key, value, group, kw)


def _patched_all_to_all_single(x):
    state = _ACTIVE.get()
    if state is None or not state.config.compress_ulysses:
        return _Swap.originals["_sdpa_all_to_all_single"](x)
    _, usp, _ = _xfuser_modules()
    group = usp.PROCESS_GROUP.ULYSSES_PG
    world = dist.get_world_size(group)
    layer = _LAYER.get() or "attn"
    index = state.a2a_index.get(layer, 0)
    state.a2a_index[layer] = index + 1
    flat = x.reshape(world, -1)
    width = _row_width(flat.shape[1], x.shape[-1])
    out = compressed_all_to_all(
        state.compressor, (layer, "a2a", index), flat.reshape(world, -1, width), group
    )
    return out.reshape(x.shape)


def _row_width(numel: int, natural: int) -> int:
    """Channels per codec row: 256 consecutive values when they divide evenly (scale groups of
    256), else the tensor's own last dimension."""
    for width in (256, 128):
        if numel % width == 0:
            return width
    return natural


# --------------------------------------------------------------------------------------------
# The three ring-attention strategies
# --------------------------------------------------------------------------------------------
def _local_kv(state: XDiTState, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The local ``[K; V]`` as the 2-D matrix the codec sees (lowrank: token-major)."""
    kv = torch.stack([key, value])  # [2, B, H, S, D]
    if state.config.codec == "lowrank":
        two, b, h, s, d = kv.shape
        return kv.permute(1, 3, 0, 2, 4).reshape(b * s, two * h * d)
    return kv.reshape(-1, _row_width(kv.numel(), kv.shape[-1]))


def _kv_from_matrix(state: XDiTState, m: torch.Tensor, like: torch.Tensor):
    """Inverse of ``_local_kv``: ``(K, V)`` shaped like ``like`` ([B, H, S, D])."""
    b, h, s, d = like.shape
    if state.config.codec == "lowrank":
        kv = m.reshape(b, s, 2, h, d).permute(2, 0, 3, 1, 4)
    else:
        kv = m.reshape(2, b, h, s, d)
    return kv[0], kv[1]


def _ensure_checked(state: XDiTState) -> None:
    """Exchange a hash of config, payload layout and parallel layout over the whole world,
    once per patched pipeline: differently configured ranks fail together, never hang."""
    if not state.checked:
        codec = state.compressor.codec.describe()
        layout = f"ring={state.ring_world},ulysses={state.ulysses_world}"
        policy = ""
        if state.config.policy == "auto":  # decisions depend on the codec speed assumed
            policy = f"|{codec_throughput_gbps('cuda')},{codec_throughput_gbps('cpu')}"
        check_consistent(f"{state.config.fingerprint()}|{codec}|{layout}{policy}")
        state.checked = True


def _attend_gathered(attention_function, query, blocks, kw):
    """One attention call over the rank blocks ``[(K_r, V_r), ...]`` concatenated in rank
    order (joint text included once)."""
    ks, vs = zip(*blocks, strict=True)
    out, _ = attend(
        attention_function, query, torch.cat(ks, 2), torch.cat(vs, 2), with_joint=True, **kw
    )
    return out


def _decoded_blocks(state, gathered, key, value, rank):
    """The exact local ``(K, V)`` and every peer's reconstructed block from ``gathered``."""
    return [
        (key, value) if r == rank else _kv_from_matrix(state, gathered[r], key)
        for r in range(gathered.shape[0])
    ]


def _allgather_attention(state, layer, attention_function, query, key, value, group, kw):
    local = _local_kv(state, key, value)
    buf_key = (layer, tuple(local.shape), local.dtype)
    buf = state.kv_buffers.get(buf_key)
    gathered = compressed_all_gather(state.compressor, (layer, "kv"), local, group, out=buf)
    state.kv_buffers[buf_key] = gathered
    blocks = _decoded_blocks(state, gathered, key, value, dist.get_rank(group))
    return _attend_gathered(attention_function, query, blocks, kw)


def _ring_relay_attention(state, layer, attention_function, query, key, value, group, kw):
    comp = state.compressor
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    pg = group if group is not None else dist.group.WORLD
    nxt = dist.get_global_rank(pg, (rank + 1) % world)
    prv = dist.get_global_rank(pg, (rank - 1) % world)
    local = _local_kv(state, key, value)
    site = (layer, "kv")
    nbytes = comp.payload_nbytes((site, rank), tuple(local.shape), local.dtype)
    payload = comp.encode((site, rank), local)
    saw_marker = payload.numel() != nbytes
    if saw_marker:
        payload = retry_marker(local, nbytes)

    def relay(buf):
        recv = torch.empty(nbytes, dtype=torch.uint8, device=buf.device)
        ops = [dist.P2POp(dist.isend, buf, nxt), dist.P2POp(dist.irecv, recv, prv)]
        return recv, dist.batch_isend_irecv(ops)

    recv, reqs = relay(payload)
    acc = merge(None, attend(attention_function, query, key, value, with_joint=True, **kw))
    for step in range(1, world):
        for req in reqs:
            req.wait()
        current = recv
        if step < world - 1:
            recv, reqs = relay(current)  # post the next transfer before decoding this one
        src = (rank - step) % world
        (header,) = host_headers(current.view(1, -1))
        if is_retry_marker(header):
            saw_marker = True
            continue
        if saw_marker:
            continue
        block = comp.decode((site, src), current, header=header)
        k_s, v_s = _kv_from_matrix(state, block, key)
        acc = merge(acc, attend(attention_function, query, k_s, v_s, with_joint=False, **kw))
    if saw_marker:
        # A rank's activation was not finite. Every payload has visited every rank, so all
        # ranks know it: redo this layer with a raw all-gather, which restarts the bases.
        return _raw_retry_attention(state, layer, attention_function, query, key, value, group, kw)
    out, _ = acc
    return out.to(query.dtype)


def _raw_retry_attention(state, layer, attention_function, query, key, value, group, kw):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = _local_kv(state, key, value)
    gathered = torch.empty((world, *local.shape), dtype=local.dtype, device=local.device)
    raw_all_gather(state.compressor, (layer, "kv"), local, group, gathered)
    blocks = _decoded_blocks(state, gathered, key, value, rank)
    return _attend_gathered(attention_function, query, blocks, kw)


def _stale_attention(state, layer, attention_function, query, key, value, group, kw):
    """DistriFusion: attend to the previous step's K/V of the other ranks (gathered
    asynchronously during the previous step) and the fresh local K/V."""
    rank = dist.get_rank(group)
    lossless = state.compressor.codec.lossless
    local = torch.stack([key, value]).contiguous() if lossless else _local_kv(state, key, value)
    entry = state.stale.pop(layer, None)
    layout = (tuple(local.shape), local.dtype)
    fresh = (
        entry is None or entry["layout"] != layout or state.step < max(state.config.warmup_steps, 1)
    )
    if lossless:
        gathered = _stale_gather_raw(state, local, group, entry, fresh)
        blocks = [(key, value) if r == rank else tuple(gathered[r]) for r in range(len(gathered))]
    else:
        gathered = _stale_gather_compressed(state, layer, local, group, entry, fresh)
        blocks = _decoded_blocks(state, gathered, key, value, rank)
    out = _attend_gathered(attention_function, query, blocks, kw)
    # Start gathering this step's K/V for the next step; it overlaps the rest of this step.
    # ``work`` (a torch work handle or a PendingGather) is waited for before any reuse.
    if lossless:
        buffer, work = _gather_full(state, local, group, async_op=True)
        state.stale[layer] = {"buffer": buffer, "work": work, "layout": layout}
    else:
        work = start_compressed_all_gather(
            state.compressor, (layer, "kv"), local, group, async_op=True
        )
        state.stale[layer] = {"work": work, "layout": layout}
    return out


def _gather_full(state, local, group, async_op=False):
    """All-gather the full-precision local K/V (counted as stale bytes): ``(buffer, work)``
    with ``buffer`` shaped ``(world, *local.shape)``."""
    buffer = local.new_empty(dist.get_world_size(group) * local.numel())
    work = all_gather_flat(buffer, local.reshape(-1), group, async_op=async_op)
    state.stale_bytes += local.numel() * local.element_size()
    return buffer.view(-1, *local.shape), work


def _stale_gather_raw(state, local, group, entry, fresh):
    """The other ranks' full-precision K/V: the previous step's, or this step's gathered now
    (exact) at warm-up and after a change of shape or dtype."""
    if entry is not None:
        entry["work"].wait()
    if not fresh:
        return entry["buffer"]
    return _gather_full(state, local, group)[0]


def _stale_gather_compressed(state, layer, local, group, entry, fresh):
    """The other ranks' K/V decoded from the previous step's compressed payloads into this
    layer's persistent buffer (the bases of those sites). At warm-up, after a change of shape
    or dtype, or when a rank's K/V were not finite (a retry marker), this step's K/V are
    gathered raw instead, which restarts every base exactly (the previous payloads are then
    waited for and dropped on every rank alike)."""
    comp, site = state.compressor, (layer, "kv")
    buf_key = (layer, "stale", tuple(local.shape), local.dtype)
    buf = gather_buffer(local, dist.get_world_size(group), state.kv_buffers.get(buf_key))
    state.kv_buffers[buf_key] = buf
    if entry is not None:
        pending = entry["work"]
        if not fresh and finish_compressed_all_gather(comp, pending, buf):
            return buf
        pending.wait()  # every rank reaches the same decision: all gather raw below
    return raw_all_gather(comp, site, local, group, buf)


# --------------------------------------------------------------------------------------------
# Patching a pipeline instance
# --------------------------------------------------------------------------------------------
def _make_patched_class(cls: type) -> type:
    def __call__(self, *args, **kwargs):
        state: XDiTState = getattr(self, STATE_ATTR)
        _ensure_checked(state)
        state.new_generation()
        token = _ACTIVE.set(state)
        try:
            return cls.__call__(self, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    namespace = {"__call__": __call__, "__module__": cls.__module__}
    return type(cls)(cls.__name__, (cls,), namespace)


def patch_xdit(pipe: Any, config: CompactConfig) -> XDiTState:
    """Patch one xfuser pipeline instance (see the module docstring)."""
    ring, ulysses = _check_supported(pipe)
    modules = _attention_modules(pipe)
    state = XDiTState(
        config=config,
        compressor=ResidualCompressor(config),
        original_class=type(pipe),
        ring_world=ring,
        ulysses_world=ulysses,
    )

    def pre_hook(name):
        def hook(module, args, kwargs=None):
            st = _ACTIVE.get()
            if st is state:
                st._layer_token = _LAYER.set(name)
                st.a2a_index[name] = 0
            return None

        return hook

    def post_hook(module, args, output):
        if _ACTIVE.get() is state and state._layer_token is not None:
            _LAYER.reset(state._layer_token)
            state._layer_token = None
        return None

    for name, module in modules:
        state.hooks.append(module.register_forward_pre_hook(pre_hook(name)))
        state.hooks.append(module.register_forward_hook(post_hook))

    transformer = pipe.module.transformer

    def step_begin(module, args):
        if _ACTIVE.get() is state:
            state.begin_step()

    def step_end(module, args, output):
        if _ACTIVE.get() is state:
            state.end_step()

    state.hooks.append(transformer.register_forward_pre_hook(step_begin))
    state.hooks.append(transformer.register_forward_hook(step_end))
    _Swap.acquire()
    try:
        pipe.__class__ = _make_patched_class(type(pipe))
    except Exception:
        _Swap.release()
        for h in state.hooks:
            h.remove()
        raise
    setattr(pipe, STATE_ATTR, state)
    return state


def unpatch_xdit(pipe: Any) -> None:
    """Undo ``patch_xdit``: hooks removed, class and xfuser functions restored."""
    state: XDiTState = getattr(pipe, STATE_ATTR)
    for h in state.hooks:
        h.remove()
    state.new_generation()  # waits for any outstanding asynchronous gathers
    pipe.__class__ = state.original_class
    delattr(pipe, STATE_ATTR)
    _Swap.release()
