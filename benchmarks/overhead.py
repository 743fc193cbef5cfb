"""What compactfusion costs per step and per collective, eager and under torch.compile.

One run on 2 ranks (gloo on CPU, NCCL with 2 GPUs) of a tiny bf16 xfuser FLUX with ring
attention (``allgather`` mode) measures:

* **step time**: the median transformer call (20th-80th percentile spread) of the unpatched
  pipeline and of the pipeline patched with codec ``raw`` and ``int2``, eager and compiled
  (``torch.compile(transformer.forward)``, inductor, as xfuser's ``use_torch_compile`` does),
  as ratios within this run: patched / unpatched, compiled / eager. Three pipelines (one per
  configuration) run round-robin, so slow drift of a shared machine hits all alike.
* **host reads per step** (``compactfusion.testing.host_reads``): all of the pipeline's, and
  those made by compactfusion's code, counted on the eager patched int2 run.
* **graph breaks** of each compiled configuration (dynamo's counters).
* **per compressed collective** on a small tensor (so that codec arithmetic is negligible):
  wall time and Python function calls of one steady-state call of ``compressed_all_gather``
  and of the ``compactfusion::all_gather`` custom op, against a plain
  ``all_gather_into_tensor`` of the same tensor.

Rows go to ``overhead.csv`` stamped with the machine (CPU model, cores, threads per rank, load
average at the start), torch and xfuser versions.

    python benchmarks/overhead.py                       # writes benchmarks/results/overhead.csv
    python benchmarks/overhead.py --steps 4 --reps 1 --out /tmp/bench   # quick smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import machine_stamp, write_csv  # noqa: E402

FIELDS = [
    "measure",
    "entry",
    "config",
    "median",
    "min",
    "p20",
    "p80",
    "unit",
    "samples",
    "ratio",
    "ratio_to",
    "graph_breaks",
    "graphs",
    "note",
    "device",
    "cpu_cores",
    "threads_per_rank",
    "world",
    "load1_at_start",
    "torch",
    "xfuser",
    "python",
    "date",
]
CONFIGS = ("unpatched", "raw", "int2")


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="directory for overhead.csv")
    p.add_argument("--steps", type=int, default=8, help="denoising steps per generation")
    p.add_argument("--reps", type=int, default=5, help="round-robin repetitions per entry")
    p.add_argument("--calls", type=int, default=200, help="timed calls per collective")
    p.add_argument("--layers", default="2+2", help="FLUX double+single blocks, e.g. 2+2")
    p.add_argument("--timeout", type=float, default=3000.0)
    args = p.parse_args(argv)
    if args.steps < 3 or args.reps < 1 or args.calls < 10:
        p.error("--steps must be >= 3, --reps >= 1 and --calls >= 10")
    try:
        args.double, args.single = (int(v) for v in args.layers.split("+"))
    except ValueError:
        p.error(f"--layers must look like 2+2, got {args.layers!r}")
    return args


def _quantiles(values: list[float]) -> tuple[float, float, float, float]:
    """``(median, min, p20, p80)``: on a shared machine the minimum is the least disturbed."""
    q = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return statistics.median(values), min(values), q[1], q[7]


class StepTimer:
    """Times each call of a module (forward hooks registered after compactfusion's, so the
    interval holds compactfusion's end-of-step flag read)."""

    def __init__(self, module):
        self.times: list[float] = []
        self._t0 = 0.0
        self._hooks = [
            module.register_forward_pre_hook(self._begin),
            module.register_forward_hook(self._end),
        ]

    def _begin(self, module, args):
        self._t0 = time.perf_counter()

    def _end(self, module, args, output):
        self.times.append(time.perf_counter() - self._t0)


def _python_calls(fn) -> int:
    """Python function calls made by one ``fn()`` (a profiler counting 'call' events)."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def _time_calls(fn, n: int) -> list[float]:
    import torch.distributed as dist

    for _ in range(5):
        fn()
    out = []
    for _ in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _collective_rows(args) -> list[dict]:
    import torch
    import torch.distributed as dist

    import compactfusion.ops as ops
    from compactfusion import CompactConfig, ResidualCompressor
    from compactfusion.collectives import all_gather_flat, compressed_all_gather

    world = dist.get_world_size()
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    plain_out = torch.empty(world * x.numel(), dtype=x.dtype)
    rows, base_us, alive, group = [], None, [], ops.group_name(None)
    cases = [("plain all_gather_into_tensor", lambda: all_gather_flat(plain_out, x.reshape(-1)))]
    for codec in ("raw", "int2"):
        comp = ResidualCompressor(CompactConfig(codec=codec, min_numel=0))
        alive.append(comp)  # the ops' registry holds compressors weakly
        handle = ops.register(comp)
        drift = [0.0]  # each call sends a slightly different tensor, as successive steps do

        def eager(comp=comp, drift=drift, site=f"eager-{codec}"):
            drift[0] += 1e-3
            compressed_all_gather(comp, site, x + drift[0])

        def op(handle=handle, drift=drift, site=f"op-{codec}"):
            drift[0] += 1e-3
            torch.ops.compactfusion.all_gather(x + drift[0], handle, site, group)

        cases += [
            (f"compressed_all_gather {codec}", eager),
            (f"compactfusion::all_gather {codec}", op),
        ]
    for label, fn in cases:
        times = _time_calls(fn, args.calls)
        calls = _python_calls(fn)
        med, low, p20, p80 = (t * 1e6 for t in _quantiles(times))
        if base_us is None:
            base_us = med
        rows.append(
            _row("collective_us", "eager", label, med, p20, p80, "us", len(times),
                 med / base_us, "plain all_gather_into_tensor",
                 note=f"{calls} Python calls per call; x = 16x256 bf16 per rank", low=low)
        )  # fmt: skip
    return rows


def _rank(rank, world, args):
    from compactfusion.testing import prepare_xfuser_cpu

    prepare_xfuser_cpu()
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    import compactfusion as cf
    from compactfusion.testing.host_reads import HostReadCounter
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    sizes = {"num_layers": args.double, "num_single_layers": args.single}
    pipes = {}
    for config in CONFIGS:
        pipe = build_pipeline("flux", ring=2, dtype=torch.bfloat16, **sizes)
        if config != "unpatched":
            cf.patch(pipe, cf.CompactConfig(codec=config, min_numel=0))
        pipes[config] = pipe
    timers = {c: StepTimer(p.module.transformer) for c, p in pipes.items()}
    rows = []

    # Host reads per step (eager, int2).
    generate(pipes["int2"], "flux", steps=args.steps)
    with HostReadCounter() as reads:
        generate(pipes["int2"], "flux", steps=args.steps)
    package = os.path.dirname(os.path.abspath(cf.__file__))
    skip = (os.path.dirname(os.path.abspath(torch.__file__)),)
    ours = [r for r in reads.reads if _ours(r.origin(skip), package)]
    per_step = {"int2": len(ours), "int2 (whole pipeline)": len(reads.reads)}
    notes = {
        "int2": "reads asked for by compactfusion code (innermost non-torch frame)",
        "int2 (whole pipeline)": "every read of the pipeline call (diffusers, xfuser included)",
    }
    for config, n in per_step.items():
        rows.append(
            _row("host_reads_per_step", "eager", config, n / args.steps, "", "", "reads",
                 args.steps, note=notes[config])
        )  # fmt: skip

    steps_per_entry: dict[tuple[str, str], list[float]] = {}
    for entry in ("eager", "compiled"):
        breaks = {}
        for config, pipe in pipes.items():
            transformer = pipe.module.transformer
            if entry == "compiled":
                torch._dynamo.reset() if config == CONFIGS[0] else None
                counters.clear()
                transformer.forward = torch.compile(transformer.forward)
            generate(pipe, "flux", steps=args.steps)  # warm-up (compiles)
            breaks[config] = (
                sum(counters["graph_break"].values()),
                counters["stats"]["unique_graphs"],
            )
        for _ in range(args.reps):
            for config, pipe in pipes.items():
                timers[config].times.clear()
                generate(pipe, "flux", steps=args.steps)
                # The first step of a generation is the raw warm-up: not steady state.
                steps_per_entry.setdefault((entry, config), []).extend(timers[config].times[1:])
        for config in CONFIGS:
            times = steps_per_entry[(entry, config)]
            med, low, p20, p80 = (t * 1e3 for t in _quantiles(times))
            g = breaks[config] if entry == "compiled" else ("", "")
            rows.append(_row("step_ms", entry, config, med, p20, p80, "ms", len(times), "", "",
                             *g, low=low))  # fmt: skip
    _add_ratios(rows)
    rows += _collective_rows(args)
    return rows


def _ours(path: str, package: str) -> bool:
    """Whether a read was asked for by compactfusion itself (not its testing helpers)."""
    return path.startswith(package) and not path.startswith(os.path.join(package, "testing"))


def _add_ratios(rows: list[dict]) -> None:
    med = {(r["entry"], r["config"]): r["median"] for r in rows if r["measure"] == "step_ms"}
    low = {(r["entry"], r["config"]): r["min"] for r in rows if r["measure"] == "step_ms"}
    for r in rows:
        if r["measure"] != "step_ms":
            continue
        if r["config"] != "unpatched":
            r["ratio"] = r["median"] / med[(r["entry"], "unpatched")]
            r["ratio_to"] = f"{r['entry']} unpatched"
        elif r["entry"] == "compiled":
            r["ratio"] = r["median"] / med[("eager", "unpatched")]
            r["ratio_to"] = "eager unpatched"
    for config in CONFIGS[1:]:
        rows.append(_row("step_ratio", "compiled/eager", config,
                         med[("compiled", config)] / med[("eager", config)], "", "", "x", "",
                         note="compiled step over eager step, same configuration (medians; "
                         "min column: ratio of the minima)",
                         low=low[("compiled", config)] / low[("eager", config)]))  # fmt: skip
    for entry in ("eager", "compiled"):
        for config in CONFIGS[1:]:
            rows.append(_row("step_ratio", f"{entry} patched/unpatched", config,
                             med[(entry, config)] / med[(entry, "unpatched")], "", "", "x", "",
                             note="patched step over unpatched step (medians; min column: "
                             "ratio of the minima)",
                             low=low[(entry, config)] / low[(entry, "unpatched")]))  # fmt: skip


def _row(measure, entry, config, median, p20, p80, unit, samples, ratio="", ratio_to="",
         graph_breaks="", graphs="", note="", low=""):  # fmt: skip
    return {"measure": measure, "entry": entry, "config": config, "median": median, "min": low,
            "p20": p20, "p80": p80, "unit": unit, "samples": samples, "ratio": ratio,
            "ratio_to": ratio_to, "graph_breaks": graph_breaks, "graphs": graphs,
            "note": note}  # fmt: skip


def _stamp(rows: list[dict], world: int, load1: float) -> list[dict]:
    machine = machine_stamp()
    stamp = {
        **{k: machine[k] for k in ("device", "cpu_cores", "torch", "xfuser", "python", "date")},
        "threads_per_rank": max(1, (os.cpu_count() or 1) // world),
        "world": world,
        "load1_at_start": f"{load1:.2f}",
    }
    out = []
    for r in rows:
        r = {**r, **stamp}
        for k in ("median", "min", "p20", "p80", "ratio"):
            if isinstance(r[k], float):
                r[k] = f"{r[k]:.4g}"
        out.append(r)
    return out


def run(args) -> str:
    from compactfusion.testing import spawn_ranks

    world = 2
    load1 = os.getloadavg()[0]  # other work on the machine skews every timing
    results = spawn_ranks(_rank, world, args, timeout=args.timeout)
    rows = _stamp(results[0], world, load1)  # rank 0's view (the ranks run in lockstep)
    path = write_csv(os.path.join(args.out, "overhead.csv"), FIELDS, rows)
    for r in rows:
        print(f"{r['measure']:20s} {r['entry']:28s} {r['config']:36s} {r['median']:>9s} "
              f"min {r['min'] or '-':>9s} {r['unit']:5s} {r['ratio'] or '-':>6s}")  # fmt: skip
    return path


if __name__ == "__main__":
    print(run(_parse_args()))
