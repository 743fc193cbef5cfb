"""Fidelity of compressed K/V exchange: per-step K/V error and final-output PSNR/SSIM.

For every codec (int1, int2, fp8, nm_sparse, lowrank) three variants run the same seeded
generation with compactfusion's compressed all-gather (``mode="allgather"``, ring attention
over all ranks, 1 raw warm-up step; ``--mode stale`` runs compressed DistriFusion instead):

* ``naive``        ``residual=False``: the activation itself is compressed every step;
* ``no_feedback``  ``error_feedback=False``: residual against the sender's exact previous
                   activation, so the receiver's reconstruction drifts (errors accumulate);
* ``feedback``     the default: residual against the shared reconstruction (error feedback);

plus one uncompressed run (codec ``raw``, same mode), the reference.

Metrics
-------
``kv_rel_err`` (per step): what the receivers reconstructed of their peers' K/V against the
exact K/V those peers computed in the same run, ``||recon - exact||_F / ||exact||_F`` summed
over every layer and every (sender, receiver) pair. This is the error the exchange introduces
at that step.

``kv_rel_err_vs_ref`` (per step): the same reconstruction against the K/V of the uncompressed
run at the same step and layer: exchange error plus the drift of the whole trajectory. Only
computed while the uncompressed run's K/V fit in ``--ref-kv-budget-mb`` (always for the tiny
model).

In stale mode a payload encoded at step t is decoded (and measured) at step t + 1, against
the K/V of step t: the error is the compression's, the staleness is DistriFusion's and shows in
the output of the uncompressed stale run as much. That run sends its K/V outside the
compressor, so it has no K/V rows (``n/a``) and there is no ``vs_ref`` metric. (Its first
compressed payload, sent right after the warm-up's raw gather, carries a zero residual: step 1
shows no error for the residual variants, which lowers their mean a little.)

``psnr_db``, ``ssim``, ``out_rel_err``: the decoded image of each run against the uncompressed
parallel run's image (values in [0, 1]; SSIM with an 11x11 Gaussian window, sigma 1.5,
``C1 = 0.01^2``, ``C2 = 0.03^2``, mean over channels, as in Wang et al. 2004).
``wire_ratio``: raw K/V bytes / payload bytes after warm-up (``compactfusion.stats``).

How the K/V are observed: an observer on the patched pipeline's ``ResidualCompressor``
(``ResidualCompressor.add_observer``) sees every sent K/V site's exact activation and every
received one's reconstruction. It all-gathers each sent activation raw on the default group
(outside compactfusion's own traffic: every rank sends the same site in the same order, and
the ring group is the whole world here) and compares each reconstruction with the peer's
exact tensor. Errors are accumulated per step on the fly, so memory stays at one layer's K/V
(the uncompressed run's K/V are stored only for the ``vs_ref`` metric, within the budget).

Default: a tiny random FLUX (2 double + 2 single blocks, 4 heads x 64, bf16, 64x64 px, 20
steps) through xfuser's ``xFuserFluxPipeline`` with ``ring_degree=2`` on 2 gloo CPU ranks.
``--model PATH`` loads a local diffusers FLUX or CogVideoX checkpoint instead (CUDA + NCCL when
there are enough GPUs, otherwise CPU + gloo, which is very slow) and generates
``--num-images`` prompts; FID and LPIPS are added when ``torchmetrics`` (with torch-fidelity)
and ``lpips`` are installed and their weights are already in the torch hub cache (nothing is
downloaded; the report says why a metric is missing).

Synthetic trajectory (``--trajectory``): no model and no ranks. The K/V-like generator of
``compactfusion.testing.trajectory`` (1024 x 3072 bf16, 28 steps; outlier channels, sink
tokens, spikes, rotating low-rank + dense drift, and a variant with lognormal channel scales
only) goes through a sender and a receiver ``ResidualCompressor`` (step 0 raw), for int1/int2
with channel scales (``mean``, the default) and without (``none``, the previous scheme), each
as naive / no_feedback / feedback; plus two feedback-only experiments that take the channel
scales from state both sides share instead of sending them (``derived_base``: the per-channel
mean |base|; ``derived_prev``: of the previous decoded residual), fp8, and lowrank with 1 and
2 subspace iterations. Writes ``quality_trajectory.csv`` (one row per run),
``quality_trajectory_steps.csv`` (the receiver's relative error per step), ``.md`` and ``.png``.

    python benchmarks/quality.py --trajectory             # synthetic K/V, ~1-2 min on 2 cores
    python benchmarks/quality.py                          # tiny FLUX, all codecs, CPU
    python benchmarks/quality.py --smoke --out /tmp/q     # seconds-long check (int2 only)
    python benchmarks/quality.py --mode stale             # compressed DistriFusion
    python benchmarks/quality.py --model /path/to/FLUX.1-dev --steps 28 --size 1024
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import machine_stamp, psnr, read_csv, ssim, write_csv  # noqa: E402
from compactfusion.testing import spawn_ranks  # noqa: E402

CODECS = ("int1", "int2", "fp8", "nm_sparse", "lowrank")
VARIANTS = {  # CompactConfig overrides of each ablation
    "naive": {"residual": False},
    "no_feedback": {"error_feedback": False},
    "feedback": {},
}
WARMUP_STEPS = 1
PROMPTS = (
    "a photo of a red fox sitting in fresh snow, morning light",
    "a watercolor painting of a lighthouse on a rocky coast",
    "a bowl of ramen on a wooden table, studio photograph",
    "an astronaut riding a horse on the moon, detailed illustration",
)
SUMMARY_FIELDS = [
    "workload",
    "codec",
    "variant",
    "steps",
    "final_kv_rel_err",
    "mean_kv_rel_err",
    "final_kv_rel_err_vs_ref",
    "psnr_db",
    "ssim",
    "out_rel_err",
    "wire_ratio",
    "fid",
    "lpips",
    "device",
    "torch",
    "xfuser",
    "note",
]
STEP_FIELDS = ["workload", "codec", "variant", "step", "kv_rel_err", "kv_rel_err_vs_ref"]


# --------------------------------------------------------------------------------------------
# Image metrics beyond PSNR/SSIM (benchmarks._report)
# --------------------------------------------------------------------------------------------
def _hub_checkpoint(filename: str) -> str | None:
    path = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    return path if os.path.exists(path) else None


def optional_metrics(ref: torch.Tensor, test: torch.Tensor) -> tuple[dict, list[str]]:
    """FID and LPIPS of ``test`` against ``ref`` (``[N, 3, H, W]`` in [0, 1]) when the packages
    and their weights are present locally; otherwise the reasons they are missing."""
    values, notes = {}, []
    try:
        import lpips  # noqa: F401
    except ImportError:
        notes.append("LPIPS not computed: package 'lpips' not installed")
    else:
        if _hub_checkpoint("alexnet-owt-7be5be79.pth") is None:
            notes.append("LPIPS not computed: AlexNet weights not in the torch hub cache")
        else:
            import lpips

            net = lpips.LPIPS(net="alex", verbose=False)
            with torch.no_grad():
                d = net(ref.float() * 2 - 1, test.float() * 2 - 1)
            values["lpips"] = float(d.mean())
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        notes.append("FID not computed: torchmetrics (with torch-fidelity) not installed")
    else:
        if _hub_checkpoint("weights-inception-2015-12-05-6726825d.pth") is None:
            notes.append("FID not computed: Inception weights not in the torch hub cache")
        elif ref.shape[0] < 2:
            notes.append("FID not computed: needs at least 2 images per set (--num-images)")
        else:
            fid = FrechetInceptionDistance(normalize=True)
            fid.update(ref.float(), real=True)
            fid.update(test.float(), real=False)
            values["fid"] = float(fid.compute())
            if ref.shape[0] < 50:
                notes.append(f"FID over only {ref.shape[0]} images: noisy")
    return values, notes


# --------------------------------------------------------------------------------------------
# K/V observation
# --------------------------------------------------------------------------------------------
def _kv_layer(key) -> str | None:
    """The layer of a K/V site key, or None for other sites: ``((layer, "kv"), src)`` (ring and
    stale modes) or ``("layer/kv", src)`` (the all-gather exchange)."""
    site = key[0] if isinstance(key, tuple) and key else None
    if isinstance(site, tuple) and len(site) == 2 and site[1] == "kv":
        return site[0]
    if isinstance(site, str) and site.endswith("/kv"):
        return site[: -len("/kv")]
    return None


class KVProbe:
    """Per-step K/V error of one patched pipeline on one rank (see the module docstring).

    Registers an observer on the pipeline's compressor (``ResidualCompressor.add_observer``):
    a sent K/V site's exact activation is all-gathered raw on the default group, and each
    received one's reconstruction is compared with its sender's exact tensor. :meth:`close`
    removes the observer.
    """

    def __init__(self, pipe, reference: dict | None = None, store_budget: int = 0):
        self.state = pipe._compactfusion_state
        self.reference = reference  # (step, layer, src) -> K/V of the uncompressed run
        self.store_budget = store_budget  # bytes: store this run's exact K/V up to this much
        self.stored: dict | None = {} if store_budget > 0 else None
        self.stored_bytes = 0
        self.err: dict[int, list[float]] = {}  # step -> [err^2, norm^2, ref err^2, ref norm^2]
        self._exact: dict = {}
        self._world = dist.get_world_size()
        self._handle = self.state.compressor.add_observer(self._observe)

    def _observe(self, transfer) -> None:
        layer = _kv_layer(transfer.key)
        if layer is None:
            return
        if transfer.role == "recv":
            self._measure(layer, transfer.key[1], transfer.value)
            return
        # Every rank sends the same K/V sites in the same order (the ring group is the whole
        # world here), so this raw all-gather, outside compactfusion's traffic, lines up.
        x = transfer.value.contiguous()
        gathered = [torch.empty_like(x) for _ in range(self._world)]
        dist.all_gather(gathered, x)
        for src, t in enumerate(gathered):
            self._exact[(layer, src)] = t
        self._store(layer, gathered)

    def _store(self, layer, gathered) -> None:
        if self.stored is None:
            return
        step = self.state.step
        for src, t in enumerate(gathered):
            if self.stored_bytes + t.numel() * t.element_size() > self.store_budget:
                self.stored = None  # over budget: no vs_ref metric for later runs
                return
            self.stored[(step, layer, src)] = t.reshape(-1).cpu().clone()
            self.stored_bytes += t.numel() * t.element_size()

    def _measure(self, layer, src, recon) -> None:
        step = self.state.step
        exact = self._exact.pop((layer, src)).double()
        r = recon.double()
        acc = self.err.setdefault(step, [0.0, 0.0, 0.0, 0.0])
        acc[0] += float(((r - exact) ** 2).sum())
        acc[1] += float((exact**2).sum())
        if self.reference is not None:
            ref = self.reference.get((step, layer, src))
            if ref is not None:
                r = r.reshape(-1)  # every codec sees the same token-major [B*S, 2*H*D]
                ref = ref.to(r.device).double()
                acc[2] += float(((r - ref) ** 2).sum())
                acc[3] += float((ref**2).sum())

    def close(self) -> None:
        self._handle.remove()

    def per_step(self) -> list[tuple[float, float]]:
        """``(kv_rel_err, kv_rel_err_vs_ref)`` per step, summed over all ranks (collective)."""
        steps = max(self.err) + 1 if self.err else 0
        t = torch.zeros(steps, 4, dtype=torch.float64)
        for s, acc in self.err.items():
            t[s] = torch.tensor(acc, dtype=torch.float64)
        dev = _comm_device()
        t = t.to(dev)
        dist.all_reduce(t)
        t = t.cpu()
        out = []
        for s in range(steps):
            e = math.sqrt(t[s, 0] / t[s, 1]) if t[s, 1] > 0 else math.nan
            r = math.sqrt(t[s, 2] / t[s, 3]) if t[s, 3] > 0 else math.nan
            out.append((e, r))
        return out


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------
def _quiet() -> None:
    os.environ.setdefault("LOG_LEVEL", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kept in float32.*")


def _build(rank: int, world: int, opts: dict):
    """``(pipe, generate_fn, workload_name, kv_batch)`` for the tiny model or a local
    checkpoint (``kv_batch``: the batch of the transformer's K/V, 2 with CFG as a batch)."""
    if not torch.cuda.is_available():
        from compactfusion.testing import prepare_xfuser_cpu

        prepare_xfuser_cpu()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    dtype = getattr(torch, opts["dtype"])
    if opts["model"] is None:
        from compactfusion.testing.tiny_pipelines import build_pipeline, generate

        pipe = build_pipeline(
            "flux", ring=world, dtype=dtype, head_dim=opts["head_dim"],
            num_layers=opts["layers"], num_single_layers=opts["layers"],
        )  # fmt: skip

        def run(seed: int) -> torch.Tensor:
            return generate(
                pipe, "flux", steps=opts["steps"], seed=seed, height=opts["size"],
                width=opts["size"], output_type="pt",
            ).float()  # fmt: skip

        name = f"tiny-flux ({opts['layers']}+{opts['layers']} blocks, 4x{opts['head_dim']})"
        return pipe, run, name, 1
    return _build_real(rank, world, opts, dtype)


def _build_real(rank: int, world: int, opts: dict, dtype: torch.dtype):
    import xfuser

    from compactfusion.testing.tiny_pipelines import (
        build_engine_config,
        init_xfuser_distributed,
        share_output,
    )

    path = opts["model"]
    with open(os.path.join(path, "model_index.json")) as f:
        family = json.load(f)["_class_name"]
    classes = {"FluxPipeline": "xFuserFluxPipeline", "CogVideoXPipeline": "xFuserCogVideoXPipeline"}
    if family not in classes:
        raise SystemExit(f"--model: unsupported pipeline {family!r}; supported: {sorted(classes)}")
    engine_config = build_engine_config(ring=world, dtype=dtype)
    init_xfuser_distributed(engine_config)
    cls = getattr(xfuser, classes[family])
    pipe = cls.from_pretrained(
        path, engine_config=engine_config, torch_dtype=dtype, local_files_only=True
    )
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    def run(seed: int) -> torch.Tensor:
        kwargs = dict(
            prompt=PROMPTS[seed % len(PROMPTS)],
            num_inference_steps=opts["steps"],
            height=opts["size"],
            width=opts["size"],
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="pt",
            return_dict=False,
        )
        if family == "CogVideoXPipeline":
            kwargs.update(num_frames=opts["frames"], width=opts["size"] * 3 // 2)
        result = pipe(**kwargs)
        out = result[0] if result is not None else None
        if isinstance(out, list):
            out = None if all(o is None for o in out) else torch.stack(out)
        out = None if out is None else out.detach().float().cpu()
        out = share_output(out)
        if out.dim() == 5:  # video [B, F, C, H, W]: frames as a batch of images
            out = out.flatten(0, 1)
        return out

    name = f"{family} {os.path.basename(os.path.normpath(path))}"
    return pipe, run, name, 2 if family == "CogVideoXPipeline" else 1  # CogVideoX: CFG batch


def _rank(rank: int, world: int, opts: dict):
    _quiet()
    import compactfusion as cf

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    pipe, run, workload, kv_batch = _build(rank, world, opts)
    runs = [("raw", "uncompressed")]
    runs += [(c, v) for c in opts["codecs"] for v in opts["variants"]]
    seeds = list(range(opts["num_images"]))
    reference, budget = None, opts["ref_kv_budget_mb"] * 2**20
    results = []
    for codec, variant in runs:
        if codec == "raw":
            cfg = cf.CompactConfig.preset("raw", mode=opts["mode"])
        else:
            cfg = cf.CompactConfig.preset(
                codec,
                mode=opts["mode"],
                warmup_steps=WARMUP_STEPS,
                **VARIANTS[variant],
            )
        images, step_errs, ratios = [], None, []
        start = time.perf_counter()
        for i, seed in enumerate(seeds):
            with cf.patched(pipe, cfg):
                store = budget if codec == "raw" and i == 0 else 0
                probe = KVProbe(pipe, reference if i == 0 else None, store)
                try:
                    images.append(run(seed))
                finally:
                    probe.close()
                st = cf.stats(pipe)
            if i == 0:  # K/V errors from the first prompt
                step_errs = probe.per_step()
                if codec == "raw" and step_errs:  # (raw stale bypasses the compressor)
                    reference = probe.stored
            ratios.append(st.get("ratio_after_warmup", math.nan))
        results.append(
            {
                "codec": codec,
                "variant": variant,
                "images": torch.cat(images),
                "step_errs": step_errs,
                "wire_ratio": statistics.median(ratios),
                "seconds": time.perf_counter() - start,
                "vs_ref": reference is not None,
            }
        )
    cuda = torch.cuda.is_available()
    machine = machine_stamp(cuda, "" if cuda else f"{world} gloo ranks, no GPU")
    meta = {"workload": workload, **{k: machine[k] for k in ("device", "torch", "xfuser")}}
    return (meta, results) if rank == 0 else None


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def summarize(meta: dict, results: list[dict], with_optional: bool) -> tuple[list, list]:
    ref_images = next(r for r in results if r["codec"] == "raw")["images"]
    summary, steps_rows = [], []
    for r in results:
        errs = r["step_errs"]
        compressed = errs[WARMUP_STEPS:] if len(errs) > WARMUP_STEPS else errs
        seen = bool(errs)  # the uncompressed stale run has no K/V through the compressor
        note = []
        extra = {}
        if with_optional:
            extra, note = optional_metrics(ref_images, r["images"])
        diff = (r["images"] - ref_images).norm() / ref_images.norm()
        summary.append(
            {
                "workload": meta["workload"],
                "codec": r["codec"],
                "variant": r["variant"],
                "steps": len(errs),
                "final_kv_rel_err": _f(errs[-1][0]) if seen else "n/a",
                "mean_kv_rel_err": _f(statistics.fmean(e for e, _ in compressed))
                if seen
                else "n/a",
                "final_kv_rel_err_vs_ref": _f(errs[-1][1]) if seen and r["vs_ref"] else "n/a",
                "psnr_db": _f(psnr(r["images"], ref_images), 2),
                "ssim": f"{ssim(r['images'], ref_images):.6f}",
                "out_rel_err": _f(float(diff)),
                "wire_ratio": _f(r["wire_ratio"], 2),
                "fid": _f(extra["fid"], 3) if "fid" in extra else "n/a",
                "lpips": _f(extra["lpips"], 4) if "lpips" in extra else "n/a",
                "device": meta["device"],
                "torch": meta["torch"],
                "xfuser": meta["xfuser"],
                "note": "; ".join(note),
            }
        )
        for step, (e, ref) in enumerate(errs):
            steps_rows.append(
                {
                    "workload": meta["workload"],
                    "codec": r["codec"],
                    "variant": r["variant"],
                    "step": step,
                    "kv_rel_err": _f(e),
                    "kv_rel_err_vs_ref": _f(ref) if r["vs_ref"] else "n/a",
                }
            )
    return summary, steps_rows


def write_results(out: str, tag: str, summary: tuple, steps: tuple) -> dict[str, str]:
    """Write the summary and per-step CSVs (``(fields, rows)`` each) of one run named ``tag``
    under ``out``; return the paths of those and of the Markdown table and plot that go
    beside them (``csv``, ``steps_csv``, ``md``, ``png``)."""
    paths = {
        "csv": os.path.join(out, f"quality_{tag}.csv"),
        "steps_csv": os.path.join(out, f"quality_{tag}_steps.csv"),
        "md": os.path.join(out, f"quality_{tag}.md"),
        "png": os.path.join(out, f"quality_{tag}.png"),
    }
    for path, (fields, rows) in ((paths["csv"], summary), (paths["steps_csv"], steps)):
        write_csv(path, fields, rows)
    return paths


def _f(x: float, digits: int = 6) -> str:
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    return f"{x:.{digits}g}" if digits > 3 else f"{x:.{digits}f}"


def ordering(summary: list[dict], codec: str, field: str = "final_kv_rel_err") -> str | None:
    """``"yes"``/``"no"``: naive > no_feedback > feedback for ``codec`` (None if not run)."""
    vals = {r["variant"]: r[field] for r in summary if r["codec"] == codec}
    if not all(v in vals for v in VARIANTS) or any(vals[v] == "n/a" for v in VARIANTS):
        return None
    n, nf, fb = (float(vals[v]) for v in ("naive", "no_feedback", "feedback"))
    return "yes" if n > nf > fb else "no"


def markdown(summary: list[dict], opts: dict, wall_s: float) -> str:
    meta = summary[0]
    lines = [
        f"## Quality: {meta['workload']}\n",
        f"Measured by `benchmarks/quality.py` on {meta['device']}; torch {meta['torch']}, "
        f"xfuser {meta['xfuser']}. Ring attention over {opts['world']} ranks, "
        + ("compressed all-gather" if opts["mode"] == "allgather" else "stale mode (DistriFusion)")
        + f", {opts['steps']} steps ({WARMUP_STEPS} raw warm-up), {opts['size']} px, "
        f"{opts['dtype']}, {opts['num_images']} image(s); total run {wall_s:.0f} s. Errors are "
        "relative Frobenius norms over all layers and rank pairs; PSNR/SSIM/rel. error of the "
        "decoded output against the uncompressed parallel run in the same mode. No timings: "
        "the probe adds a raw all-gather per layer (speed is measured by benchmarks/link.py "
        "and model.py).\n",
        "| codec | variant | final K/V err | mean K/V err | final K/V err vs uncompressed run "
        "| PSNR dB | SSIM | output rel. err | wire ratio | FID | LPIPS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary:
        lines.append(
            f"| {r['codec']} | {r['variant']} | {r['final_kv_rel_err']} | {r['mean_kv_rel_err']} "
            f"| {r['final_kv_rel_err_vs_ref']} | {r['psnr_db']} | {r['ssim']} "
            f"| {r['out_rel_err']} | {r['wire_ratio']} | {r['fid']} "
            f"| {r['lpips']} |"
        )
    if opts["dtype"] in ("bfloat16", "float16"):
        eps = {"bfloat16": 2**-8, "float16": 2**-11}[opts["dtype"]]
        lines.append(
            f"\nThe pipeline runs in {opts['dtype']}: output differences near its resolution "
            f"(~{eps:.1e} relative) are rounding, not codec error; run with --dtype float32 to "
            "see how K/V errors propagate to the output."
        )
    lines.append("")
    lines.append("Error ordering naive > residual without feedback > residual with feedback:\n")
    lines.append("| codec | final K/V err | final K/V err vs uncompressed run | output rel. err |")
    lines.append("| --- | --- | --- | --- |")
    for codec in dict.fromkeys(r["codec"] for r in summary if r["codec"] != "raw"):
        cells = [
            ordering(summary, codec, f) or "n/a"
            for f in ("final_kv_rel_err", "final_kv_rel_err_vs_ref", "out_rel_err")
        ]
        lines.append(f"| {codec} | " + " | ".join(cells) + " |")
    notes = sorted({r["note"] for r in summary if r["note"]})
    if notes:
        lines.append("\nNotes: " + "; ".join(notes))
    elif opts["model"] is None:
        lines.append("\nFID/LPIPS: not computed for the tiny random model (only with --model).")
    return "\n".join(lines) + "\n"


def plot(steps_csv: str, png: str) -> None:
    """K/V error vs step, the three ablations per codec (top: vs exact, bottom: vs ref)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(steps_csv)
    codecs = [c for c in dict.fromkeys(r["codec"] for r in rows) if c != "raw"]
    fields = [("kv_rel_err", "K/V rel. error vs exact (same run)")]
    if any(r["kv_rel_err_vs_ref"] != "n/a" for r in rows):
        fields.append(("kv_rel_err_vs_ref", "K/V rel. error vs uncompressed run"))
    fig, axes = plt.subplots(
        len(fields), len(codecs), figsize=(3.4 * len(codecs), 3.0 * len(fields)), squeeze=False
    )
    for i, (field, ylabel) in enumerate(fields):
        for j, codec in enumerate(codecs):
            ax = axes[i][j]
            for variant, style in (("naive", "r-"), ("no_feedback", "b--"), ("feedback", "g-")):
                sub = [r for r in rows if r["codec"] == codec and r["variant"] == variant]
                pts = [
                    (int(r["step"]), float(r[field])) for r in sub
                    if r[field] not in ("n/a", "") and float(r[field]) > 0
                ]  # fmt: skip
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker=".", label=variant)
            ax.set_yscale("log")
            ax.set_title(codec, fontsize=10)
            ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{rows[0]['workload']}: exchanged K/V error per step", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Synthetic trajectory (--trajectory)
# --------------------------------------------------------------------------------------------
TRAJ_FIELDS = [
    "data", "codec", "scheme", "variant", "steps", "final_rel_err", "step3_rel_err",
    "max_rel_err", "mean_rel_err", "bytes_per_step", "wire_ratio", "bases_identical", "device",
    "torch",
]  # fmt: skip
TRAJ_STEP_FIELDS = ["data", "codec", "scheme", "variant", "step", "rel_err"]


def _derived_errors(codec, traj, source: str) -> list[float]:
    """Receiver error per step when int1/int2 take their channel scales from shared state
    instead of sending them (an experiment: the codecs do not offer it, see the README).
    ``source``: ``"base"`` (per-channel mean |base|) or ``"prev"`` (of the previous decoded
    residual; the base at the first compressed step). Sender and receiver compute the same
    scales from the same bits, so one side is simulated."""
    base, prev, errors = None, None, []
    for x in traj:
        xf = x.float()
        if base is None:  # step 0 raw
            base = xf.clone()
            errors.append(0.0)
            continue
        ref = base if source == "base" or prev is None else prev
        _, _, recon = codec.quantize_with(xf - base, codec.channel_scales(ref))
        prev = recon
        base = (base + recon).to(x.dtype).float()
        errors.append(float((base.double() - xf.double()).norm() / xf.double().norm()))
    return errors


def trajectory_runs(codecs: list[str]) -> list[tuple[str, str, str, dict]]:
    """``(codec, scheme, variant, CompactConfig overrides)`` of every trajectory run."""
    runs = []
    for codec in codecs:
        if codec in ("int1", "int2"):
            for scheme in ("mean", "none"):
                for variant, kw in VARIANTS.items():
                    params = {"channel_scale": scheme}
                    runs.append((codec, scheme, variant, {"codec_params": params, **kw}))
            runs += [
                (codec, "derived_base", "feedback", {}),
                (codec, "derived_prev", "feedback", {}),
            ]
        elif codec == "lowrank":
            for iters in (1, 2):
                params = {"rank": 16, "factor_dtype": "int8", "iters": iters}
                runs.append((codec, f"iters{iters}", "feedback", {"codec_params": params}))
        else:
            runs.append((codec, "default", "feedback", {}))
    return runs


def run_trajectory_benchmark(args) -> dict[str, str]:
    import compactfusion as cf
    from compactfusion.testing.trajectory import TrajectoryConfig, kv_trajectory, run_trajectory

    torch.set_num_threads(os.cpu_count() or 1)
    size = dict(tokens=256, channels=256, steps=6) if args.smoke else {}
    datas = {
        "outliers": TrajectoryConfig(**size),
        "channel_scales_only": TrajectoryConfig.channel_scales_only(**size),
    }
    codecs = args.codecs.split(",") if args.codecs else ["int2", "int1", "fp8", "lowrank"]
    machine = machine_stamp(cuda=False, detail="no GPU")
    device = machine["device"]
    rows, step_rows = [], []
    start = time.perf_counter()
    for data, tcfg in datas.items():
        traj = list(kv_trajectory(tcfg))
        raw = 2 * tcfg.tokens * tcfg.channels
        for codec, scheme, variant, kw in trajectory_runs(codecs):
            if scheme.startswith("derived"):
                errors = _derived_errors(cf.codecs.get_codec(codec), traj, scheme[8:])
                nbytes = cf.codecs.get_codec(codec, channel_scale="none").payload_nbytes(
                    (tcfg.tokens, tcfg.channels), tcfg.dtype
                )
                identical = "n/a"
            else:
                cfg = cf.CompactConfig(codec=codec, min_numel=0, backend="torch", **kw)
                result = run_trajectory(cfg, traj)
                errors, nbytes = result.errors, max(result.payload_bytes[1:])
                identical = "yes" if result.bases_identical else "no"
            rows.append(
                {
                    "data": data, "codec": codec, "scheme": scheme, "variant": variant,
                    "steps": len(errors), "final_rel_err": _f(errors[-1]),
                    "step3_rel_err": _f(errors[min(3, len(errors) - 1)]),
                    "max_rel_err": _f(max(errors)),
                    "mean_rel_err": _f(statistics.fmean(errors[1:])),
                    "bytes_per_step": nbytes, "wire_ratio": _f(raw / nbytes, 4),
                    "bases_identical": identical, "device": device, "torch": machine["torch"],
                }
            )  # fmt: skip
            step_rows += [
                {"data": data, "codec": codec, "scheme": scheme, "variant": variant,
                 "step": i, "rel_err": _f(e)}
                for i, e in enumerate(errors)
            ]  # fmt: skip
            print(
                f"{data:20s} {codec:8s} {scheme:13s} {variant:12s} final {errors[-1]:.4f}",
                flush=True,
            )
    wall = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    tag = "trajectory_smoke" if args.smoke else "trajectory"
    paths = write_results(args.out, tag, (TRAJ_FIELDS, rows), (TRAJ_STEP_FIELDS, step_rows))
    tc = datas["outliers"]
    lines = [
        "## Quality: synthetic K/V trajectory\n",
        f"Measured by `benchmarks/quality.py --trajectory` on {device}; torch "
        f"{torch.__version__}; total run {wall:.0f} s. Data: "
        f"`compactfusion.testing.trajectory`, {tc.tokens}x{tc.channels} {tc.dtype}, {tc.steps} "
        "steps, seed 0, step 0 raw; `outliers` = the issue 9 statistics, "
        "`channel_scales_only` = lognormal(0, 0.5) channel scales alone. Errors: the "
        "receiver's `||recon - x|| / ||x||` (Frobenius). `mean`: sent per-channel scales "
        "(default); `none`: per-group scales only (previous default); `derived_*`: channel "
        "scales computed from shared state instead of sent (experiment). Bytes per step "
        "include headers and scales.\n",
        "| data | codec | scheme | variant | final err | err at step 3 | max err | mean err "
        "| bytes/step | ratio vs bf16 | bases identical |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['codec']} | {r['scheme']} | {r['variant']} "
            f"| {r['final_rel_err']} | {r['step3_rel_err']} | {r['max_rel_err']} "
            f"| {r['mean_rel_err']} | {r['bytes_per_step']} | {r['wire_ratio']} "
            f"| {r['bases_identical']} |"
        )
    text = "\n".join(lines) + "\n"
    with open(paths["md"], "w") as f:
        f.write(text)
    plot_trajectory(paths["steps_csv"], paths["png"], device)
    print(text)
    print("wrote " + ", ".join(paths.values()))
    return paths


def plot_trajectory(steps_csv: str, png: str, device: str) -> None:
    """Receiver error per step: one panel per (data, codec), one curve per scheme/variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(steps_csv)
    datas = list(dict.fromkeys(r["data"] for r in rows))
    codecs = list(dict.fromkeys(r["codec"] for r in rows))
    fig, axes = plt.subplots(
        len(datas), len(codecs), figsize=(3.6 * len(codecs), 3.0 * len(datas)), squeeze=False
    )
    for i, data in enumerate(datas):
        for j, codec in enumerate(codecs):
            ax = axes[i][j]
            sub = [r for r in rows if r["data"] == data and r["codec"] == codec]
            for key in dict.fromkeys((r["scheme"], r["variant"]) for r in sub):
                pts = [
                    (int(r["step"]), float(r["rel_err"])) for r in sub
                    if (r["scheme"], r["variant"]) == key and float(r["rel_err"]) > 0
                ]  # fmt: skip
                if pts:
                    style = "-" if key[1] == "feedback" else ":"
                    ax.plot(*zip(*pts, strict=True), style, marker=".", ms=3, label=" ".join(key))
            ax.set_yscale("log")
            ax.set_title(f"{codec}, {data}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=5)
        axes[i][0].set_ylabel("receiver rel. error")
    fig.suptitle(f"Synthetic K/V trajectory, error per step ({device})", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--codecs", default=None, help=f"comma-separated (default: {','.join(CODECS)})")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument(
        "--size",
        type=int,
        default=64,
        help="image height and width (CogVideoX: height, width 1.5x)",
    )
    p.add_argument("--head-dim", type=int, default=64, help="tiny model: channels per head")
    p.add_argument("--layers", type=int, default=2, help="tiny model: double and single blocks")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--model", default=None, help="local diffusers FLUX or CogVideoX checkpoint")
    p.add_argument("--num-images", type=int, default=1, help="prompts/seeds per configuration")
    p.add_argument("--frames", type=int, default=49, help="CogVideoX frames (--model)")
    p.add_argument("--world", type=int, default=2, help="ranks (ring degree)")
    p.add_argument(
        "--mode", choices=("allgather", "stale"), default="allgather", help="ring-attention mode"
    )
    p.add_argument("--ref-kv-budget-mb", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument(
        "--smoke", action="store_true", help="5 steps, 32 px, 4x16 heads, int2 unless --codecs"
    )
    p.add_argument(
        "--trajectory",
        action="store_true",
        help="synthetic K/V trajectory instead of a model (with --smoke: 256x256, 6 steps)",
    )
    args = p.parse_args(argv)
    if args.trajectory:
        return args, None
    if args.smoke:
        args.codecs = args.codecs or "int2"
        args.steps, args.size, args.head_dim = 5, 32, 16
    args.codecs = args.codecs or ",".join(CODECS)
    codecs = [c for c in args.codecs.split(",") if c]
    for c in codecs:
        if c not in CODECS:
            raise SystemExit(f"--codecs: unknown codec {c!r}; choose from {CODECS}")
    if args.steps <= WARMUP_STEPS:
        raise SystemExit(f"--steps must exceed the {WARMUP_STEPS} warm-up step(s)")
    if args.world < 2 or args.num_images < 1:
        raise SystemExit("--world must be >= 2 and --num-images >= 1")
    return args, codecs


def main(argv=None) -> dict[str, str]:
    args, codecs = _parse_args(argv)
    if args.trajectory:
        return run_trajectory_benchmark(args)
    opts = {
        "codecs": codecs,
        "variants": list(VARIANTS),
        "steps": args.steps,
        "size": args.size,
        "head_dim": args.head_dim,
        "layers": args.layers,
        "dtype": args.dtype,
        "model": args.model,
        "num_images": args.num_images,
        "frames": args.frames,
        "world": args.world,
        "mode": args.mode,
        "ref_kv_budget_mb": args.ref_kv_budget_mb,
    }
    if args.model is None and torch.cuda.is_available():
        raise SystemExit(
            "the tiny model runs xfuser on CPU ranks with gloo; on a CUDA machine hide the GPUs "
            "(CUDA_VISIBLE_DEVICES= python benchmarks/quality.py ...) or pass --model PATH"
        )
    backend = "gloo"
    if args.model is not None and torch.cuda.device_count() >= args.world:
        backend = "nccl"
    elif args.model is not None:
        print("no CUDA GPUs for every rank: running the checkpoint on CPU with gloo (slow)")
    start = time.perf_counter()
    meta, results = spawn_ranks(_rank, args.world, opts, timeout=args.timeout, backend=backend)[0]
    wall = time.perf_counter() - start
    summary, steps_rows = summarize(meta, results, with_optional=args.model is not None)
    os.makedirs(args.out, exist_ok=True)
    tag = "tiny_flux" if args.model is None else _slug(meta["workload"])
    if args.dtype != "bfloat16":
        tag += f"_{args.dtype}"
    if args.mode != "allgather":
        tag += f"_{args.mode}"
    paths = write_results(args.out, tag, (SUMMARY_FIELDS, summary), (STEP_FIELDS, steps_rows))
    text = markdown(summary, opts, wall)
    with open(paths["md"], "w") as f:
        f.write(text)
    plot(paths["steps_csv"], paths["png"])
    print(text)
    print("wrote " + ", ".join(paths.values()))
    return paths


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_").lower()[:60]


if __name__ == "__main__":
    main()
