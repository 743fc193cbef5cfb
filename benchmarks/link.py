"""End-to-end time per denoising step over a real rate-limited link, per communication method.

Two ranks run xfuser's FLUX pipeline (a FLUX-shaped random transformer built from a config:
heads x 128 channels, a double-stream block and a few single-stream blocks, bf16) in two
network namespaces joined by a veth pair (``benchmarks/netns.py``). Each end of the pair has a
token-bucket filter (``tc qdisc ... tbf rate R burst B latency 50ms``; netem is not needed),
and gloo is told to use that interface (``GLOO_SOCKET_IFNAME``), so every byte the ranks
exchange crosses a link of rate R in each direction. Only the two addresses inside the
namespaces are used. TCP inside the namespaces uses reno (``--tcp-cc``; see
``DEFAULT_TCP_CC``), and the packets tbf dropped are counted per rate.

For each link rate the same two rank processes run every method in turn (see ``METHODS``):
uncompressed patch parallel (``raw`` all-gather), uncompressed ring relay, ``stale``
(DistriFusion), Ulysses uncompressed and int2, each codec in all-gather mode, int2 in ring
mode, and int2 and int1 in stale mode (compressed DistriFusion). Per method and rate the CSV
row holds the time per denoising step (median, min, max, quartiles over the timed steps of
one generation, max over the two ranks of each step), the
payload bytes this rank sent per step (``compactfusion.stats``), the bytes that actually left
the interface per step (``/sys/class/net/<veth>/statistics/tx_bytes``, TCP/IP headers
included; namespaces only), and the speed-up against uncompressed all-gather at the same rate.
Rows are stamped with the CPU, torch/xfuser versions, link settings and model sizes; the plot
(time per step vs link rate, log x) is drawn from the CSV.

What to expect. Per step, uncompressed all-gather costs ``k + 1/B`` per byte of K/V shard
(``k``: compute per byte, ``B``: link bytes/s); a codec with wire ratio ``rho`` costs
``k + c + 1/(rho B)`` (``c``: encode + base update + peer decode per byte). A speed-up of 3x
needs ``(1 - 3/rho) / B >= 2k + 3c``. On a GPU (FLUX on an H100, as ``benchmarks/model.py``
predicts it, not measured: ``k`` ~ 0.1 ns/B, fused kernels ``c`` ~ 1e-3 ns/B) that holds up to
tens of Gbit/s. On a CPU both are ~100-1000x larger (measured here: ``k`` ~ 36 ns/B, the torch
reference int1/int2 ``c`` ~ 1-2 ns/B) while a 1 Gbit/s link moves a byte in 8 ns: even a free
codec could not be 3x faster there, and
the crossover moves to slow links; hence the 25 Mbit/s default rate. ``--sizes`` and
``--rates`` let you explore it.

    sudo python benchmarks/link.py                # 25mbit,100mbit,1gbit,10gbit,unlimited
    sudo python benchmarks/link.py --rates 50mbit,1gbit --steps 8 --out /tmp/link
    python benchmarks/link.py --smoke             # seconds; loopback without root

Needs root (``ip netns``, ``tc``) except in ``--smoke`` mode, which falls back to loopback
(no rate limit) and says so. Namespaces are named ``cflink<pid>a/b``; they are removed in a
``finally``, and ones left by a crashed earlier run (whose pid is gone) are removed at start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without installing

from benchmarks._report import machine_stamp, read_csv, write_csv  # noqa: E402
from benchmarks.netns import TBF_LATENCY_MS, NamespaceLink, netns_available  # noqa: E402

# --------------------------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One communication method: a ``CompactConfig`` plus the parallel layout."""

    label: str
    codec: str
    mode: str = "allgather"
    ulysses: bool = False  # ulysses_degree = world (else ring_degree = world)
    codec_params: dict[str, Any] = field(default_factory=dict)


BASELINE = "raw-allgather"  # speed-ups are relative to this method at the same rate
METHODS: tuple[Method, ...] = (
    Method(BASELINE, "raw"),
    Method("raw-ring", "raw", mode="ring"),
    Method("stale", "raw", mode="stale"),
    Method("int2", "int2"),
    Method("int1", "int1"),
    Method("fp8", "fp8"),
    Method("nm_sparse", "nm_sparse", codec_params={"n": 1, "m": 4}),
    Method("lowrank", "lowrank", codec_params={"rank": 16, "factor_dtype": "bf16"}),
    Method("int2-ring", "int2", mode="ring"),
    Method("int2-stale", "int2", mode="stale"),
    Method("int1-stale", "int1", mode="stale"),
    Method("ulysses-raw", "raw", ulysses=True),
    Method("ulysses-int2", "int2", ulysses=True),
)


@dataclass(frozen=True)
class Sizes:
    """The FLUX-shaped model and image. Tokens = (height / 4) x (width / 4) (tiny VAE factor 2,
    FLUX 2x2 packing); each rank holds tokens / world of them."""

    heads: int
    head_dim: int
    num_layers: int  # double-stream blocks
    num_single_layers: int
    height: int
    width: int
    dtype: str = "bfloat16"
    text_len: int = 8

    @property
    def image_tokens(self) -> int:
        return (self.height // 4) * (self.width // 4)

    def kv_shard_bytes(self, world: int) -> int:
        """Bytes of one layer's local image K+V on one rank (what all-gather sends)."""
        elem = 2 if self.dtype == "bfloat16" else 4
        return 2 * (self.image_tokens // world) * self.heads * self.head_dim * elem


# 8 x 128 = 1024 channels, 1024 image tokens (512 per rank): one layer's K+V shard is 2 MiB;
# 4 attention layers. FLUX.1 is 24 x 128 with 4096 tokens and 57 layers.
FULL_SIZES = Sizes(heads=8, head_dim=128, num_layers=1, num_single_layers=3, height=128, width=128)
SMOKE_SIZES = Sizes(
    heads=2, head_dim=32, num_layers=1, num_single_layers=1, height=32, width=32, dtype="float32"
)

WORLD = 2
PORT = 29517
# Loss-based congestion control inside the namespaces. The development machine's default is bbr,
# which against tbf's 50 ms queue dropped ~20% of the packets at 25 Mbit/s (and ran ~6% slower);
# cubic, Linux's usual default, cannot be selected in a namespace there. With reno tbf dropped
# fewer than 0.1% of the packets at every rate measured.
DEFAULT_TCP_CC = "reno"
# Mbit/s. 25 Mbit/s is below the list (100M/1G/10G/unlimited) because on a CPU the
# point where compression pays lies lower than on GPUs (see the module docstring).
DEFAULT_RATES = (25.0, 100.0, 1000.0, 10000.0, math.inf)


# --------------------------------------------------------------------------------------------
# Link rates
# --------------------------------------------------------------------------------------------
_RATE_RE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)$")
_UNIT_MBIT = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}


def parse_rate(text: str) -> float:
    """``"100mbit"`` -> 100.0 (Mbit/s); ``"unlimited"`` -> inf."""
    text = text.strip().lower()
    if text in ("unlimited", "inf", "none"):
        return math.inf
    m = _RATE_RE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(
            f"bad rate {text!r}: use e.g. 100mbit, 1gbit, 2.5gbit or unlimited"
        )
    return float(m.group(1)) * _UNIT_MBIT[m.group(2)]


def rate_name(mbit: float) -> str:
    if math.isinf(mbit):
        return "unlimited"
    if mbit >= 1000 and mbit % 1000 == 0:
        return f"{mbit / 1000:g}gbit"
    return f"{mbit:g}mbit"


# --------------------------------------------------------------------------------------------
# The rank processes
# --------------------------------------------------------------------------------------------
def _tx_bytes(ifname: str | None) -> int | None:
    if ifname is None:
        return None
    try:
        with open(f"/sys/class/net/{ifname}/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:
        return None


def _probe_link(nbytes: int, reps: int = 3) -> float:
    """Median MB/s of one rank's shard in a raw gloo all-gather of ``nbytes`` per rank."""
    import torch
    import torch.distributed as dist

    x = torch.ones(nbytes, dtype=torch.uint8)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)  # connect
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_gather(out, x)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e6


def worker(spec_path: str) -> None:
    """One rank: run every method for one link setting and write ``rank<r>.json``."""
    with open(spec_path) as f:
        spec = json.load(f)
    rank = int(os.environ["RANK"])
    os.environ.setdefault("LOG_LEVEL", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(spec["threads"]))
    from compactfusion.testing import prepare_xfuser_cpu

    prepare_xfuser_cpu()
    from diffusers.utils import logging as diffusers_logging

    import compactfusion as cf
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    diffusers_logging.set_verbosity_error()
    sizes = Sizes(**spec["sizes"])
    dtype = getattr(torch, sizes.dtype)
    ifname = spec["ifname"]
    deadline = time.monotonic() + spec["budget_s"]
    steps_total = spec["skip"] + spec["steps"]
    results: dict[str, Any] = {"rank": rank, "methods": {}}
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=spec["budget_s"] + 120))
    try:
        results["link_MBps"] = _probe_link(spec["probe_bytes"])
        pipe, pipe_layout = None, None
        for m in [Method(**d) for d in spec["methods"]]:
            # Rank 0 decides whether the time budget allows another method; all ranks follow.
            go = [time.monotonic() < deadline]
            dist.broadcast_object_list(go, src=0)
            if not go[0]:
                results["methods"][m.label] = {"skipped": "time budget exhausted"}
                continue
            layout = "ulysses" if m.ulysses else "ring"
            if layout != pipe_layout:
                del pipe
                degrees = {"ulysses": WORLD} if m.ulysses else {"ring": WORLD}
                pipe = build_pipeline(
                    "flux",
                    dtype=dtype,
                    heads=sizes.heads,
                    head_dim=sizes.head_dim,
                    num_layers=sizes.num_layers,
                    num_single_layers=sizes.num_single_layers,
                    **degrees,
                )
                pipe_layout = layout
                # One short untimed generation: oneDNN primitives, allocator, connections.
                generate(
                    pipe,
                    "flux",
                    steps=2,
                    height=sizes.height,
                    width=sizes.width,
                    text_len=sizes.text_len,
                )
            cfg = cf.CompactConfig(codec=m.codec, mode=m.mode, codec_params=m.codec_params)
            transformer = pipe.module.transformer
            marks: list[int | None] = []
            hook = transformer.register_forward_pre_hook(
                lambda *_, marks=marks: marks.append(_tx_bytes(ifname))
            )
            try:
                with cf.patched(pipe, cfg):
                    dist.barrier()
                    start = time.perf_counter()
                    generate(
                        pipe,
                        "flux",
                        steps=steps_total,
                        height=sizes.height,
                        width=sizes.width,
                        text_len=sizes.text_len,
                    )
                    wall = time.perf_counter() - start
                    marks.append(_tx_bytes(ifname))
                    st = cf.stats(pipe)
            finally:
                hook.remove()
            wire = (
                [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
                if None not in marks
                else None
            )
            results["methods"][m.label] = {
                "seconds_per_step": st["seconds_per_step"],
                "bytes_per_step": st["bytes_per_step"],
                "raw_bytes_per_step": st["raw_bytes_per_step"],
                "wire_bytes_per_step": wire,
                "generation_s": wall,
                "steps": st["steps"],
            }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    out = os.path.join(spec["workdir"], f"rank{rank}.json")
    with open(out + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(out + ".tmp", out)


def run_rate(
    link: NamespaceLink | None,
    mbit: float,
    args: argparse.Namespace,
    sizes: Sizes,
    methods: tuple[Method, ...],
) -> list[dict[str, Any]]:
    """Start both ranks for one link rate, wait (bounded), return their result dicts."""
    from compactfusion.testing import free_port

    workdir = tempfile.mkdtemp(prefix="cflink-")
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        if link is not None:
            link.set_rate(mbit)
        spec = {
            "sizes": asdict(sizes),
            "methods": [asdict(m) for m in methods],
            "steps": args.steps,
            "skip": args.skip,
            "threads": args.threads,
            "budget_s": args.timeout * 0.8,
            "probe_bytes": args.probe_bytes or _probe_bytes(args.smoke, link),
            "workdir": workdir,
            "ifname": None,
        }
        port = PORT if link is not None else free_port()
        for rank in range(WORLD):
            spec["ifname"] = link.dev[rank] if link is not None else None
            spec_path = os.path.join(workdir, f"spec{rank}.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            env = dict(os.environ)
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(WORLD),
                MASTER_ADDR=link.addr[0] if link is not None else "127.0.0.1",
                MASTER_PORT=str(port),
                GLOO_SOCKET_IFNAME=link.dev[rank] if link is not None else "lo",
                OMP_NUM_THREADS=str(args.threads),
                PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
            )
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", spec_path]
            if link is not None:
                cmd = link.exec_argv(rank, cmd)
            log = open(os.path.join(workdir, f"rank{rank}.log"), "w")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                    cwd=ROOT,
                )
            )
        deadline = time.monotonic() + args.timeout
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
        if codes != [0] * WORLD:
            _kill(procs)
            why = "timed out" if None in codes else f"exit codes {codes}"
            tails = "\n".join(
                f"--- rank {r} log (tail) ---\n{_tail(os.path.join(workdir, f'rank{r}.log'))}"
                for r in range(WORLD)
            )
            raise RuntimeError(f"ranks at {rate_name(mbit)} failed ({why}):\n{tails}")
        results = []
        for rank in range(WORLD):
            with open(os.path.join(workdir, f"rank{rank}.json")) as f:
                results.append(json.load(f))
        if link is not None:
            results[0]["tcp_cc"] = link.tcp_cc
            if not math.isinf(mbit):
                results[0]["tbf_dropped"] = link.dropped_packets()
        return results
    finally:
        _kill(procs)
        for log in logs:
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _probe_bytes(smoke: bool, link: NamespaceLink | None) -> int:
    """Size of the link probe: 4 MiB, and at least 4 bursts so that tbf's bucket (full at the
    start) does not inflate the measured rate; 64 KiB in smoke mode."""
    if smoke:
        return 64 * 1024
    burst = link.burst if link is not None and link.burst else 0
    return max(4 * 1024 * 1024, 4 * burst)


def _die_with_parent() -> None:
    """In the child before exec: be killed if the driver dies (even by SIGKILL), so a crashed
    run leaves no ranks behind (Linux only; elsewhere the driver's timeout still applies)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill(procs: list[subprocess.Popen]) -> None:
    """Kill each started rank's process group (our own children only) and reap it."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# Rows, table, plot
# --------------------------------------------------------------------------------------------
COLUMNS = [
    "method", "codec", "mode", "parallel", "rate", "rate_mbit", "link", "tbf_burst_bytes",
    "tbf_latency_ms", "tcp_cc", "tbf_dropped_packets", "measured_link_MBps", "steps_timed",
    "step_s_median", "step_s_min", "step_s_max", "step_s_p25", "step_s_p75",
    "speedup_vs_raw_allgather", "bytes_per_step", "raw_bytes_per_step", "ratio",
    "wire_bytes_per_step", "generation_s", "heads", "head_dim", "layers", "image_tokens", "dtype",
    "kv_shard_bytes", "threads_per_rank", "world", "cpu", "cpu_cores", "load1_at_start", "torch",
    "xfuser", "python", "date",
]  # fmt: skip


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def environment() -> dict[str, Any]:
    """The machine stamp of the CSV rows (``benchmarks._report.machine_stamp``) and the load."""
    stamp = machine_stamp(cuda=False)
    env = {k: stamp[k] for k in ("cpu", "cpu_cores", "torch", "xfuser", "python", "date")}
    return {**env, "load1_at_start": round(os.getloadavg()[0], 2)}


def make_rows(
    per_rate: list[tuple[float, str, int | None, float, list[dict]]],
    sizes: Sizes,
    methods: tuple[Method, ...],
    args: argparse.Namespace,
    env: dict[str, Any],
) -> list[dict[str, Any]]:
    rows = []
    for mbit, link_kind, burst, load1, ranks in per_rate:
        medians: dict[str, float] = {}
        rate_rows = []
        for m in methods:
            per_rank = [r["methods"].get(m.label, {}) for r in ranks]
            if any("seconds_per_step" not in r for r in per_rank):
                why = next((r.get("skipped") for r in per_rank if r.get("skipped")), "no result")
                print(f"[link] {m.label} at {rate_name(mbit)}: not measured ({why})")
                continue
            skip = args.skip
            # A step ends for the system when the slower rank ends it.
            secs = [max(v) for v in zip(*(r["seconds_per_step"] for r in per_rank), strict=True)][
                skip:
            ]
            sent = statistics.median(per_rank[0]["bytes_per_step"][skip:])
            raw = statistics.median(per_rank[0]["raw_bytes_per_step"][skip:])
            wire = per_rank[0]["wire_bytes_per_step"]
            med = statistics.median(secs)
            medians[m.label] = med
            rate_rows.append(
                {
                    "method": m.label,
                    "codec": m.codec
                    + (
                        "(" + ",".join(f"{k}={v}" for k, v in m.codec_params.items()) + ")"
                        if m.codec_params
                        else ""
                    ),
                    "mode": "ulysses" if m.ulysses else m.mode,
                    "parallel": f"ulysses={WORLD}" if m.ulysses else f"ring={WORLD}",
                    "rate": rate_name(mbit),
                    "rate_mbit": "" if math.isinf(mbit) else mbit,
                    "link": link_kind,
                    "tbf_burst_bytes": burst if burst is not None else "",
                    "tbf_latency_ms": TBF_LATENCY_MS if burst is not None else "",
                    "tcp_cc": ranks[0].get("tcp_cc", ""),
                    "tbf_dropped_packets": ranks[0].get("tbf_dropped", ""),
                    "measured_link_MBps": round(ranks[0]["link_MBps"], 2),
                    "steps_timed": len(secs),
                    "step_s_median": round(med, 5),
                    "step_s_min": round(min(secs), 5),
                    "step_s_max": round(max(secs), 5),
                    "step_s_p25": round(_quantile(secs, 0.25), 5),
                    "step_s_p75": round(_quantile(secs, 0.75), 5),
                    "bytes_per_step": int(sent),
                    "raw_bytes_per_step": int(raw),
                    "ratio": round(raw / sent, 2) if sent else "",
                    "wire_bytes_per_step": int(statistics.median(wire[skip:])) if wire else "",
                    "generation_s": round(max(r["generation_s"] for r in per_rank), 3),
                    "heads": sizes.heads,
                    "head_dim": sizes.head_dim,
                    "layers": f"{sizes.num_layers}+{sizes.num_single_layers}",
                    "image_tokens": sizes.image_tokens,
                    "dtype": sizes.dtype,
                    "kv_shard_bytes": sizes.kv_shard_bytes(WORLD),
                    "threads_per_rank": args.threads,
                    "world": WORLD,
                    **env,
                    "load1_at_start": round(load1, 2),
                }
            )
        base = medians.get(BASELINE)
        for row in rate_rows:
            speedup = base / medians[row["method"]] if base else None
            row["speedup_vs_raw_allgather"] = round(speedup, 3) if speedup else ""
        rows.extend(rate_rows)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    rates = list(dict.fromkeys(r["rate"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["rate"]): r for r in rows}
    head = ["method", "KiB/step sent", "ratio"] + [f"{rate} s/step (x)" for rate in rates]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in methods:
        any_row = next(cell[(m, rate)] for rate in rates if (m, rate) in cell)
        parts = [m, f"{any_row['bytes_per_step'] / 1024:.0f}", f"{any_row['ratio']}x"]
        for rate in rates:
            r = cell.get((m, rate))
            parts.append(
                f"{r['step_s_median']:.3f} ({r['speedup_vs_raw_allgather']:.2f}x)" if r else "-"
            )
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot(csv_path: str, png_path: str) -> None:
    """Time per step vs link rate (log x), one line per method, min-max bars; from the CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)
    finite = [float(r["rate_mbit"]) for r in rows if r["rate_mbit"]]
    unlimited_x = (max(finite) if finite else 1000.0) * 10
    fig, ax = plt.subplots(figsize=(9, 5.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = plt.get_cmap("tab20").colors
    for i, method in enumerate(methods):
        pts = sorted(
            (float(r["rate_mbit"]) if r["rate_mbit"] else unlimited_x, r)
            for r in rows
            if r["method"] == method
        )
        xs = [x for x, _ in pts]
        med = [float(r["step_s_median"]) for _, r in pts]
        lo = [m - float(r["step_s_min"]) for m, (_, r) in zip(med, pts, strict=True)]
        hi = [float(r["step_s_max"]) - m for m, (_, r) in zip(med, pts, strict=True)]
        uncompressed = pts[0][1]["codec"] == "raw"
        ax.errorbar(
            xs,
            med,
            yerr=[lo, hi],
            marker="os^vD<>ph*X"[i % 11],
            ms=4,
            capsize=2,
            ls="--" if uncompressed else "-",
            lw=2.4 if method == BASELINE else 1.3,
            color="black" if method == BASELINE else colors[(2 * i) % 20 + (i >= 10)],
            label=method + (" (uncompressed)" if uncompressed else ""),
        )
    ticks = sorted(set(finite)) + ([unlimited_x] if any(not r["rate_mbit"] for r in rows) else [])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels([rate_name(t) if t != unlimited_x else "unlimited" for t in ticks])
    ax.minorticks_off()
    lo_y = min(float(r["step_s_min"]) for r in rows)
    hi_y = max(float(r["step_s_max"]) for r in rows)
    yticks = [
        m * 10**e for e in range(-4, 4) for m in (1, 2, 5) if lo_y / 1.5 <= m * 10**e <= hi_y * 1.5
    ]
    ax.set_yticks(yticks)
    ax.set_yticklabels([f"{t:g}" for t in yticks])
    ax.set_xlabel("link rate (tc tbf, each direction)")
    ax.set_ylabel("time per denoising step [s] (median, min-max)")
    r0 = rows[0]
    ax.set_title(
        f"FLUX-shaped {r0['heads']}x{r0['head_dim']}, {r0['layers']} blocks, "
        f"{r0['image_tokens']} tokens, {r0['dtype']}, {r0['world']} CPU ranks ({r0['link']})\n"
        f"{r0['cpu']}, torch {r0['torch']}, xfuser {r0['xfuser']}",
        fontsize=9,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    p.add_argument(
        "--rates",
        type=lambda s: [parse_rate(x) for x in s.split(",") if x],
        default=None,
        help="comma-separated link rates such as 100mbit, 2.5gbit, unlimited (default: "
        "25mbit,100mbit,1gbit,10gbit,unlimited; --smoke: 1gbit, or unlimited on loopback)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed denoising steps per method (default 6; --smoke 2)",
    )
    p.add_argument(
        "--skip",
        type=int,
        default=2,
        help="untimed steps at the start of each generation (raw warm-up + first "
        "compressed step; default 2)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of: {', '.join(m.label for m in METHODS)}",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="override model sizes, e.g. heads=8,head_dim=128,height=128,width=128,"
        "num_layers=1,num_single_layers=3,dtype=bfloat16",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per rank (default: cores / 2, at least 1)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds allowed per rate for both ranks (default 900; --smoke 120)",
    )
    p.add_argument(
        "--probe-bytes",
        type=int,
        default=None,
        help="bytes per rank of the raw all-gather that measures the link (default: 4 MiB or "
        "4 tbf bursts, whichever is larger; --smoke 64 KiB)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model, 2 ranks, one rate, seconds; loopback when not root",
    )
    p.add_argument(
        "--loopback",
        action="store_true",
        help="(--smoke only) run over loopback without namespaces",
    )
    p.add_argument(
        "--tcp-cc",
        default=DEFAULT_TCP_CC,
        help=f"TCP congestion control inside the namespaces (default {DEFAULT_TCP_CC}; "
        "'inherit' keeps the host's)",
    )
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.loopback and not args.smoke:
        p.error("--loopback only makes sense with --smoke (loopback cannot be rate-limited)")
    args.steps = args.steps or (2 if args.smoke else 6)
    args.timeout = args.timeout or (120.0 if args.smoke else 900.0)
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // WORLD)
    if args.steps < 1 or args.skip < 1:
        p.error("--steps and --skip must be >= 1 (the first step is the raw warm-up)")
    return args


def _sizes(args: argparse.Namespace) -> Sizes:
    base = asdict(SMOKE_SIZES if args.smoke else FULL_SIZES)
    if args.sizes:
        for item in args.sizes.split(","):
            key, _, val = item.partition("=")
            if key not in base:
                raise SystemExit(f"--sizes: unknown field {key!r}; fields: {', '.join(base)}")
            base[key] = val if key == "dtype" else int(val)
    sizes = Sizes(**base)
    if sizes.dtype not in ("bfloat16", "float32"):
        raise SystemExit("--sizes: dtype must be bfloat16 or float32")
    if sizes.height % 4 or sizes.width % 4 or sizes.image_tokens % WORLD:
        raise SystemExit("--sizes: height and width must be multiples of 4, tokens even")
    return sizes


def _methods(args: argparse.Namespace) -> tuple[Method, ...]:
    if not args.methods:
        return METHODS
    by_label = {m.label: m for m in METHODS}
    wanted = [x.strip() for x in args.methods.split(",") if x.strip()]
    unknown = [w for w in wanted if w not in by_label]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(by_label)}")
    if BASELINE not in wanted:
        wanted.insert(0, BASELINE)  # speed-ups need it
    # Group by layout so the pipeline is rebuilt at most once.
    return tuple(sorted((by_label[w] for w in wanted), key=lambda m: m.ulysses))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    ok, why = netns_available()
    use_netns = ok and not args.loopback
    if not use_netns and not args.smoke:
        print(
            f"benchmarks/link.py needs root to create network namespaces and tc rate limits "
            f"({why or 'ip netns unavailable'}). Run it as root (sudo), or use --smoke for a "
            "loopback check without a rate limit.",
            file=sys.stderr,
        )
        return 2
    if args.smoke and not use_netns:
        reason = "--loopback given" if args.loopback else why
        print(f"[link] smoke mode over loopback, no namespaces, no rate limit ({reason})")
    rates = args.rates or (
        ([1000.0] if use_netns else [math.inf]) if args.smoke else list(DEFAULT_RATES)
    )
    if not use_netns and any(not math.isinf(r) for r in rates):
        print("[link] loopback cannot be rate-limited: running 'unlimited' only")
        rates = [math.inf]
    sizes, methods = _sizes(args), _methods(args)
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print(
        f"[link] {env['cpu']}, {env['cpu_cores']} cores, load {env['load1_at_start']}; torch "
        f"{env['torch']}, xfuser {env['xfuser']}; FLUX-shaped {sizes.heads}x{sizes.head_dim}, "
        f"{sizes.num_layers}+{sizes.num_single_layers} blocks, {sizes.image_tokens} tokens, "
        f"{sizes.dtype}; K+V shard {sizes.kv_shard_bytes(WORLD) / 2**20:.2f} MiB per layer "
        f"per rank; {len(methods)} methods x {len(rates)} rates, {args.steps} timed steps"
    )
    per_rate = []
    started = time.monotonic()
    link = None
    try:
        if use_netns:
            stale = NamespaceLink.remove_stale()
            if stale:
                print(f"[link] removed stale namespaces/links from a crashed run: {stale}")
            link = NamespaceLink(tcp_cc=None if args.tcp_cc == "inherit" else args.tcp_cc)
            link.__enter__()
        for mbit in rates:
            t0, load1 = time.monotonic(), os.getloadavg()[0]
            ranks = run_rate(link, mbit, args, sizes, methods)
            burst = link.burst if link is not None else None
            kind = "netns veth + tc tbf" if link is not None else "loopback"
            per_rate.append((mbit, kind, burst, load1, ranks))
            print(
                f"[link] {rate_name(mbit)}: done in {time.monotonic() - t0:.0f} s "
                f"(measured {ranks[0]['link_MBps']:.1f} MB/s per direction; load {load1:.1f} "
                "at start)"
            )
    finally:
        if link is not None:
            link.close()
    per_rate.sort(key=lambda entry: entry[0])  # table and CSV by rate, whatever the run order
    rows = make_rows(per_rate, sizes, methods, args, env)
    csv_path = os.path.join(args.out, "link.csv")
    write_csv(csv_path, COLUMNS, rows)
    plot(csv_path, os.path.join(args.out, "link.png"))
    table = markdown_table(rows)
    with open(os.path.join(args.out, "link.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"[link] total {time.monotonic() - started:.0f} s; wrote {csv_path}, link.png, link.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
