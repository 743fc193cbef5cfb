"""Python half of ``benchmarks/gpu_check.sh`` (issue 15): environment stamp, the end-to-end
Triton-vs-torch comparison on two ranks sharing one GPU, the compiled step, and the summary.

Subcommands (each writes one JSON file and exits non-zero when a check fails)::

    env       versions of torch / CUDA / Triton / xfuser / diffusers and the device
    e2e       (c) two ranks on one device over gloo:
              1. probes: which gloo collectives accept this device's tensors
              2. collective: compactfusion's compressed all-gather of a drifting FLUX-sized
                 activation, backend "torch" vs "triton", for every codec
              3. pipeline: a tiny FLUX (bf16) through xFuserFluxPipeline, ring_degree=2:
                 unpatched once (xfuser's own ring attention; information), then per codec
                 in ``allgather`` mode backend "torch" twice (is the model bit-repeatable
                 here?) and "triton": output, every base, sender-vs-receiver bases
              with device synchronisations counted per denoising step
              (``torch.cuda.set_sync_debug_mode("warn")``; see ``SyncRecorder``)
    compile   (d) ``transformer.compile(mode="reduce-overhead")`` on the patched pipeline:
              outcome, graph breaks, output against eager; information only (exit 0)
    targets   issue 15's kernel targets read from ``kernels.csv``; information only
    junit     pass/fail/skip counts of the tests stage's junit xml; fails if none passed
    summary   one table of every stage's status from the stage log of gpu_check.sh

What must hold (a failure exits 1 and lists the mismatch):

* codecs with bit-exact kernels (int1, int2, fp8, nm_sparse): the Triton backend's payloads,
  gathered tensors, bases and pipeline output equal the torch backend's bit for bit. When two
  torch-backend runs of the pipeline already differ (a model that is not bit-repeatable on the
  device), its triton-vs-torch difference is reported instead of required to be zero (the
  collective comparison does not depend on the model);
* ``lowrank``: within its documented tolerance (``kernels/lowrank.py``): equal payloads at the
  first compressed step (later ones follow bases that may differ by an ulp), the relative
  differences reported;
* every codec and backend: each sender's base equals its receivers' copies bit for bit
  (SHA-256 of the bytes, compared across ranks), and a Triton run never fell back to torch.

Two ranks share one GPU because NCCL refuses two ranks per device; gloo moves CUDA tensors
through host memory for the collectives it supports (the probes record which). xfuser is told
to build its groups with gloo, and both ranks use ``cuda:0``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter

import torch

# Appended, not prepended: benchmarks._report comes from the checkout, compactfusion from where
# it is installed (a wheel under test, whose compactfusion.kernels the checkout lacks).
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import read_csv, version  # noqa: E402

CODECS = ["int2", "int1", "fp8", "nm_sparse", "lowrank"]
TOLERANCE_CODECS = {"lowrank"}  # not bit-exact by design (kernels/lowrank.py)
SYNC_MESSAGE = "synchronizing CUDA operation"  # torch's sync-debug warning text
# Per device: (collective activation rows x cols, pipeline head_dim, image px, steps).
SIZES = {"cuda": ((4096, 3072), 64, 64, 4), "cpu": ((64, 256), 16, 32, 3)}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _write_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def _digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (dtype and shape included)."""
    data = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Bit equality, max |got - ref| and ||got - ref|| / ||ref|| (float64)."""
    equal = got.shape == ref.shape and got.dtype == ref.dtype and torch.equal(got, ref)
    diff = got.double() - ref.double()
    ref_norm = float(ref.double().norm())
    return {
        "equal": bool(equal),
        "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
        "rel": float(diff.norm()) / ref_norm if ref_norm else float(diff.norm()),
    }


def _frame_label(frame) -> str:
    path = frame.filename
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    else:
        for marker in ("/compactfusion/", "/kernels/", "/benchmarks/", "/tests/", "/examples/"):
            if marker in path:
                path = marker.strip("/") + "/" + path.split(marker, 1)[1]
                break
    return f"{path}:{frame.lineno} {frame.name}"


def _sync_site(stack) -> list[str]:
    """Where a synchronisation happened: the innermost Python frame and, when that is inside
    torch, the innermost caller outside torch (the code responsible for it)."""
    frames = [f for f in stack if not f.filename.endswith("/warnings.py")]
    if not frames:
        return ["?"]
    where = [_frame_label(frames[-1])]
    outside = [f for f in frames if "/torch/" not in f.filename]
    if outside and outside[-1] is not frames[-1]:
        where.append(_frame_label(outside[-1]))
    return where


class SyncRecorder:
    """Count device synchronisations per call of ``module`` (one call = one denoising step).

    ``torch.cuda.set_sync_debug_mode("warn")`` makes torch warn at every synchronising CUDA
    operation (``.item()``, ``bool(t)``, a device-to-host copy, ...) issued from this thread;
    each warning is recorded with the step it happened in and where it came from (see
    ``_sync_site``), and not printed. Synchronisations inside other threads (gloo's workers)
    and explicit ``torch.cuda.synchronize()`` calls are not reported by torch and so not
    counted. With
    ``cuda=False`` nothing is switched on (CPU), but warnings raised with the same text are
    still counted, which lets the bookkeeping be tested without a GPU.
    """

    def __init__(self, module: torch.nn.Module | None = None, cuda: bool = True):
        self.cuda = cuda
        self.step = -1  # index of the current (or last) call of ``module``
        self.in_module = False
        self.events: list[dict] = []
        self._hooks = []
        if module is not None:
            self._hooks.append(module.register_forward_pre_hook(self._enter))
            self._hooks.append(module.register_forward_hook(self._leave))

    def _enter(self, module, args):
        self.step += 1
        self.in_module = True

    def _leave(self, module, args, output):
        self.in_module = False

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE not in str(message):
            self._previous_show(message, category, filename, lineno, file, line)
            return
        where = _sync_site(traceback.extract_stack()[:-1])  # without this method's frame
        self.events.append(
            {"step": self.step if self.in_module else None, "where": where, "at": filename}
        )

    def __enter__(self):
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        # Every occurrence (not once per location); other warnings keep their filters.
        warnings.filterwarnings("always", message=f".*{SYNC_MESSAGE}")
        self._previous_show = warnings.showwarning
        warnings.showwarning = self._show
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = self._previous_show
        self._catch.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        return False

    def summary(self, steady_step: int | None = None) -> dict:
        """Counts per step, outside the module, and by location for ``steady_step`` (or for
        every event when no module is hooked)."""
        per_step = Counter(e["step"] for e in self.events if e["step"] is not None)
        steps = [per_step.get(i, 0) for i in range(self.step + 1)]
        if steady_step is None:
            chosen = self.events
        else:
            chosen = [e for e in self.events if e["step"] == steady_step]
        sites = Counter(" <- ".join(e["where"]) for e in chosen)
        return {
            "enabled": self.cuda,
            "total": len(self.events),
            "per_step": steps,
            "outside_steps": sum(1 for e in self.events if e["step"] is None),
            "steady_step": steady_step,
            "steady_step_syncs": len(chosen),
            "steady_step_sites": dict(sites.most_common()),
        }


class _Progress:
    """Append-only JSON-lines record of one rank's finished parts, so that a rank that hangs
    or dies later still leaves what it had checked."""

    def __init__(self, prefix: str, rank: int):
        self.path = f"{prefix}.rank{rank}.jsonl"
        open(self.path, "w").close()

    def add(self, part: str, data) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"part": part, "data": data}, default=str) + "\n")


def _read_progress(prefix: str, world: int) -> list[dict]:
    """``[{part: data}, ...]`` per rank from the files ``_Progress`` wrote."""
    ranks = []
    for rank in range(world):
        parts = {}
        path = f"{prefix}.rank{rank}.jsonl"
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    if line.strip():
                        entry = json.loads(line)
                        parts[entry["part"]] = entry["data"]
        ranks.append(parts)
    return ranks


def _quiet() -> None:
    os.environ.setdefault("LOG_LEVEL", "error")  # xfuser logs every wrapped layer otherwise
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kept in float32.*")


def _device(opts) -> torch.device:
    if opts["device"] == "cuda":
        torch.cuda.set_device(0)  # both ranks share the one GPU
        return torch.device("cuda", 0)
    return torch.device("cpu")


def _prepare_xfuser(device: str) -> None:
    """Make xfuser usable for two ranks on this machine (before anything imports it)."""
    if device == "cpu":
        from compactfusion.testing import prepare_xfuser_cpu

        prepare_xfuser_cpu()
        return
    # On CUDA xfuser builds its groups with NCCL, which refuses two ranks on one GPU: gloo
    # instead (looked up at call time by parallel_state). LOCAL_RANK=0 (set by the parent)
    # makes xfuser select cuda:0 on both ranks.
    import xfuser.envs as envs

    envs.get_torch_distributed_backend = _gloo
    torch.cuda.set_device(0)


def _gloo() -> str:
    return "gloo"


def _spawn(fn, opts, timeout: float, prefix: str):
    """Run ``fn`` on 2 ranks; returns ``(results or None, error text or None, progress)``."""
    from compactfusion.testing import spawn_ranks

    env = {"LOCAL_RANK": "0"} if opts["device"] == "cuda" else {}
    opts = dict(opts, progress=prefix)
    try:
        results, error = spawn_ranks(fn, 2, opts, timeout=timeout, env=env), None
    except Exception as exc:
        results, error = None, f"{type(exc).__name__}: {exc}"
    return results, error, _read_progress(prefix, 2)


# --------------------------------------------------------------------------------------------
# env
# --------------------------------------------------------------------------------------------
def cmd_env(args) -> int:
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "COMPACTFUSION_BACKEND": os.environ.get("COMPACTFUSION_BACKEND"),
    }
    for dist_name in ("triton", "xfuser", "yunchang", "distvae", "diffusers", "compactfusion"):
        info[dist_name] = version(dist_name, missing=None)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["device"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "multiprocessors": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
            "count": torch.cuda.device_count(),
        }
    try:
        import compactfusion.kernels as kernels

        info["kernels_interpreted"] = kernels.interpreted()
    except Exception as exc:  # reported, not fatal: the tests stage fails loudly instead
        info["kernels_import_error"] = f"{type(exc).__name__}: {exc}"
    _write_json(args.out, info)
    print(json.dumps(info, indent=2))
    return 0


# --------------------------------------------------------------------------------------------
# e2e: probes + compressed all-gather
# --------------------------------------------------------------------------------------------
def _probe_collectives(device: torch.device) -> dict:
    """Which gloo collectives accept tensors on ``device`` (values checked)."""
    import torch.distributed as dist

    from compactfusion.collectives import all_gather_flat

    world, rank = dist.get_world_size(), dist.get_rank()
    mine = torch.full((4,), float(rank + 1), device=device)
    expect = torch.arange(1, world + 1, device=device, dtype=torch.float32)

    def gather_flat():
        out = torch.empty(world * 4, device=device)
        all_gather_flat(out, mine)
        return torch.equal(out.view(world, 4)[:, 0], expect)

    def gather_list():
        outs = [torch.empty(4, device=device) for _ in range(world)]
        dist.all_gather(outs, mine)
        return torch.equal(torch.stack(outs)[:, 0], expect)

    def broadcast():
        t = mine.clone()
        dist.broadcast(t, 0)
        return bool((t == 1).all())

    def all_reduce():
        t = mine.clone()
        dist.all_reduce(t)
        return bool((t == expect.sum()).all())

    def all_to_all():
        send = torch.full((world, 4), float(rank + 1), device=device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)
        return torch.equal(recv[:, 0], expect)

    # send/recv are not probed: gloo's point-to-point path would hand a device pointer to
    # its TCP transport (the compactfusion "ring" mode is therefore not run here).
    results = {}
    for name, fn in [
        ("all_gather_into_tensor", gather_flat),
        ("all_gather", gather_list),
        ("broadcast", broadcast),
        ("all_reduce", all_reduce),
        ("all_to_all_single", all_to_all),
    ]:
        try:
            results[name] = "ok" if fn() else "wrong values"
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return results


def _payloads(cf, codec: str, backend: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The payloads one sender produces for ``inputs`` (no communication)."""
    comp = cf.ResidualCompressor(cf.CompactConfig(codec=codec, backend=backend))
    return [comp.encode("payload", x).clone() for x in inputs]


def _collective_rank(rank: int, world: int, opts) -> dict:
    _quiet()
    import compactfusion as cf
    from compactfusion.backend import resolve_backend
    from compactfusion.collectives import compressed_all_gather

    device = _device(opts)
    progress = _Progress(opts["progress"], rank)
    probes = _probe_collectives(device)
    progress.add("probes", probes)
    rows, cols = opts["shape"]
    steps = opts["steps"]
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(rows, cols, generator=gen)
    x[:, :: max(1, cols // 16)] *= 10  # outlier channels, as attention K/V have
    inputs = []
    for _ in range(steps):  # a slowly drifting activation, identical for both backends
        x = x + 0.1 * torch.randn(rows, cols, generator=gen)
        inputs.append(x.to(device=device, dtype=dtype))
    steady = min(2, steps - 1)
    for codec in opts["codecs"]:
        runs = {}
        for backend in ("torch", "triton"):
            comp = cf.ResidualCompressor(cf.CompactConfig(codec=codec, backend=backend))
            buf, gathered = None, []
            recorder = SyncRecorder(cuda=device.type == "cuda")
            for step, xs in enumerate(inputs):
                if step == steady:
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    with recorder:
                        buf = compressed_all_gather(comp, "kv", xs, out=buf)
                else:
                    buf = compressed_all_gather(comp, "kv", xs, out=buf)
                gathered.append(buf.clone())
            st = comp.stats()
            bases = {
                repr(("kv", r)): (st["sites"][repr(("kv", r))]["role"], comp.base(("kv", r)))
                for r in range(world)
            }
            sent, raw = comp.sent_bytes()
            runs[backend] = {
                "gathered": gathered,
                "bases": bases,
                "payloads": _payloads(cf, codec, backend, inputs),
                "resolved": resolve_backend(backend, device),
                "stats": {k: st[k] for k in ("kernel_fallbacks", "nonfinite", "raw_sends")},
                "ratio": raw / sent if sent else None,
                "syncs": recorder.summary(),
            }
        t, k = runs["torch"], runs["triton"]
        per_step = [_compare(a, b) for a, b in zip(k["gathered"], t["gathered"], strict=True)]
        base_cmp = {key: _compare(k["bases"][key][1], t["bases"][key][1]) for key in t["bases"]}
        record = {
            "resolved": {b: runs[b]["resolved"] for b in runs},
            "payload_equal_per_step": [
                bool(a.shape == b.shape and torch.equal(a, b))
                for a, b in zip(k["payloads"], t["payloads"], strict=True)
            ],
            "gathered_equal_per_step": [c["equal"] for c in per_step],
            "gathered_max_rel": max(c["rel"] for c in per_step),
            "bases_equal": all(c["equal"] for c in base_cmp.values()),
            "bases_max_rel": max(c["rel"] for c in base_cmp.values()),
            "hashes": {
                b: {key: [role, _digest(base)] for key, (role, base) in runs[b]["bases"].items()}
                for b in runs
            },
            "stats": {b: runs[b]["stats"] for b in runs},
            "ratio": t["ratio"],
            "syncs_in_one_gather": {b: runs[b]["syncs"] for b in runs},
        }
        progress.add(f"codec:{codec}", record)
    return {"done": True}


# --------------------------------------------------------------------------------------------
# e2e: tiny FLUX pipeline
# --------------------------------------------------------------------------------------------
def _bases(pipe) -> dict:
    """``{site repr: (role, base)}`` of a patched pipeline, read through ``stats`` and
    ``ResidualCompressor.base`` (site keys are plain tuples, so their repr round-trips)."""
    import compactfusion as cf
    from compactfusion.api import STATE_ATTR

    state = getattr(pipe, STATE_ATTR)
    sites = cf.stats(pipe)["sites"]
    out = {}
    for key_repr, site in sites.items():
        base = state.compressor.base(ast.literal_eval(key_repr))
        if base is not None:
            out[key_repr] = (site["role"], base.detach().clone())
    return out


def _pipeline_rank(rank: int, world: int, opts) -> dict:
    _quiet()
    _prepare_xfuser(opts["device"])
    from diffusers.utils import logging as diffusers_logging

    import compactfusion as cf
    from compactfusion.backend import resolve_backend
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    diffusers_logging.set_verbosity_error()
    _quiet()  # again: importing xfuser resets the warning filters
    progress = _Progress(opts["progress"], rank)
    cuda = opts["device"] == "cuda"
    pipe = build_pipeline(
        "flux",
        ring=world,
        device=opts["device"],
        dtype=torch.bfloat16,
        head_dim=opts["head_dim"],
        attention_backend=opts["attention_backend"],
    )
    transformer = pipe.module.transformer
    steps, size = opts["steps"], opts["size"]
    steady = min(2, steps - 1)

    def run():
        recorder = SyncRecorder(transformer, cuda=cuda)
        start = time.perf_counter()
        with recorder:
            out = generate(pipe, "flux", steps=steps, height=size, width=size)
        return out, recorder.summary(steady), time.perf_counter() - start

    # xfuser's own ring attention (torch's templated ring attention over gloo): a reference
    # for information; its failure (a collective gloo lacks for this device) is recorded and
    # does not stop the comparisons, whose allgather mode uses other collectives.
    ref = None
    try:
        ref, ref_syncs, ref_s = run()
        unpatched = {"ok": True, "syncs": ref_syncs, "seconds": ref_s}
    except Exception as exc:
        unpatched = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:1000]}"}
    progress.add("unpatched", unpatched)
    for codec in opts["codecs"]:
        runs = {}
        # torch twice: whether the whole patched model is bit-repeatable on this device
        for backend in ("torch", "torch-again", "triton"):
            cfg = cf.CompactConfig(codec=codec, backend=backend.split("-")[0], mode="allgather")
            with cf.patched(pipe, cfg):
                out, syncs, seconds = run()
                st = cf.stats(pipe)
                bases = _bases(pipe)
            runs[backend] = {
                "out": out,
                "bases": bases,
                "resolved": resolve_backend(cfg.backend, torch.device(opts["device"])),
                "syncs": syncs,
                "seconds": seconds,
                "stats": {
                    "kernel_fallbacks": st["kernel_fallbacks"],
                    "nonfinite": st["nonfinite"],
                    "ratio_after_warmup": st["ratio_after_warmup"],
                    "median_step_ms": 1e3 * statistics.median(st["seconds_per_step"]),
                },
            }
        t, k, t2 = runs["torch"], runs["triton"], runs.pop("torch-again")
        base_cmp = {key: _compare(k["bases"][key][1], t["bases"][key][1]) for key in t["bases"]}
        repeat = _compare(t2["out"], t["out"])
        repeat_bases = all(
            torch.equal(t2["bases"][key][1], base) for key, (_, base) in t["bases"].items()
        )
        record = {
            "resolved": {b: runs[b]["resolved"] for b in runs},
            "torch_repeatable": repeat["equal"] and repeat_bases,
            "torch_repeat_rel": repeat["rel"],
            "output": _compare(k["out"], t["out"]),
            "triton_vs_unpatched_rel": None if ref is None else _compare(k["out"], ref)["rel"],
            "bases_compared": len(base_cmp),
            "bases_equal": all(c["equal"] for c in base_cmp.values()),
            "bases_max_rel": max((c["rel"] for c in base_cmp.values()), default=0.0),
            "same_sites": sorted(k["bases"]) == sorted(t["bases"]),
            "hashes": {
                b: {key: [role, _digest(base)] for key, (role, base) in runs[b]["bases"].items()}
                for b in runs
            },
            "stats": {b: runs[b]["stats"] for b in runs},
            "syncs": {b: runs[b]["syncs"] for b in runs},
            "seconds": {b: runs[b]["seconds"] for b in runs},
        }
        progress.add(f"codec:{codec}", record)
    return {"done": True}


# --------------------------------------------------------------------------------------------
# e2e: verdicts
# --------------------------------------------------------------------------------------------
def _sender_receiver_failures(label: str, ranks: list[dict]) -> list[str]:
    """Every site's sender base must equal each receiver's copy (hashes across ranks)."""
    failures = []
    for backend in ("torch", "triton"):
        senders, receivers = {}, {}
        for rank, rec in enumerate(ranks):
            for key, (role, digest) in rec["hashes"][backend].items():
                (senders if role == "send" else receivers).setdefault(key, []).append(
                    (rank, digest)
                )
        if not senders:
            failures.append(f"{label} {backend}: no sender bases recorded")
        for key, sent in senders.items():
            for rank, digest in receivers.get(key, []):
                if digest != sent[0][1]:
                    failures.append(
                        f"{label} {backend}: base {key} differs between its sender (rank "
                        f"{sent[0][0]}) and receiver rank {rank}"
                    )
            if not receivers.get(key):
                failures.append(f"{label} {backend}: base {key} has no receiver copy")
    return failures


def _backend_failures(label: str, ranks: list[dict]) -> list[str]:
    """Each run used the backend it asked for, and the Triton runs never fell back to torch
    (otherwise "triton == torch" would be true for the wrong reason)."""
    failures = []
    for rank, rec in enumerate(ranks):
        for backend, resolved in rec["resolved"].items():
            if resolved != backend:
                failures.append(f"{label} rank {rank}: backend {backend} resolved to {resolved}")
        n = rec["stats"]["triton"]["kernel_fallbacks"]
        if n:
            failures.append(f"{label} triton rank {rank}: {n} kernel fallback(s) to torch")
    return failures


def _judge(kind: str, codecs: list[str], ranks: list[dict]) -> list[str]:
    """Failures of one part's records (see the module docstring for what must hold)."""
    failures = []
    for codec in codecs:
        label = f"{kind} {codec}"
        recs = [r.get(f"codec:{codec}") for r in ranks]
        if any(rec is None for rec in recs):
            failures.append(f"{label}: not completed on every rank")
            continue
        failures += _sender_receiver_failures(label, recs)
        failures += _backend_failures(label, recs)
        if kind == "collective":
            # The first compressed step's payload depends only on the inputs and on bases set
            # exactly by the raw warm-up; later ones also on earlier reconstructions.
            from compactfusion import CompactConfig

            first = CompactConfig().warmup_steps
            for rank, rec in enumerate(recs):
                flags = rec["payload_equal_per_step"]
                checked = flags[: first + 1] if codec in TOLERANCE_CODECS else flags
                if not all(checked):
                    bad = [i for i, ok in enumerate(checked) if not ok]
                    failures.append(f"{label} rank {rank}: triton != torch payloads at steps {bad}")
        repeatable = all(rec.get("torch_repeatable", True) for rec in recs)
        if codec in TOLERANCE_CODECS or not repeatable:
            continue
        for rank, rec in enumerate(recs):
            if kind == "collective":
                if not all(rec["gathered_equal_per_step"]):
                    failures.append(
                        f"{label} rank {rank}: triton != torch gathered tensors at steps "
                        f"{[i for i, ok in enumerate(rec['gathered_equal_per_step']) if not ok]}"
                        f" (max rel {rec['gathered_max_rel']:.3g})"
                    )
            else:
                if not rec["same_sites"]:
                    failures.append(f"{label} rank {rank}: different site sets per backend")
                if not rec["output"]["equal"]:
                    failures.append(
                        f"{label} rank {rank}: triton != torch output (rel "
                        f"{rec['output']['rel']:.3g})"
                    )
            if not rec["bases_equal"]:
                failures.append(
                    f"{label} rank {rank}: triton != torch bases (max rel "
                    f"{rec['bases_max_rel']:.3g})"
                )
    return failures


def cmd_e2e(args) -> int:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for the dry run")
    shape, head_dim, size, steps = SIZES[device]
    opts = {
        "device": device,
        "codecs": args.codecs,
        "shape": shape,
        "steps": args.steps or steps,
        "head_dim": head_dim,
        "size": size,
        "attention_backend": args.attention_backend,
    }
    report = {"device": device, "options": opts, "parts": {}}
    prefix = os.path.splitext(args.out)[0]
    all_failures = []
    deadline = time.monotonic() + args.timeout
    for part, fn in (("collective", _collective_rank), ("pipeline", _pipeline_rank)):
        if part not in args.parts:
            continue
        start = time.perf_counter()
        # The collective part may use 40% of the time, the pipeline part what is left.
        share = 0.4 * args.timeout if part == "collective" else args.timeout
        timeout = max(1.0, min(share, deadline - time.monotonic()))
        _, error, ranks = _spawn(fn, opts, timeout, f"{prefix}_{part}")
        failures = [f"{part}: {error}"] if error else []
        failures += _judge(part, args.codecs, ranks)
        notes = []
        for codec in args.codecs:
            recs = [r.get(f"codec:{codec}") or {} for r in ranks]
            if not all(rec.get("torch_repeatable", True) for rec in recs):
                notes.append(
                    f"{codec}: two torch-backend runs differ (the model is not bit-repeatable "
                    "here): triton vs torch is reported, not required to be equal"
                )
        report["parts"][part] = {
            "seconds": round(time.perf_counter() - start, 1),
            "error": error,
            "failures": failures,
            "notes": notes,
            "ranks": ranks,
        }
        all_failures += failures
        _write_json(args.out, report)
        _print_part(part, report["parts"][part], args.codecs)
    report["failures"] = all_failures
    report["passed"] = not all_failures
    _write_json(args.out, report)
    print(f"wrote {args.out}")
    if all_failures:
        print("E2E FAILED:\n  " + "\n  ".join(all_failures))
    print(_headline(report, args.codecs))
    return 1 if all_failures else 0


def _headline(report: dict, codecs: list[str]) -> str:
    """One line for the summary table: verdict and the first codec's steady-step syncs."""
    failures = report["failures"]
    verdict = f"E2E FAILED ({len(failures)}): {failures[0][:160]}" if failures else "E2E passed"
    pipeline = report["parts"].get("pipeline")
    rec = pipeline["ranks"][0].get(f"codec:{codecs[0]}") if pipeline and pipeline["ranks"] else None
    if rec and report["device"] == "cuda":
        syncs = ", ".join(f"{b} {s['steady_step_syncs']}" for b, s in rec["syncs"].items())
        verdict += f"; {codecs[0]} syncs in a steady step: {syncs}"
    return verdict


def _sync_counts(per_backend: dict, field: str) -> str:
    if not all(s["enabled"] for s in per_backend.values()):
        return "n/a (CPU)"
    return ", ".join(f"{b} {s[field]}" for b, s in per_backend.items())


def _print_part(part: str, data: dict, codecs: list[str]) -> None:
    print(f"== {part} ({data['seconds']} s)")
    ranks = data["ranks"]
    if ranks and "probes" in ranks[0]:
        print("  gloo probes: " + ", ".join(f"{k}={v}" for k, v in ranks[0]["probes"].items()))
    if ranks and "unpatched" in ranks[0]:
        u = ranks[0]["unpatched"]
        if not u["ok"]:
            print(f"  unpatched (xfuser ring attention): failed (information) {u['error'][:300]}")
        elif u["syncs"]["enabled"]:
            print(
                f"  unpatched: syncs in a steady step {u['syncs']['steady_step_syncs']} "
                f"(per step {u['syncs']['per_step']})"
            )
    for codec in codecs:
        rec = ranks[0].get(f"codec:{codec}") if ranks else None
        if rec is None:
            print(f"  {codec}: not completed")
            continue
        if part == "collective":
            equal = all(rec["gathered_equal_per_step"]) and rec["bases_equal"]
            payloads = "".join("=" if ok else "x" for ok in rec["payload_equal_per_step"])
            syncs = _sync_counts(rec["syncs_in_one_gather"], "total")
            detail = (
                f"payloads per step [{payloads}], gathered max rel "
                f"{rec['gathered_max_rel']:.3g}, syncs in one gather {syncs}"
            )
        else:
            equal = rec["output"]["equal"] and rec["bases_equal"]
            syncs = _sync_counts(rec["syncs"], "steady_step_syncs")
            detail = (
                f"output rel {rec['output']['rel']:.3g}, torch repeatable "
                f"{rec['torch_repeatable']}, syncs in a steady step {syncs}"
            )
        print(f"  {codec}: triton==torch {equal}; {detail}")
    for note in data["notes"]:
        print(f"  note: {note}")
    for failure in data["failures"]:
        print(f"  FAIL {failure}")


# --------------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------------
def _dynamo_counters() -> dict:
    from torch._dynamo.utils import counters

    breaks = counters.get("graph_break", {})
    return {
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": {k[:200]: v for k, v in Counter(breaks).most_common(10)},
        "unique_graphs": counters.get("stats", {}).get("unique_graphs", 0),
        "stats": dict(counters.get("stats", {})),
        "inductor": {k: v for k, v in counters.get("inductor", {}).items() if "cudagraph" in k},
    }


def _compile_rank(rank: int, world: int, opts) -> dict:
    _quiet()
    _prepare_xfuser(opts["device"])
    import torch._dynamo
    from diffusers.utils import logging as diffusers_logging

    import compactfusion as cf
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    diffusers_logging.set_verbosity_error()
    _quiet()  # again: importing xfuser resets the warning filters
    progress = _Progress(opts["progress"], rank)
    steps, size = opts["steps"], opts["size"]

    def fresh_pipe():
        return build_pipeline(
            "flux",
            ring=world,
            device=opts["device"],
            dtype=torch.bfloat16,
            head_dim=opts["head_dim"],
            attention_backend=opts["attention_backend"],
        )

    def attempt(label, pipe, config):
        """Eager generation, then compiled generations; the outcome as a dict (recorded after
        each phase, so that a stage timeout still shows how far it got)."""
        record = {"config": config.as_dict() if config is not None else None, "ok": False}
        try:
            if config is not None:
                cf.patch(pipe, config)
            eager = generate(pipe, "flux", steps=steps, height=size, width=size)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            kwargs = {"backend": opts["compile_backend"]}
            if opts["compile_mode"]:
                kwargs["mode"] = opts["compile_mode"]
            pipe.module.transformer.compile(**kwargs)
            record["phase"] = "compiling (first compiled generation)"
            progress.add(label, record)
            times = []
            for _ in range(2):  # first call compiles, second replays
                start = time.perf_counter()
                out = generate(pipe, "flux", steps=steps, height=size, width=size)
                times.append(round(time.perf_counter() - start, 3))
                record.update(seconds=times, dynamo=_dynamo_counters())
                record["phase"] = f"{len(times)} compiled generation(s) done"
                progress.add(label, record)
            record.update(ok=True, vs_eager=_compare(out, eager))
            if config is not None:
                st = cf.stats(pipe)
                record["kernel_fallbacks"] = st["kernel_fallbacks"]
        except Exception as exc:
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
            record["traceback_tail"] = traceback.format_exc()[-3000:]
        record["dynamo"] = _dynamo_counters()
        progress.add(label, record)

    attempt("patched", fresh_pipe(), cf.CompactConfig(codec="int2", mode="allgather"))
    if opts["baseline"]:
        attempt("unpatched", fresh_pipe(), None)
    return {"done": True}


def cmd_compile(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu for the dry run")
    _, head_dim, size, _ = SIZES[args.device]
    opts = {
        "device": args.device,
        # Each step may recompile (guards on per-step state): the fewest steps that include a
        # compressed one after the warm-up.
        "steps": args.steps or 3,
        "head_dim": head_dim,
        "size": size,
        "attention_backend": args.attention_backend,
        "compile_backend": args.backend,
        "compile_mode": args.mode if args.backend == "inductor" else None,
        "baseline": not args.no_baseline,
    }
    start = time.perf_counter()
    _, error, ranks = _spawn(_compile_rank, opts, args.timeout, os.path.splitext(args.out)[0])
    report = {
        "note": "information only: the compile-safe work (issue 10) may not have landed",
        "options": opts,
        "seconds": round(time.perf_counter() - start, 1),
        "error": error,
        "ranks": ranks,
    }
    _write_json(args.out, report)
    mode = opts["compile_mode"]
    print(f"== compile ({report['seconds']} s, backend {args.backend}, mode {mode})")
    for label in ("patched", "unpatched"):
        rec = ranks[0].get(label) if ranks else None
        if rec is None:
            print(f"  {label}: not attempted")
        elif not rec["ok"] and "error" not in rec:
            print(
                f"  {label}: did not finish ({rec.get('phase')}; s/generation so far "
                f"{rec.get('seconds')})"
            )
        elif rec["ok"]:
            print(
                f"  {label}: compiled; {rec['dynamo']['graph_breaks']} graph breaks, "
                f"{rec['dynamo']['unique_graphs']} graphs, s/generation {rec['seconds']}, "
                f"equal to eager {rec['vs_eager']['equal']} (rel {rec['vs_eager']['rel']:.3g})"
            )
        else:
            print(f"  {label}: FAILED (information) {rec['error'][:300]}")
    if error:
        print(f"  spawn: {error[:500]}")
    print(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------------------------
# targets and summary
# --------------------------------------------------------------------------------------------
def kernel_targets(csv_path: str, min_bytes: int = 8 << 20) -> list[dict]:
    """Issue 15's targets per (codec, size, op) for bf16 inputs of at least ``min_bytes``:
    int1/int2 need >= 80% of the measured copy bandwidth and >= 3x eager torch; the other
    codecs are reported without a target."""
    rows = [r for r in read_csv(csv_path) if r["impl"] == "triton" and r["dtype"] == "bf16"]
    out = []
    for r in rows:
        nbytes = int(r["rows"]) * int(r["cols"]) * 2
        if nbytes < min_bytes:
            continue
        pct, speedup = float(r["pct_copy_bw"]), float(r["speedup_vs_torch"])
        has_target = r["codec"] in ("int1", "int2")
        out.append(
            {
                "codec": r["codec"],
                "size": r["size"],
                "op": r["op"],
                "pct_copy_bw": pct,
                "speedup_vs_torch": speedup,
                "target_met": (pct >= 80 and speedup >= 3) if has_target else None,
                "device": r["device"],
            }
        )
    return out


def cmd_targets(args) -> int:
    if not os.path.exists(args.csv):
        print(f"no {args.csv}: the kernel benchmark did not write it")
        return 0
    rows = kernel_targets(args.csv)
    _write_json(args.out, rows)
    if not rows:
        print("no bf16 rows of >= 8 MB in the CSV (smoke sizes?): targets not evaluated")
        return 0
    print("kernel targets (bf16 >= 8 MB; int1/int2: >= 80% copy bandwidth and >= 3x torch):")
    for r in rows:
        verdict = {True: "met", False: "MISSED", None: "(reported)"}[r["target_met"]]
        print(
            f"  {r['codec']:9s} {r['size']:28s} {r['op']}: {r['pct_copy_bw']:6.1f}% copy, "
            f"x{r['speedup_vs_torch']:.2f} vs torch  {verdict}"
        )
    return 0


def junit_counts(xml_path: str) -> dict:
    """Test counts of a pytest junit xml (all test suites summed)."""
    import xml.etree.ElementTree as ET

    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    counts["skipped"] = sum(int(s.get("skipped", 0)) for s in suites)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def cmd_junit(args) -> int:
    """One line of counts; exit 1 when the file is missing or no test ran and passed."""
    if not os.path.exists(args.xml):
        print(f"no {os.path.basename(args.xml)}: pytest did not run")
        return 1
    c = junit_counts(args.xml)
    print(
        f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, "
        f"{c['skipped']} skipped"
    )
    return 0 if c["passed"] > 0 and not (c["failures"] or c["errors"]) else 1


def cmd_summary(args) -> int:
    """Render the stage log (``name<TAB>status<TAB>seconds<TAB>exit code<TAB>note``)."""
    stages = []
    with open(args.stages) as f:
        for line in f:
            name, status, seconds, code, note = (line.rstrip("\n").split("\t") + [""] * 5)[:5]
            stages.append(
                {
                    "stage": name,
                    "status": status,
                    "seconds": float(seconds or 0),
                    "exit": code,
                    "note": note,
                }  # fmt: skip
            )
    env = {}
    if args.env and os.path.exists(args.env):
        with open(args.env) as f:
            env = json.load(f)
    else:  # no env stage in this run: this interpreter's versions
        env["torch"], env["triton"] = version("torch"), version("triton", missing=None)
        if torch.cuda.is_available():
            env["device"] = {"name": torch.cuda.get_device_name(0)}
    device = (env.get("device") or {}).get("name") or platform.machine() + " (no CUDA)"
    failed = [s["stage"] for s in stages if s["status"] in ("FAIL", "TIMEOUT")]
    summary = {
        "device": device,
        "torch": env.get("torch"),
        "triton": env.get("triton"),
        "dry_run": args.dry_run,
        "stages": stages,
        "failed": failed,
        "total_seconds": round(sum(s["seconds"] for s in stages), 1),
    }
    lines = [
        f"compactfusion gpu-check on {device} (torch {env.get('torch')}, triton "
        f"{env.get('triton')}){' -- CPU DRY RUN' if args.dry_run else ''}",
        f"{'stage':10s} {'status':8s} {'seconds':>8s}  note",
    ]
    for s in stages:
        lines.append(f"{s['stage']:10s} {s['status']:8s} {s['seconds']:8.1f}  {s['note']}")
    lines.append(f"total {summary['total_seconds']:.1f} s; failed: {', '.join(failed) or 'none'}")
    text = "\n".join(lines)
    print(text)
    with open(args.out_txt, "w") as f:
        f.write(text + "\n")
    _write_json(args.out_json, summary)
    return 0


# --------------------------------------------------------------------------------------------
def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("env", help="environment stamp (JSON)")
    e.add_argument("--out", required=True)

    for name, help_text in (("e2e", "(c) triton vs torch, two ranks"), ("compile", "(d)")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
        s.add_argument("--out", required=True, help="JSON file to write")
        s.add_argument("--steps", type=int, default=None, help="denoising steps / gathers")
        s.add_argument("--timeout", type=float, default=100.0, help="seconds for the spawned ranks")
        s.add_argument(
            "--attention-backend",
            default=None,
            help="xfuser AttentionBackendType name (default: xfuser's choice)",
        )
    e2e = sub.choices["e2e"]
    e2e.add_argument("--codecs", nargs="+", choices=CODECS, default=CODECS)
    e2e.add_argument(
        "--parts", nargs="+", choices=["collective", "pipeline"], default=["collective", "pipeline"]
    )
    comp = sub.choices["compile"]
    comp.add_argument("--backend", default="inductor", help="torch.compile backend")
    comp.add_argument("--mode", default="reduce-overhead", help="torch.compile mode (inductor)")
    comp.add_argument("--no-baseline", action="store_true", help="skip the unpatched attempt")

    t = sub.add_parser("targets", help="issue 15's kernel targets from kernels.csv")
    t.add_argument("--csv", required=True)
    t.add_argument("--out", required=True)

    j = sub.add_parser("junit", help="counts of a pytest junit xml; fails if none passed")
    j.add_argument("--xml", required=True)

    s = sub.add_parser("summary", help="summary of gpu_check.sh's stage log")
    s.add_argument("--stages", required=True)
    s.add_argument("--env", default=None)
    s.add_argument("--out-txt", required=True)
    s.add_argument("--out-json", required=True)
    s.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if getattr(args, "steps", None) is not None and args.steps < 3:
        p.error("--steps must be at least 3 (warm-up, first compressed step, steady state)")
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    handlers = {
        "env": cmd_env,
        "e2e": cmd_e2e,
        "compile": cmd_compile,
        "targets": cmd_targets,
        "junit": cmd_junit,
        "summary": cmd_summary,
    }
    return handlers[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
