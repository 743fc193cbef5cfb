"""Bounded waits for compactfusion's own collectives (``CompactConfig.timeout_s``).

A rank whose peer raised and stayed alive (or hangs) would otherwise wait in a collective until
the process group's own timeout: 30 minutes for gloo groups created without one (xfuser's
subgroups), 10 minutes for NCCL. With ``timeout_s`` set, compactfusion waits for the work it
started at most that long and raises :class:`CollectiveTimeout` naming the exchange.

What can be bounded, and where (torch 2.13):

* Tensors on the CPU (gloo): every compressed all-gather / all-to-all, ring relay transfer,
  stale-mode gather, the cross-rank configuration check and ``verify_bases`` is started
  asynchronously and waited for with ``work.wait(timeout)``. The host waits for CPU
  collectives anyway, so this costs nothing extra (no host read is added).
* Tensors on a GPU (NCCL): waiting on the host per collective would stall the host on every
  exchange, so the steady-state all-gather / all-to-all are not waited for one by one; instead
  the step's one host read (``ResidualCompressor.end_step``) waits for the step's GPU work at
  most ``timeout_s`` (it polls a CUDA event). Exchanges that read back to the host anyway (the
  ring relay's headers, the stale mode's gathers, the cross-rank check, ``verify_bases``)
  use ``work.wait(timeout)``, which NCCL implements as a bounded blocking wait.
* Not bounded: work inside a compiled graph other than compactfusion's custom ops, the
  framework's own collectives (xfuser, diffusers), and a host that blocks before the step
  ends (a CUDA launch queue that filled up behind a stuck NCCL kernel). Those are bounded only
  by the process group's timeout and NCCL's watchdog; see the README section "Timeouts".

After a :class:`CollectiveTimeout` the operation torch gave up waiting for is still pending
(gloo cannot cancel it; after a point-to-point timeout gloo closes the connection): treat the
process group as unusable and end the process, or destroy the group once the peer has exited.
"""

from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable
from typing import Any

import torch

_POLL_S = 1e-4  # how often a bounded wait for GPU work looks again


class CollectiveTimeout(TimeoutError):
    """A compactfusion collective did not complete within ``CompactConfig.timeout_s``: a peer
    rank is not taking part (it raised and stayed alive, hangs, or is far behind).

    Attributes:
        site: the exchange that timed out (e.g. ``"all-gather of 'blocks.0.attn/kv'"``).
        timeout_s: the bound that was exceeded, in seconds.
    """

    def __init__(self, message: str, site: str = "", timeout_s: float = math.nan):
        super().__init__(message)
        self.site, self.timeout_s = site, timeout_s


def timeout_error(site: str, timeout_s: float, cause: str = "") -> CollectiveTimeout:
    """The :class:`CollectiveTimeout` for ``site``: names the site, the bound and what to do."""
    detail = f" ({cause})" if cause else ""
    return CollectiveTimeout(
        f"compactfusion: the {site} did not complete within {timeout_s:g} s "
        f"(CompactConfig.timeout_s){detail}: a peer rank is not taking part (it raised and "
        "stayed alive, hangs, or is far behind). The operation is still pending in the process "
        "group, which cannot be used again: end this process (or destroy the group once the "
        "peer has exited).",
        site,
        timeout_s,
    )


def validate_timeout(timeout_s: Any, name: str = "timeout_s") -> float | None:
    """``timeout_s`` as a positive finite float, or None; ``ValueError`` otherwise."""
    if timeout_s is None:
        return None
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, (int, float))
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise ValueError(
            f"{name}: must be a positive number of seconds or None (the process group's own "
            f"timeout), got {timeout_s!r}"
        )
    return float(timeout_s)


def wait_work(work: Any, site: str, timeout_s: float | None) -> None:
    """Wait for a ``torch.distributed`` work handle, at most ``timeout_s`` seconds (None: as
    long as the process group allows, exactly ``work.wait()``); raise
    :class:`CollectiveTimeout` naming ``site`` when the bound is exceeded."""
    if work is None:
        return
    if timeout_s is None:
        work.wait()
        return
    try:
        done = work.wait(timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as exc:  # gloo: "Operation timed out!"; NCCL: "... timed out ..."
        if "timed out" in str(exc).lower():
            raise timeout_error(site, timeout_s, str(exc).strip()) from exc
        raise
    if done is False:  # backends that report a timeout by returning False
        raise timeout_error(site, timeout_s)


def host_timeout(timeout_s: float | None, device: torch.device) -> float | None:
    """The bound to apply to one collective on ``device``: ``timeout_s`` for CPU tensors (the
    host waits for them anyway), None for GPU tensors (their steady-state exchanges are
    bounded once per step by :func:`wait_device`, not one by one)."""
    return timeout_s if device.type == "cpu" else None


def wait_until(done: Callable[[], bool], site: str, timeout_s: float) -> None:
    """Poll ``done()`` until it returns True; :class:`CollectiveTimeout` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            raise timeout_error(site, timeout_s)
        time.sleep(_POLL_S)


def wait_device(device: torch.device, site: str, timeout_s: float | None) -> None:
    """Wait at most ``timeout_s`` for the work queued so far on ``device``'s current stream
    (a CUDA event polled from the host: no synchronisation, no host read). Nothing to wait
    for on the CPU, or with ``timeout_s=None`` (the caller's own read then waits unbounded)."""
    if timeout_s is None or device.type != "cuda":
        return
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    wait_until(event.query, site, timeout_s)


__all__ = [
    "CollectiveTimeout",
    "host_timeout",
    "timeout_error",
    "validate_timeout",
    "wait_device",
    "wait_until",
    "wait_work",
]
