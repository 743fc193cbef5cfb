"""diffusers' context-parallel attention classes, with compressed traffic.

``diffusers.models.attention_dispatch`` (0.42.1) moves the activations of context parallelism
in three autograd functions that the dispatcher reads from module globals at every call:

- ``TemplatedRingAttention``: one all-gather of each rank's K||V per call, then per-block
  attention merged by log-sum-exp. Replaced by the shared strategy of ``CompactConfig.mode``
  (``strategies.kv_attention``: compressed all-gather with one attention call over the gathered
  K/V, compressed ring relay, or stale K/V).
- ``TemplatedUlyssesAttention``: all-to-alls of q, k and v (sequence -> heads) and of the
  output (heads -> sequence), plus the LSE when asked. q, k, v and the output go through
  ``strategies.ulysses_all_to_all`` (one residual site per exchange, source and destination);
  the LSE and an attention mask travel raw.
- ``SeqAllToAllDim``: the Ulysses half of the unified mode (both degrees > 1), around
  ``TemplatedRingAttention``; compressed the same way (a 1-wide LSE stays raw).

While at least one model is patched these globals are subclasses whose ``forward`` defers to
diffusers' own unless a patched pipeline is running in this context and the call belongs to one
of its transformers (its ``ContextParallelConfig``); during each generation of a patched
pipeline its own subclasses, bound to its state, are installed instead (what torch.compile
traces: see below). The "anything" variants (uneven splits,
``ring_anything`` / ``ulysses_anything``) are not replaced: their traffic stays uncompressed
(the adapter logs a note at patch time). Only inference is supported: a call that needs
gradients raises ``NotImplementedError``.

diffusers lays q/k/v out as ``[B, S, H, D]``; the strategies use ``[B, H, S, D]``, so the ring
path transposes (views) on the way in and out. Text tokens are split across ranks like image
tokens in diffusers' plans, so there are no replicated joint tokens (``with_joint`` is moot).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from . import tracking
from .state import PipelineState
from .strategies import kv_attention, ulysses_all_to_all

logger = logging.getLogger(__name__)

REPLACED = ("TemplatedRingAttention", "TemplatedUlyssesAttention", "SeqAllToAllDim")


@dataclass
class DiffusersState(PipelineState):
    """:class:`PipelineState` plus what the replacement classes need to recognise their calls."""

    cp_configs: tuple = ()  # the ContextParallelConfig of every patched transformer
    ulysses_groups: tuple = ()  # their Ulysses process groups (unified mode)
    notes: set = field(default_factory=set)  # one-time notes already logged


def dispatch_module():
    """``diffusers.models.attention_dispatch`` (imported on first use)."""
    from diffusers.models import attention_dispatch

    return attention_dispatch


def _note(state: DiffusersState, key: str, message: str) -> None:
    if key not in state.notes:
        state.notes.add(key)
        logger.warning("compactfusion: %s", message)


def _inference_only(*tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise NotImplementedError(
            "compactfusion compresses inference traffic only: this context-parallel attention "
            "call needs gradients; run under torch.no_grad() or unpatch the model"
        )


# --------------------------------------------------------------------------------------------
# Ring: the shared K/V strategies
# --------------------------------------------------------------------------------------------
def _mask_for(mask: torch.Tensor | None, local_len: int, kv_len: int) -> torch.Tensor | None:
    """The attention mask for ``kv_len`` keys. diffusers' ring applies a rank's local mask to
    every rank's block; over several blocks concatenated, the mask is repeated likewise."""
    if mask is None or mask.shape[-1] == kv_len:
        return mask
    if mask.shape[-1] == local_len and kv_len % local_len == 0:
        return torch.cat([mask] * (kv_len // local_len), dim=-1)
    raise ValueError(
        f"attention mask over {mask.shape[-1]} keys does not fit {kv_len} keys "
        f"(local blocks of {local_len})"
    )


class AttentionCall(NamedTuple):
    """The arguments of diffusers' templated attention functions, in their positional order
    (q/k/v ``[B, S, H, D]``)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    dropout_p: float
    is_causal: bool
    scale: float | None
    enable_gqa: bool
    return_lse: bool
    forward_op: Callable
    backward_op: Callable
    parallel_config: Any = None

    def attend(self, ctx, q, k, v, attn_mask, return_lse):
        """The backend's forward op on other q/k/v (``[B, S, H, D]``), saving nothing."""
        return self.forward_op(
            ctx, q, k, v, attn_mask, self.dropout_p, self.is_causal, self.scale,
            self.enable_gqa, return_lse, _save_ctx=False, _parallel_config=self.parallel_config,
        )  # fmt: skip


def ring_attention(state: DiffusersState, ctx, call: AttentionCall) -> torch.Tensor:
    """Attention of the local query over every ring rank's K/V, the K/V exchanged with the
    strategy of ``state.config.mode``."""
    _inference_only(call.query, call.key, call.value)
    local_len = call.key.shape[1]

    def attend_fn(q, k, v, with_joint):  # [B, H, S, D] in, ([B, H, Sq, D], [B, H, Sq]) out
        mask = _mask_for(call.attn_mask, local_len, k.shape[2])
        out, lse = call.attend(ctx, *(x.transpose(1, 2) for x in (q, k, v)), mask, True)
        if lse.ndim == 4:  # some backends keep a trailing 1
            lse = lse.squeeze(-1)
        return out.transpose(1, 2), lse.transpose(1, 2)

    out = kv_attention(
        state,
        tracking.current_layer(state),
        attend_fn,
        *(x.transpose(1, 2) for x in (call.query, call.key, call.value)),
        call.parallel_config.context_parallel_config._ring_mesh.get_group(),
    )
    return out.transpose(1, 2).to(call.query.dtype).contiguous()


# --------------------------------------------------------------------------------------------
# Ulysses: per-destination chunks through the shared all-to-all
# --------------------------------------------------------------------------------------------
Exchange = Callable[[torch.Tensor], torch.Tensor]  # all-to-all, equal splits along dim 0


def scatter_heads(x: torch.Tensor, world: int, exchange: Exchange) -> torch.Tensor:
    """``[B, S_local, H, D]`` -> ``[B, world * S_local, H / world, D]``: head group ``j`` goes
    to rank ``j``, the received sequence blocks are joined in rank order."""
    b, s, h, d = x.shape
    if h % world:
        raise ValueError(f"{h} heads cannot be split evenly over {world} Ulysses ranks")
    chunks = x.reshape(b, s, world, h // world, d).permute(2, 0, 1, 3, 4)  # [dst, B, S, h, D]
    received = exchange(chunks.contiguous())  # [src, B, S, h, D]
    return received.permute(1, 0, 2, 3, 4).reshape(b, world * s, h // world, d)


def scatter_sequence(x: torch.Tensor, world: int, exchange: Exchange) -> torch.Tensor:
    """``[B, S, H_local, D]`` -> ``[B, S / world, world * H_local, D]`` (the inverse of
    :func:`scatter_heads`): sequence block ``j`` goes to rank ``j``."""
    b, s, h, d = x.shape
    if s % world:
        raise ValueError(f"{s} tokens cannot be split evenly over {world} Ulysses ranks")
    chunks = x.reshape(b, world, s // world, h, d).permute(1, 0, 2, 3, 4)  # [dst, B, s, H, D]
    received = exchange(chunks.contiguous())  # [src = head group, B, s, H, D]
    return received.permute(1, 2, 0, 3, 4).reshape(b, s // world, world * h, d)


def _exchanges(state: DiffusersState, group) -> tuple[Exchange, Exchange]:
    """(compressed-or-raw, raw) all-to-alls over ``group`` for the running layer."""

    def raw(x):
        return dispatch_module()._all_to_all_single(x, group)

    if not state.config.compress_ulysses:
        return raw, raw
    layer = tracking.current_layer(state)
    return (lambda x: ulysses_all_to_all(state, layer, x, group)), raw


def _gather_mask(mask: torch.Tensor, group, world: int) -> torch.Tensor:
    """A mask over the local keys, gathered (raw) over the whole sequence."""
    parts = [torch.empty_like(mask) for _ in range(world)]
    dist.all_gather(parts, mask.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def ulysses_attention(state: DiffusersState, ctx, call: AttentionCall):
    """Ulysses attention with q, k, v and the output exchanged as compressed residuals."""
    _inference_only(call.query, call.key, call.value)
    cp = call.parallel_config.context_parallel_config
    group, world = cp._ulysses_mesh.get_group(), cp.ulysses_degree
    send, raw = _exchanges(state, group)
    q, k, v = (scatter_heads(x, world, send) for x in (call.query, call.key, call.value))
    mask = call.attn_mask
    if mask is not None and mask.shape[-1] == call.key.shape[1]:
        mask = _gather_mask(mask, group, world)
    out = call.attend(ctx, q, k, v, mask, call.return_lse)
    if not call.return_lse:
        return scatter_sequence(out, world, send)
    out, lse = out[0], out[1]
    lse = scatter_sequence(lse if lse.ndim == 4 else lse.unsqueeze(-1), world, raw)
    return scatter_sequence(out, world, send), lse.squeeze(-1)


# --------------------------------------------------------------------------------------------
# The replacement classes and the reference-counted swap of the module globals
# --------------------------------------------------------------------------------------------
# Two sets of replacements, as in the xfuser adapter. The shared classes stay installed while
# any model is patched and find the running patched pipeline through a ContextVar (eager mode
# only; a compiled unpatched model traces diffusers' own forward through them). While one of
# its generations runs, a patched pipeline's own classes (bound to its state, made once per
# pipeline) are installed instead: under torch.compile dynamo traces their forward with the
# state as a constant, the exchange being compactfusion's custom ops (``compactfusion.ops``),
# and guards the module global, so the pipeline gets its own graph.
def _owner(bound: DiffusersState | None, parallel_config) -> DiffusersState | None:
    """The patched state that compresses this call, or None (diffusers' own path)."""
    if torch.compiler.is_compiling():
        state = bound
    else:
        state = tracking.active_state()
    if not isinstance(state, DiffusersState) or parallel_config is None:
        return None
    cp = parallel_config.context_parallel_config
    return state if any(cp is c for c in state.cp_configs) else None


def _attention_class(base: type, bound: DiffusersState | None, name: str, compress) -> type:
    """A subclass of diffusers' templated attention ``base`` whose ``forward`` runs
    ``compress(state, ctx, call)`` for the calls of a patched pipeline and ``base.forward``
    for every other call."""

    def forward(ctx, *args):
        call = AttentionCall(*args)
        state = _owner(bound, call.parallel_config)
        if state is None:
            return base.forward(ctx, *args)
        return compress(state, ctx, call)

    doc = f"diffusers' {base.__name__}; compressed while a patched pipeline runs."
    return type(name, (base,), {"forward": staticmethod(forward), "__doc__": doc})


def _ring_class(base: type, bound: DiffusersState | None = None) -> type:
    def compress(state, ctx, call):
        if call.return_lse:  # no diffusers model asks for it; the strategies return no LSE
            _note(state, "ring_lse", "ring attention asked for its LSE: sent uncompressed")
            return base.forward(ctx, *call)
        return ring_attention(state, ctx, call)

    return _attention_class(base, bound, "CompactRingAttention", compress)


def _ulysses_class(base: type, bound: DiffusersState | None = None) -> type:
    return _attention_class(base, bound, "CompactUlyssesAttention", ulysses_attention)


def _seq_all_to_all_class(base: type, bound: DiffusersState | None = None) -> type:
    class CompactSeqAllToAllDim(base):
        """The unified mode's Ulysses all-to-all; compressed while a patched pipeline runs."""

        @staticmethod
        def forward(ctx, group, input, scatter_id=2, gather_id=1):
            state = bound if torch.compiler.is_compiling() else tracking.active_state()
            if (
                not isinstance(state, DiffusersState)
                or not any(group is g for g in state.ulysses_groups)
                or input.shape[-1] == 1  # the LSE: sent raw
            ):
                return base.forward(ctx, group, input, scatter_id, gather_id)
            _inference_only(input)
            send, _ = _exchanges(state, group)
            world = dist.get_world_size(group)
            if (scatter_id, gather_id) == (2, 1):
                return scatter_heads(input, world, send)
            if (scatter_id, gather_id) == (1, 2):
                return scatter_sequence(input, world, send)
            return base.forward(ctx, group, input, scatter_id, gather_id)

    return CompactSeqAllToAllDim


_FACTORIES: dict[str, Callable[..., type]] = {
    "TemplatedRingAttention": _ring_class,
    "TemplatedUlyssesAttention": _ulysses_class,
    "SeqAllToAllDim": _seq_all_to_all_class,
}


class Swap:
    """Holds diffusers' original classes while at least one model is patched."""

    users = 0
    originals: dict[str, Any] = {}

    @classmethod
    def acquire(cls) -> None:
        module = dispatch_module()
        if cls.users == 0:
            cls.originals = {name: getattr(module, name) for name in REPLACED}
            for name, original in cls.originals.items():
                setattr(module, name, _FACTORIES[name](original))
        cls.users += 1

    @classmethod
    def bound_classes(cls, state: DiffusersState) -> dict[str, type]:
        """``state``'s own replacement classes (call while the swap is held)."""
        return {name: _FACTORIES[name](original, state) for name, original in cls.originals.items()}

    @classmethod
    @contextlib.contextmanager
    def bound(cls, classes: dict[str, type]) -> Iterator[None]:
        """Install one pipeline's own classes for the duration of a generation."""
        with tracking.attributes_set(dispatch_module(), classes):
            yield

    @classmethod
    def release(cls) -> None:
        cls.users -= 1
        if cls.users == 0:
            module = dispatch_module()
            for name, original in cls.originals.items():
                setattr(module, name, original)
            cls.originals = {}
