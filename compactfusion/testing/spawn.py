"""Run a function on several spawned ranks of a ``torch.distributed`` world, for tests.

:func:`spawn_ranks` starts one process per rank (``spawn`` start method, so nothing is inherited
from the test process by fork), initialises the default process group over TCP on a free local
port, calls the function, and returns every rank's result. It never hangs: the first rank that
raises fails the whole call, a rank that dies without reporting fails it too, and a wall-clock
timeout kills every child.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "spawn_ranks"]

_POLL_S = 0.2  # how often the parent checks for dead children while waiting for results
_EXIT_GRACE_S = 10.0  # after success, how long ranks may take to exit before being killed
_KILL_GRACE_S = 5.0  # how long to wait for a killed child to be reaped
_OTHERS_S = 3.0  # after a failure, how long to collect the other ranks' reports


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The port is found by binding to port 0 and closing the socket, so another process could
    take it before it is used; for tests on one machine that race is rare enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    backend: str = "gloo",
    env: Mapping[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks and return the results.

    Each child sets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (so
    code that initialises from ``env://`` finds the same world), applies ``env``, calls
    ``torch.distributed.init_process_group`` over ``tcp://127.0.0.1:<free port>``, runs ``fn``
    and destroys the process group in ``finally`` (if ``fn`` has not already done so). Each rank
    uses ``OMP_NUM_THREADS`` intra-op threads when that is set (in ``env`` or inherited), and
    otherwise, with gloo, ``cpu_count // world_size``, so that ranks do not oversubscribe the
    CPU. Ranks are daemon processes: ``fn`` may run subprocesses but not start
    ``multiprocessing`` children of its own.

    Args:
        fn: a picklable (module-level) function called as ``fn(rank, world_size, *args)``.
            Its return value must be picklable; tensors are copied back to the parent.
        world_size: number of ranks, >= 1.
        *args: picklable extra arguments passed to every rank.
        timeout: wall-clock seconds for the whole call (start-up included).
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (needs ``torch.cuda.device_count() >=
            world_size``; rank ``r`` uses ``cuda:r``).
        env: extra environment variables set in each child before the process group is
            created (e.g. ``GLOO_SOCKET_IFNAME``).

    Returns:
        The results of ``fn``, indexed by rank.

    Raises:
        ValueError: for a bad ``world_size``, ``timeout`` or ``backend``.
        TypeError: if ``fn`` cannot be pickled.
        RuntimeError: if NCCL is asked for without enough GPUs, or if any rank raised (the
            message names the rank and contains its traceback) or died without reporting.
        TimeoutError: if the ranks did not all finish within ``timeout`` seconds.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise RuntimeError(
            f"backend='nccl' with {world_size} ranks needs {world_size} CUDA devices, "
            f"found {torch.cuda.device_count()}"
        )
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"fn must be picklable (a module-level function), got {fn!r}: {exc}"
        ) from exc

    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    port = free_port()
    child_env = dict(env or {})
    processes = [
        ctx.Process(
            target=_run_rank,
            args=(fn, rank, world_size, args, port, backend, child_env, timeout, results_queue),
            name=f"spawn_ranks-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    exit_grace = 0.0  # on failure, kill at once: surviving ranks may be stuck in a collective
    try:
        for process in processes:
            process.start()
        results = _collect(processes, results_queue, world_size, deadline, timeout)
        exit_grace = _EXIT_GRACE_S  # let ranks finish their normal exit (finalizers)
        return results
    finally:
        _stop(processes, exit_grace)
        results_queue.close()
        results_queue.join_thread()


def _collect(processes, results_queue, world_size, deadline, timeout) -> list[Any]:
    """Wait for one report per rank; raise on the first failure, a silent death or timeout."""
    results: dict[int, Any] = {}
    while len(results) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(results))
            raise TimeoutError(
                f"spawn_ranks: ranks {missing} did not finish within {timeout:g} s "
                "(all ranks killed)"
            )
        try:
            rank, ok, payload = results_queue.get(timeout=min(remaining, _POLL_S))
        except queue_module.Empty:
            _check_silent_deaths(processes, results_queue, results)
            continue
        if not ok:
            raise _failure(rank, payload, processes, results_queue, results)
        results[rank] = _unpickle_result(rank, payload)
    return [results[rank] for rank in range(world_size)]


def _failure(rank, payload, processes, results_queue, results) -> RuntimeError:
    """The error for a failed rank, with what the other ranks reported meanwhile: a rank that
    fails because a peer died ("Connection closed by peer") often reports first, and the
    peer's own traceback or exit code is the cause."""
    world_size = len(processes)
    parts = [f"spawn_ranks: rank {rank} of {world_size} failed:\n{payload}"]
    heard = set(results) | {rank}
    deadline = time.monotonic() + _OTHERS_S
    while len(heard) < world_size and time.monotonic() < deadline:
        try:
            other, ok, other_payload = results_queue.get(timeout=_POLL_S)
        except queue_module.Empty:
            if all(r in heard or p.exitcode is not None for r, p in enumerate(processes)):
                break
            continue
        heard.add(other)
        if not ok:
            parts.append(f"rank {other} failed too:\n{other_payload}")
    for other, process in enumerate(processes):
        if other not in heard and process.exitcode is not None:
            parts.append(f"rank {other} exited with code {process.exitcode} without reporting")
    return RuntimeError("\n".join(parts))


def _unpickle_result(rank: int, payload: bytes) -> Any:
    """Unpickle a rank's result in the parent, which may lack the child's imports/patches."""
    try:
        return pickle.loads(payload)
    except Exception as exc:
        raise RuntimeError(
            f"spawn_ranks: the result of rank {rank} could not be unpickled in the parent "
            f"process ({type(exc).__name__}: {exc}); return plain Python objects and tensors"
        ) from exc


def _check_silent_deaths(processes, results_queue, results) -> None:
    """Raise if a child exited without reporting (killed by a signal, ``os._exit``, ...)."""
    for rank, process in enumerate(processes):
        if rank in results or process.exitcode is None:
            continue
        # Its report may still be in flight: a child flushes the queue before it exits.
        try:
            reported_rank, ok, payload = results_queue.get(timeout=1.0)
        except queue_module.Empty:
            raise RuntimeError(
                f"spawn_ranks: rank {rank} exited with code {process.exitcode} "
                "without reporting a result"
            ) from None
        if not ok:
            raise _failure(reported_rank, payload, processes, results_queue, results)
        results[reported_rank] = _unpickle_result(reported_rank, payload)
        return


def _stop(processes, exit_grace: float) -> None:
    """Give children ``exit_grace`` seconds to exit, kill the rest, and reap all of them.

    Killing a rank in the middle of its normal exit would interrupt multiprocessing's own
    clean-up (e.g. the unregistration of semaphores), hence the grace period after success.
    """
    grace_deadline = time.monotonic() + exit_grace
    for process in processes:
        if process.pid is not None:
            process.join(max(0.0, grace_deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        if process.pid is not None:
            process.join(_KILL_GRACE_S)


def _run_rank(fn, rank, world_size, args, port, backend, env, timeout, results_queue) -> None:
    """Child entry point: set up the world, run ``fn``, report ``(rank, ok, payload)``."""
    try:
        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
            }
        )
        os.environ.update(env)
        # torch was imported (to unpickle this function) before env was applied: set threads now.
        if os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        elif backend == "gloo":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        report = (rank, True, pickle.dumps(result))
    except BaseException:  # report everything, including KeyboardInterrupt/SystemExit
        report = (rank, False, traceback.format_exc())
    results_queue.put(report)
    results_queue.close()
    results_queue.join_thread()
