"""The attention strategies every framework adapter shares.

Ring attention / patch parallelism exchange each rank's K and V of every attention layer. The
strategies below do that exchange with compressed residuals (``CompactConfig.mode``):

* ``allgather``: every rank encodes the residual of its local ``[K; V]`` (one payload), one
  all-gather of fixed-size payloads, peers' blocks decoded against their bases, then one
  attention call over the gathered keys/values. With codec ``raw`` this is plain patch
  parallelism. The exchange is one ``compactfusion::all_gather`` custom op (no host read,
  opaque to torch.compile).
* ``ring``: the payloads travel around the ring with ``batch_isend_irecv``; the relay of a
  payload is started before it is decoded and attended, so transfer overlaps compute, and
  per-block outputs are merged by log-sum-exp.
* ``stale`` (DistriFusion): the other ranks' K/V of the previous step, gathered
  asynchronously while the current step computes; only the local block is fresh. With codec
  ``raw`` the K/V travel in full precision; with a lossy codec as compressed residuals
  (started after the attention of step t, decoded before the attention of step t+1 into
  per-layer buffers, the receivers' bases).

Ulysses all-to-alls go through :func:`ulysses_all_to_all`, one residual site per (layer, n-th
exchange in the layer, source, destination), as ``compactfusion::all_to_all`` custom ops.

Site names are built from ``state.layer`` / ``state.layer_exchanges`` (plain attributes the
layer hooks set), so under torch.compile they are constants of the graph. The ``ring`` and
``stale`` strategies still run Python per call (P2P relays, asynchronous work handles) and read
payload headers back to the host: they compile with graph breaks around each exchange.

The framework-specific part is ``attend_fn(q, k, v, with_joint) -> (out, lse)``: attention of
the local queries over one block of keys/values (``[B, H, S, D]``), with the joint (text)
tokens that every rank holds included iff ``with_joint``; ``lse`` is ``[B, H, Sq]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .. import ops
from ..attention import merge
from ..collectives import (
    PendingGather,
    all_gather_flat,
    compressed_all_gather,
    compressed_all_to_all,
    finish_compressed_all_gather,
    gather_buffer,
    host_headers,
    is_retry_marker,
    raw_all_gather,
    retry_marker,
    run_bounded,
    start_compressed_all_gather,
)
from ..timeouts import host_timeout, wait_work
from .state import PipelineState

AttendFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]
]


def kv_attention(state: PipelineState, layer: str, attend_fn: AttendFn, query, key, value, group):
    """Attention of ``query`` over every rank's K/V of ``layer`` with the strategy of
    ``state.config.mode``; ``key``/``value`` are this rank's block ``[B, H, S, D]``."""
    mode = state.config.mode
    if mode == "stale":
        return stale_attention(state, layer, attend_fn, query, key, value, group)
    if mode == "ring":
        return ring_relay_attention(state, layer, attend_fn, query, key, value, group)
    return allgather_attention(state, layer, attend_fn, query, key, value, group)


def ulysses_all_to_all(state: PipelineState, layer: str, x: torch.Tensor, group) -> torch.Tensor:
    """A Ulysses all-to-all (equal splits along dim 0) as compressed residuals; the n-th
    exchange of a layer in a step is its own site."""
    world = dist.get_world_size(group)
    index = state.layer_exchanges
    state.layer_exchanges = index + 1
    flat = x.reshape(world, -1)
    width = row_width(flat.shape[1], x.shape[-1])
    out = _all_to_all(state, f"{layer}/a2a{index}", flat.reshape(world, -1, width), group)
    return out.reshape(x.shape)


def _all_to_all(state: PipelineState, site: str, x: torch.Tensor, group) -> torch.Tensor:
    # Eager: call the collective itself (no dispatcher round trip); compiling: the custom op.
    if torch.compiler.is_compiling():
        return ops.all_to_all(x, state.handle, site, ops.group_name(group))
    return compressed_all_to_all(state.compressor, site, x, group)


def _all_gather(state: PipelineState, site: str, x: torch.Tensor, group) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return ops.all_gather(x, state.handle, site, ops.group_name(group))
    return compressed_all_gather(state.compressor, site, x, group)


def kv_site(layer: str) -> str:
    """The site name of a layer's K/V exchange (every ring strategy uses it; a Ulysses
    exchange is ``"<layer>/a2a<n>"``)."""
    return f"{layer}/kv"


def row_width(numel: int, natural: int) -> int:
    """Channels per codec row: 256 consecutive values when they divide evenly (scale groups of
    256), else the tensor's own last dimension."""
    for width in (256, 128):
        if numel % width == 0:
            return width
    return natural


# --------------------------------------------------------------------------------------------
# The three ring-attention strategies
# --------------------------------------------------------------------------------------------
def local_kv(state: PipelineState, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The local ``[K; V]`` as the token-major matrix every codec sees: ``[B*S, 2*H*D]``, one
    row per token, channels ordered (K/V, head, d), so a codec's channel is a real K/V channel
    (channel scales can isolate outlier channels; lowrank sees tokens x features)."""
    b, h, s, d = key.shape
    kv = torch.stack([key.transpose(1, 2), value.transpose(1, 2)], 2)  # [B, S, 2, H, D]
    return kv.reshape(b * s, 2 * h * d)


def kv_from_matrix(state: PipelineState, m: torch.Tensor, like: torch.Tensor):
    """Inverse of ``local_kv``: ``(K, V)`` shaped like ``like`` ([B, H, S, D]; views of ``m``)."""
    b, h, s, d = like.shape
    kv = m.reshape(b, s, 2, h, d).permute(2, 0, 3, 1, 4)
    return kv[0], kv[1]


def _attend_gathered(attend_fn, query, blocks):
    """One attention call over the rank blocks ``[(K_r, V_r), ...]`` concatenated in rank
    order (joint text included once)."""
    ks, vs = zip(*blocks, strict=True)
    out, _ = attend_fn(query, torch.cat(ks, 2), torch.cat(vs, 2), True)
    return out


def _decoded_blocks(state, gathered, key, value, rank):
    """The exact local ``(K, V)`` and every peer's reconstructed block from ``gathered``."""
    return [
        (key, value) if r == rank else kv_from_matrix(state, gathered[r], key)
        for r in range(gathered.shape[0])
    ]


def allgather_attention(state, layer, attend_fn, query, key, value, group):
    local = local_kv(state, key, value)
    gathered = _all_gather(state, kv_site(layer), local, group)
    blocks = _decoded_blocks(state, gathered, key, value, dist.get_rank(group))
    return _attend_gathered(attend_fn, query, blocks)


def ring_relay_attention(state, layer, attend_fn, query, key, value, group):
    comp = state.compressor
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    pg = group if group is not None else dist.group.WORLD
    nxt = dist.get_global_rank(pg, (rank + 1) % world)
    prv = dist.get_global_rank(pg, (rank - 1) % world)
    local = local_kv(state, key, value)
    site = kv_site(layer)
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
    acc = merge(None, attend_fn(query, key, value, True))
    for step in range(1, world):
        for req in reqs:  # bounded on any device: the header is read on the host next
            wait_work(req, f"ring relay of {site!r}", comp.config.timeout_s)
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
        k_s, v_s = kv_from_matrix(state, block, key)
        acc = merge(acc, attend_fn(query, k_s, v_s, False))
    if saw_marker:
        # A rank's activation was not finite. Every payload has visited every rank, so all
        # ranks know it: redo this layer with a raw all-gather, which restarts the bases.
        return _raw_retry_attention(state, layer, attend_fn, query, key, value, group)
    out, _ = acc
    return out.to(query.dtype)


def _raw_retry_attention(state, layer, attend_fn, query, key, value, group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    local = local_kv(state, key, value)
    gathered = torch.empty((world, *local.shape), dtype=local.dtype, device=local.device)
    raw_all_gather(state.compressor, kv_site(layer), local, group, gathered)
    blocks = _decoded_blocks(state, gathered, key, value, rank)
    return _attend_gathered(attend_fn, query, blocks)


def stale_attention(state, layer, attend_fn, query, key, value, group):
    """DistriFusion: attend to the previous step's K/V of the other ranks (gathered
    asynchronously during the previous step) and the fresh local K/V."""
    rank = dist.get_rank(group)
    lossless = state.compressor.codec.lossless
    local = torch.stack([key, value]).contiguous() if lossless else local_kv(state, key, value)
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
    out = _attend_gathered(attend_fn, query, blocks)
    # Start gathering this step's K/V for the next step; it overlaps the rest of this step.
    # ``work`` (a torch work handle or a PendingGather) is waited for before any reuse.
    if lossless:
        buffer, work = _gather_full(state, local, group, async_op=True)
        state.stale[layer] = {"buffer": buffer, "work": work, "layout": layout}
    else:
        work = start_compressed_all_gather(
            state.compressor, kv_site(layer), local, group, async_op=True
        )
        world = dist.get_world_size(group)
        state.stale[layer] = {"work": work, "layout": layout, "world": world}
    return out


def _gather_full(state, local, group, async_op=False):
    """All-gather the full-precision local K/V (counted as stale bytes): ``(buffer, work)``
    with ``buffer`` shaped ``(world, *local.shape)``."""
    buffer = local.new_empty(dist.get_world_size(group) * local.numel())
    work = None
    if async_op:
        work = all_gather_flat(buffer, local.reshape(-1), group, async_op=True)
    else:
        run_bounded(
            "stale all-gather",
            state.config.timeout_s,
            local.device,
            all_gather_flat,
            buffer,
            local.reshape(-1),
            group,
        )
    state.stale_bytes += local.numel() * local.element_size()
    return buffer.view(-1, *local.shape), work


def _stale_gather_raw(state, local, group, entry, fresh):
    """The other ranks' full-precision K/V: the previous step's, or this step's gathered now
    (exact) at warm-up and after a change of shape or dtype."""
    if entry is not None:
        wait_stale(state, entry)
    if not fresh:
        return entry["buffer"]
    return _gather_full(state, local, group)[0]


def _stale_gather_compressed(state, layer, local, group, entry, fresh):
    """The other ranks' K/V decoded from the previous step's compressed payloads into this
    layer's persistent buffer (the bases of those sites). At warm-up, after a change of shape
    or dtype, or when a rank's K/V were not finite (a retry marker), this step's K/V are
    gathered raw instead, which restarts every base exactly (the previous payloads are then
    waited for and dropped on every rank alike)."""
    comp, site = state.compressor, kv_site(layer)
    buf_key = (layer, "stale", tuple(local.shape), local.dtype)
    buf = gather_buffer(local, dist.get_world_size(group), state.kv_buffers.get(buf_key))
    if entry is not None:
        pending = entry["work"]
        if not fresh and finish_compressed_all_gather(comp, pending, buf):
            return _retained(state, site, buf_key, buf)
        pending.wait()  # every rank reaches the same decision: all gather raw below
    return _retained(state, site, buf_key, raw_all_gather(comp, site, local, group, buf))


def _retained(state, site, buf_key, buf):
    """``buf``, kept for the next step only while peers' bases live in it."""
    if state.retains_gathered(site):
        state.kv_buffers[buf_key] = buf
    else:
        state.kv_buffers.pop(buf_key, None)
    return buf


def settle_stale(state: PipelineState) -> None:
    """Decode the ``stale`` mode's payloads still in flight (started after each layer's last
    attention) into their bases, so that every receiver's base matches its sender's again
    (every rank must call it). A layer whose last payload was a retry marker is restarted
    on every rank instead. Leaves nothing in flight."""
    comp = state.compressor
    for layer, entry in list(state.stale.items()):
        work = entry["work"]
        if isinstance(work, PendingGather):
            (shape, dtype), world = entry["layout"], entry["world"]
            buf_key = (layer, "stale", shape, dtype)
            buf = state.kv_buffers.get(buf_key)
            if buf is None:
                buf = work.payloads.new_empty((world, *shape), dtype=dtype)
            if not finish_compressed_all_gather(comp, work, buf):
                comp.restart([(kv_site(layer), r) for r in range(world)])
        else:
            wait_stale(state, entry)
    state.stale.clear()


def wait_stale(state: PipelineState, entry: dict) -> None:
    """Wait for a stale-mode gather started earlier (a ``PendingGather`` bounds itself; a
    full-precision gather is bounded by ``timeout_s`` when its buffer is on the CPU)."""
    work = entry.get("work")
    if isinstance(work, PendingGather):
        work.wait()
    elif work is not None:
        bound = host_timeout(state.config.timeout_s, entry["buffer"].device)
        wait_work(work, "stale all-gather", bound)
