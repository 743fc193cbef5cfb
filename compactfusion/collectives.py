"""Compressed collectives over ``torch.distributed``: all-gather and all-to-all of residuals.

Each rank encodes what it sends with a :class:`ResidualCompressor` (one site per
(site, source rank) for an all-gather, per (site, source, destination) for an all-to-all),
the uint8 payloads travel in one collective of fixed-size buffers, and every receiver decodes
its peers' payloads against its own copy of their bases. A rank's own block is never encoded:
it stays exact.

With a lossless codec (``raw``) they are plain collectives (no headers, no bases: there is
nothing to compress against). Otherwise :func:`compressed_all_gather` and
:func:`compressed_all_to_all` read nothing back to the host:
all ranks are at the same call of the same site with the same shapes, so the compressor's
shared state tells every rank whether the exchange is compressed and how large each payload
is (``check_consistent`` verifies the configs once), and receivers decode without reading
headers. A rank whose values are not finite (or out of range) marks its payloads with a
device-side flag instead of changing their size; receivers then keep their bases and the
problem is acted on by ``ResidualCompressor.end_step``, once per denoising step, which
restarts the exchange raw on every rank. Call ``end_step`` once per step on every rank.

The ring relay and the asynchronous all-gather of the ``stale`` mode
(``start_compressed_all_gather`` / ``finish_compressed_all_gather``) still use the older
protocol: a rank whose input is not finite sends a small *retry marker* instead of a payload,
which every rank learns about by reading the payload headers (one host read per call), and
then every rank repeats the exchange with raw payloads, restarting the bases exactly.

With ``CompactConfig(timeout_s=...)`` each collective here waits at most that long for its
peers and raises :class:`~compactfusion.timeouts.CollectiveTimeout` naming the exchange (on
the CPU per collective; on GPUs the steady-state exchanges are bounded once per step by
``ResidualCompressor.end_step``, see ``compactfusion.timeouts``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .codecs import encode_header
from .codecs.base import MAX_HEADER_NBYTES
from .residual import ResidualCompressor
from .timeouts import CollectiveTimeout, host_timeout, wait_work

RETRY_MARKER_ID = 255


def all_gather_flat(out: torch.Tensor, inp: torch.Tensor, group=None, async_op: bool = False):
    """All-gather ``inp`` into ``out`` (``world * inp.numel()`` elements, rank order).

    torch 2.13 renamed ``all_gather_into_tensor`` to ``all_gather_single``; use whichever this
    torch has (looked up at call time, so wrappers installed by tests see the traffic).
    """
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, group=group, async_op=async_op)


def run_bounded(
    what: str, timeout_s: float | None, device: torch.device, fn, *args: Any, **kwargs: Any
) -> None:
    """Run the collective ``fn(*args, **kwargs)`` to completion, as torch would without
    ``async_op``, waiting at most ``timeout_s`` when its tensors live on the CPU (started
    asynchronously, then ``work.wait(timeout)``); :class:`CollectiveTimeout` names ``what``.
    On a GPU, or with ``timeout_s=None``, it is the plain synchronous call."""
    bound = host_timeout(timeout_s, device)
    if bound is None:
        fn(*args, **kwargs)
    else:
        wait_work(fn(*args, async_op=True, **kwargs), what, bound)


def group_name(group: dist.ProcessGroup | None) -> str:
    """The name of ``group`` (None: the default group), the same on every rank of it."""
    return (group if group is not None else dist.group.WORLD).group_name


class ConfigMismatchError(ValueError):
    """Ranks were configured differently; raised on every rank."""


def check_consistent(
    description: str, group: dist.ProcessGroup | None = None, timeout_s: float | None = None
) -> None:
    """Raise ``ConfigMismatchError`` on every rank unless all ranks pass the same description.

    Exchanges a 32-byte hash of ``description`` (e.g. a config fingerprint plus the payload
    layout) with one all-gather, so mismatched ranks fail with the same clear error instead of
    hanging or decoding garbage. With ``timeout_s`` a rank whose peers do not all reach the
    check within that many seconds raises :class:`CollectiveTimeout` (on any device: the
    result is read back to the host anyway).
    """
    digest = hashlib.sha256(description.encode()).digest()
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(device_for(group))
    world = dist.get_world_size(group)
    gathered = torch.empty(world * len(digest), dtype=torch.uint8, device=mine.device)
    work = all_gather_flat(gathered, mine, group, async_op=timeout_s is not None)
    wait_work(work, "cross-rank configuration check", timeout_s)
    rows = gathered.view(world, len(digest)).cpu()
    bad = [r for r in range(world) if not torch.equal(rows[r], rows[0])]
    if bad:
        raise ConfigMismatchError(
            f"compactfusion configuration differs across ranks (ranks {bad} differ from rank "
            f"0): every rank must patch with the same CompactConfig and the same shapes"
        )


def device_for(group: dist.ProcessGroup | None) -> torch.device:
    """The device a collective over ``group`` exchanges host-made tensors on (the current
    CUDA device for NCCL, else the CPU)."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def retry_marker(x: torch.Tensor, nbytes: int) -> torch.Tensor:
    """A payload-sized buffer announcing "my input was not finite: retry this exchange raw"."""
    hdr = encode_header(RETRY_MARKER_ID, x.dtype, tuple(x.shape))
    out = torch.zeros(nbytes, dtype=torch.uint8, device=x.device)
    out[: hdr.numel()] = hdr.to(x.device)
    return out


def host_headers(payloads: torch.Tensor) -> list[bytes]:
    """The header bytes of each row of a ``(n, nbytes)`` payload buffer, read with one
    device-to-host copy (instead of one synchronising read per payload on CUDA)."""
    width = min(payloads.shape[1], MAX_HEADER_NBYTES)
    rows = payloads[:, :width].cpu()
    return [bytes(row.tolist()) for row in rows]


def is_retry_marker(header: bytes) -> bool:
    """Whether a received buffer (given by its header bytes) is a retry marker."""
    return header[3] == RETRY_MARKER_ID


def _encode_fixed(
    comp: ResidualCompressor, key: Hashable, x: torch.Tensor, nbytes: int
) -> tuple[torch.Tensor, bool]:
    """``(buffer, is_marker)``: the payload, or a retry marker when ``x`` was sent raw because
    it was not finite (the raw payload would not fit the agreed size)."""
    payload = comp.encode(key, x)
    if payload.numel() != nbytes:
        return retry_marker(x, nbytes), True
    return payload, False


def compressed_all_gather(
    comp: ResidualCompressor,
    site: Hashable,
    x: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """All-gather ``x`` (same shape on every rank) as compressed residuals, without a host read.

    Returns ``out`` (or a new tensor) of shape ``(world, *x.shape)`` whose slot ``r`` holds
    rank ``r``'s reconstructed block (this rank's own slot is ``x`` exactly). The bases live in
    ``comp``; ``out`` is only written. A block whose sender's values were not finite is
    decoded as it came (non-finite values stay visible) and leaves the bases alone; see
    ``ResidualCompressor.end_step``.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    out = gather_buffer(x, world, out)
    timeout_s = comp.config.timeout_s
    if comp.codec.lossless:  # nothing to compress against: a plain all-gather, no bases
        run_bounded(
            f"all-gather of {site!r}",
            timeout_s,
            x.device,
            all_gather_flat,
            out.view(-1),
            x.contiguous().view(-1),
            group,
        )
        comp.count_plain((site, rank), "send", x)
        for r in range(world):
            if r != rank:
                comp.count_plain((site, r), "recv", out[r])
        return out
    shape, dtype = tuple(x.shape), x.dtype
    compressed = comp.exchange_compressed(site, [(site, r) for r in range(world)], shape, dtype)
    nbytes = comp.exchange_nbytes(shape, dtype, compressed)
    (payload,) = comp.send(site, [((site, rank), x)], compressed)
    comp.set_process_group(site, group_name(group))
    gathered = torch.empty(world * nbytes, dtype=torch.uint8, device=x.device)
    what = f"compressed all-gather of {site!r}"
    run_bounded(what, timeout_s, x.device, all_gather_flat, gathered, payload, group)
    rows = gathered.view(world, nbytes)
    for r in range(world):
        if r != rank:
            comp.receive(site, (site, r), rows[r], out[r], compressed)
    out[rank].copy_(x)
    return out


def gather_buffer(x: torch.Tensor, world: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out`` checked to be a ``(world, *x.shape)`` tensor of ``x``'s dtype, or a new one."""
    if out is None:
        return torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (world, *x.shape) or out.dtype != x.dtype:
        raise ValueError(
            f"out must be a {(world, *x.shape)} {x.dtype} tensor, got {tuple(out.shape)} "
            f"{out.dtype}"
        )
    return out


@dataclass
class PendingGather:
    """A compressed all-gather started by :func:`start_compressed_all_gather`."""

    site: Hashable
    rank: int
    payloads: torch.Tensor  # (world, nbytes) uint8; complete once ``work`` is
    work: Any = None  # the asynchronous work handle (None: already complete)
    timeout_s: float | None = None  # CompactConfig.timeout_s of the compressor

    def wait(self) -> None:
        """Wait for the gather (at most ``timeout_s``: its payloads are read on the host
        next, so the bound costs nothing extra on any device)."""
        if self.work is not None:
            work, self.work = self.work, None
            wait_work(work, f"stale all-gather of {self.site!r}", self.timeout_s)


def start_compressed_all_gather(
    comp: ResidualCompressor,
    site: Hashable,
    x: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
) -> PendingGather:
    """Encode ``x`` (this rank's block of ``site``; updates its base) and gather every rank's
    payload, asynchronously with ``async_op``. Every rank must call it, in the same order as
    its other collectives, and then either :func:`finish_compressed_all_gather` or, to drop
    the payloads, ``PendingGather.wait`` followed by :func:`raw_all_gather` (which restarts
    the bases the dropped payloads would have advanced)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    key = (site, rank)
    nbytes = comp.payload_nbytes(key, tuple(x.shape), x.dtype)
    payload, _ = _encode_fixed(comp, key, x, nbytes)
    gathered = torch.empty(world * nbytes, dtype=torch.uint8, device=x.device)
    timeout_s = comp.config.timeout_s
    work = all_gather_flat(gathered, payload, group, async_op=async_op or timeout_s is not None)
    return PendingGather(site, rank, gathered.view(world, nbytes), work, timeout_s)


def finish_compressed_all_gather(
    comp: ResidualCompressor, pending: PendingGather, out: torch.Tensor
) -> bool:
    """Wait for a started gather and decode each peer's payload into ``out[r]``, which becomes
    that site's base (this rank's own slot is left alone).

    Returns False, decoding nothing, when a rank sent a retry marker (its input was not
    finite): every rank sees the same markers, and each must then repeat the exchange with
    :func:`raw_all_gather`, which restarts the bases exactly.
    """
    pending.wait()
    headers = host_headers(pending.payloads)
    if any(is_retry_marker(h) for h in headers):
        return False
    _decode_peers(comp, pending.site, pending.rank, pending.payloads, headers, out)
    return True


def _decode_peers(comp, site, rank, payloads, headers, out):
    for r in range(payloads.shape[0]):
        if r != rank:
            comp.decode((site, r), payloads[r], out=out[r], header=headers[r])


def raw_all_gather(comp, site, x, group, out):
    """All-gather raw payloads (restarts every rank's bases of ``site`` exactly)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nbytes = comp.raw_payload_nbytes(tuple(x.shape), x.dtype)
    payload = comp.encode((site, rank), x, force_raw=True)
    gathered = torch.empty(world * nbytes, dtype=torch.uint8, device=x.device)
    # The headers are read on the host next: bounded on any device.
    work = all_gather_flat(gathered, payload, group, async_op=True)
    wait_work(work, f"raw all-gather of {site!r}", comp.config.timeout_s)
    payloads = gathered.view(world, nbytes)
    out = gather_buffer(x, world, out)
    _decode_peers(comp, site, rank, payloads, host_headers(payloads), out)
    out[rank].copy_(x)
    return out


def compressed_all_to_all(
    comp: ResidualCompressor,
    site: Hashable,
    x: torch.Tensor,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """All-to-all with equal splits along dim 0, as compressed residuals, without a host read.

    ``x`` has shape ``(world * c, ...)``; chunk ``j`` goes to rank ``j``. Returns a tensor of
    the same shape whose chunk ``i`` is rank ``i``'s chunk for this rank (this rank's own
    chunk exact), like ``dist.all_to_all_single`` with equal splits. A sender whose chunks are
    not all finite flags every chunk it sends, so every rank of the group learns of it.
    ``site_policy`` must give the same answer for every (source, destination) pair of a site.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.dim() == 0 or x.shape[0] % world:
        raise ValueError(
            f"all-to-all input dim 0 ({x.shape[0] if x.dim() else 'scalar'}) must be divisible "
            f"by the group size {world}"
        )
    chunks = x.chunk(world, dim=0)
    shape, dtype = tuple(chunks[0].shape), x.dtype
    peers = [j for j in range(world) if j != rank]
    timeout_s = comp.config.timeout_s
    if comp.codec.lossless:  # nothing to compress against: a plain all-to-all, no bases
        out = torch.empty_like(x)
        what = f"all-to-all of {site!r}"
        run_bounded(
            what, timeout_s, x.device, dist.all_to_all_single, out, x.contiguous(), group=group
        )
        out_chunks = out.chunk(world, dim=0)
        for j in peers:
            comp.count_plain((site, rank, j), "send", chunks[j])
        for i in peers:
            comp.count_plain((site, i, rank), "recv", out_chunks[i])
        return out
    keys = [(site, rank, j) for j in peers] + [(site, i, rank) for i in peers]
    compressed = comp.exchange_compressed(site, keys, shape, dtype)
    nbytes = comp.exchange_nbytes(shape, dtype, compressed)
    payloads = comp.send(site, [((site, rank, j), chunks[j]) for j in peers], compressed)
    comp.set_process_group(site, group_name(group))
    send = torch.empty(world, nbytes, dtype=torch.uint8, device=x.device)
    send[rank].zero_()  # this rank's own row travels to itself and is ignored
    for j, payload in zip(peers, payloads, strict=True):
        send[j] = payload
    recv = torch.empty_like(send)
    what = f"compressed all-to-all of {site!r}"
    run_bounded(what, timeout_s, x.device, dist.all_to_all_single, recv, send, group=group)
    out = torch.empty_like(x)
    out_chunks = out.chunk(world, dim=0)
    out_chunks[rank].copy_(chunks[rank])
    for i in peers:
        comp.receive(site, (site, i, rank), recv[i], out_chunks[i], compressed)
    return out


__all__ = [
    "CollectiveTimeout",
    "ConfigMismatchError",
    "PendingGather",
    "check_consistent",
    "compressed_all_gather",
    "compressed_all_to_all",
    "finish_compressed_all_gather",
    "gather_buffer",
    "group_name",
    "host_headers",
    "is_retry_marker",
    "raw_all_gather",
    "retry_marker",
    "run_bounded",
    "start_compressed_all_gather",
]
