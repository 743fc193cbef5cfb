"""GPU time model: predicted time per denoising step and per image for each communication method.

Nothing here runs a multi-GPU job. Per-GPU compute time, codec time and link bandwidth are
combined by the formulas below into a time per step for FLUX.1-dev at 1024x1024 and
CogVideoX-2b at 49x480x720, on 2, 4 and 8 GPUs and six interconnects, for uncompressed
all-gather and ring attention, Ulysses, DistriFusion (``stale``), compactfusion's compressed
all-gather with every codec, and the ``auto`` policy's choice.

Every input is labelled in the output with where it came from (``compute_source``,
``codec_source``): *measured* only when it was measured on a GPU by this module
(``--compute measured``) or by ``benchmarks/kernels.py`` (a ``kernels*.csv`` with GPU rows in
``--kernels-dir``); otherwise a *planning figure* derived from the stated assumptions.

Workloads (counted from the architectures)
------------------------------------------
=======================  ======  ======================  ====  =========  =====  =====  ===
workload                 layers  sequence tokens S       text  heads x D  batch  steps  a2a
=======================  ======  ======================  ====  =========  =====  =====  ===
FLUX.1-dev 1024x1024     57      4096 (128x128 / 2x2)    512   24 x 128   1      28     2
CogVideoX-2b 49x480x720  30      17550 (13x60x90 / 2x2)  226   30 x 64    2      50     4
=======================  ======  ======================  ====  =========  =====  =====  ===

19 double + 38 single FLUX blocks. xfuser 0.7.0 splits FLUX's 512 text tokens across the ranks
with the image tokens (when divisible), so they travel with the K/V: a rank sends
``(4096 + 512) / N`` tokens; CogVideoX's text stays on every rank (not sent). CogVideoX runs
classifier-free guidance as a batch of 2 on every rank (no CFG parallelism). "a2a" is the
number of Ulysses all-to-alls per layer: FLUX sends q/k/v combined plus the output, CogVideoX
q, k, v and the output separately. With
``d = heads * D`` and ``S' = S + text``, one layer costs::

    F_linear = batch * 2 * 12 d^2 * S'     (qkv 3d^2 + out d^2 + MLP 8d^2 multiply-adds/token;
                                            FLUX single blocks fuse the same 12 d^2)
    F_attn   = batch * 4 * S'^2 * d        (QK^T and PV)

FLUX: 1.30 TFLOP per layer, 74.4 TFLOP per step. CogVideoX-2b: 8.0 TFLOP per layer (batch 2),
240 TFLOP per step. adaLN, embeddings, RoPE and the VAE are left out.

Compute time (``--compute derived``, the default without a GPU)
----------------------------------------------------------------
``C1 = (F_linear + F_attn) * layers / (peak * MFU)`` with ``peak = 989.4`` TFLOP/s (H100 SXM
dense BF16, datasheet) and ``MFU = 0.40`` (an assumption; ``--mfu``). This is a planning
figure, not a measurement: it gives FLUX 0.19 s/step and CogVideoX-2b 0.61 s/step on one GPU.
On ``N`` GPUs every rank computes ``C = C1 / N`` (perfect split: sequence padding, replicated
text tokens and lower GEMM efficiency at small shards are ignored, which favours all parallel
methods equally). ``--compute measured`` instead times one synthetic layer (the same GEMMs and
one SDPA call of ``S'/N`` queries over ``S'`` keys) on the local CUDA GPU at 1 GPU and at each
per-rank shape, and scales it by ``layers``.

Codec time
----------
Bytes a codec must move (``numel`` elements of ``e`` bytes, payload ``P`` bytes)::

    encode (sender)            = numel * e * k + P       k = 3 (read x, read base, write base);
                                                         lowrank k = 6 (R @ Q and R^T @ P each
                                                         read x and base, then the base update)
    decode (receiver, per peer) = numel * e * 2 + P      (read base, write base; read payload)

``t = launch + bytes / T``. ``T`` is the measured GB/s of that codec and operation from the
closest size in ``kernels*.csv`` (GPU rows of the Triton kernels) when there is one; otherwise
the planning figure ``compactfusion.policy.CODEC_GBPS["cuda"]`` (2400 GB/s = 80% of an H100's
~3.0 TB/s copy bandwidth, the kernels' design target). ``launch`` = 5 us per fused kernel,
40 us for the lowrank encoder (two skinny GEMMs, a QR and the base update: several launches).

Links (per GPU, per direction; every GPU has its own link of this bandwidth)
----------------------------------------------------------------------------
=========  =============  =========  =============  =======================================
link       nominal GB/s   effective  latency/hop    note
=========  =============  =========  =============  =======================================
nvlink4    450            360        5 us           H100 SXM through NVSwitch; 80% of nominal
pcie5      63             50         10 us          Gen5 x16, non-blocking switch
400gbe     50             45         20 us          RDMA, one NIC per GPU, 90% of nominal
pcie4      31.5           25         10 us          Gen4 x16, non-blocking switch
100gbe     12.5           11.25      20 us          RDMA, one NIC per GPU
25gbe      3.125          2.8        20 us          one NIC per GPU
=========  =============  =========  =============  =======================================

The effective figures are planning assumptions (the PCIe ones are the ``auto`` policy's own
link hints), not measurements.

Communication primitives (``M`` bytes per rank, ``B`` effective bandwidth, ``a`` latency)::

    all-gather (ring algorithm)   t_ag(M)  = (N - 1) * (a + M / B)
    all-to-all (pairwise)         t_a2a(M) = (N - 1) * a + (N - 1) / N * M / B
    one ring hop                  t_hop(M) = a + M / B

Methods (``L`` layers, ``M`` = this rank's K and V of one layer = ``batch*tokens*2d*e`` bytes)
-------------------------------------------------------------------------------------------
``allgather``  uncompressed: one blocking all-gather of K/V per layer, then attention (what
               xfuser 0.7.0's ring attention does: torch's templated ring attention
               all-gathers). No overlap::

                   step = C + L * t_ag(M)

``ring``       uncompressed ring attention with point-to-point relays overlapped with the
               attention of the block in hand (the ideal ring; ``c_blk = C_attn / (L * N)``)::

                   step = C_linear + L * ((N - 1) * max(c_blk, t_hop(M)) + c_blk)

``ulysses``    all-to-all of q, k, v and the attention output (4 tensors of ``M/2`` bytes,
               in ``a2a`` calls), blocking; needs ``heads % N == 0`` (else n/a)::

                   step = C + L * (a2a * (N - 1) * a + (N - 1) / N * 2M / B)

``stale``      DistriFusion: the previous step's K/V is all-gathered asynchronously and fully
               overlapped with the step's compute (assumes a free copy engine and no slow-down
               of the compute by the transfers, the method's best case)::

                   step = max(C, L * t_ag(M))

``cf-<codec>`` compactfusion, compressed all-gather (blocking, as implemented): encode the local
               K/V residual, all-gather the payloads ``P`` (``payload_nbytes`` of the codec at
               the integration's matrix shape), decode the ``N - 1`` peers::

                   step = C + L * (t_enc + t_ag(P) + (N - 1) * t_dec)

``cf-<codec>-stale``  compactfusion's stale mode (int1 and int2): DistriFusion with the K/V sent
               as compressed residuals. The codec work stays on the compute stream; the
               payloads' all-gather overlaps the step (same best case as ``stale``)::

                   step = max(C + L * (t_enc + (N - 1) * t_dec), L * t_ag(P))

``auto``       ``CompactConfig(codec="int2", policy="auto", link=...)``: each layer is
               compressed when ``compactfusion.policy.compression_times`` says it pays for the
               link hint (``nvlink``/``pcie``/``pcie5`` hints, the effective GB/s for
               Ethernet); then ``cf-int2``'s step, else ``allgather``'s.

Per image: ``warmup`` steps (1) run as ``allgather`` for ``stale`` and every ``cf-*`` method
(sending raw sets the bases; the stale ones included), the other ``steps - warmup`` at the
method's step time. Text
encoders and the VAE are not counted. ``1gpu`` is ``C1`` per step.

Base memory per rank (computed, ``model_memory.csv``/``.md``)
--------------------------------------------------------------
``compactfusion.memory.estimate`` for FLUX.1, FLUX.2, CogVideoX-5b, Wan2.1-14B and
HunyuanVideo (shapes in ``compactfusion.memory.MODELS``), per mode and rank count, with
full-precision and int8 bases: the bytes ``stats()["base_bytes"]`` reports and what is held
between steps (bases plus the gathered buffers they live in). Computed from the shapes, not
measured; ``tests/test_memory_xdit.py`` checks the same arithmetic against the bytes held by
tiny models.

    python benchmarks/model.py                       # all workloads, GPUs and links
    python benchmarks/model.py --fast --out /tmp/m   # smoke run (2 GPUs, two links)
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._report import device_name, read_csv, version, write_csv  # noqa: E402
from compactfusion.codecs import get_codec  # noqa: E402
from compactfusion.config import LINK_HINTS  # noqa: E402
from compactfusion.memory import MODELS, estimate  # noqa: E402
from compactfusion.policy import CODEC_GBPS, compression_times  # noqa: E402

H100_BF16_PEAK_TFLOPS = 989.4  # H100 SXM dense BF16 (datasheet; 1979 with 2:4 sparsity)
DEFAULT_MFU = 0.40
LAUNCH_US = {"default": 5.0, "lowrank": 40.0}
ENCODE_PASSES = {"default": 3, "lowrank": 6}  # activation-sized passes of the sender
CODECS = ("int1", "int2", "fp8", "nm_sparse", "lowrank")
STALE_CODECS = ("int1", "int2")  # also predicted in stale mode (cf-<codec>-stale)
AUTO_CODEC = "int2"
GPU_COUNTS = (2, 4, 8)
WARMUP_STEPS = 1


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkModel:
    """A modelled interconnect (nothing is measured): effective per-direction bandwidth per GPU
    and latency per hop, and the hint the ``auto`` policy gets for it."""

    name: str
    label: str
    nominal_gbps: float
    gbps: float  # effective, used by the model
    latency_us: float
    policy_link: str | float  # what a user passes as CompactConfig.link for this link

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6

    def policy_gbps(self) -> float:
        """The bandwidth the ``auto`` policy sees for this link's hint."""
        if isinstance(self.policy_link, str):
            return LINK_HINTS[self.policy_link]
        return float(self.policy_link)


LINKS: tuple[LinkModel, ...] = (  # fastest first
    LinkModel("nvlink4", "NVLink 4 (H100 SXM)", 450.0, 360.0, 5.0, "nvlink"),
    LinkModel("pcie5", "PCIe Gen5 x16", 63.0, 50.0, 10.0, "pcie5"),
    LinkModel("400gbe", "400 GbE (RDMA)", 50.0, 45.0, 20.0, 45.0),
    LinkModel("pcie4", "PCIe Gen4 x16", 31.5, 25.0, 10.0, "pcie"),
    LinkModel("100gbe", "100 GbE (RDMA)", 12.5, 11.25, 20.0, 11.25),
    LinkModel("25gbe", "25 GbE", 3.125, 2.8, 20.0, 2.8),
)


@dataclass(frozen=True)
class Workload:
    """A DiT generation as the model sees it (see the table in the module docstring)."""

    name: str
    label: str
    layers: int
    tokens: int  # sharded sequence tokens whose K/V ranks exchange
    text_tokens: int  # joint-attention text tokens
    heads: int
    head_dim: int
    batch: int
    steps: int
    a2a_calls: int  # Ulysses all-to-alls per layer
    text_sharded: bool = False  # text tokens split across ranks and sent with the K/V
    itemsize: int = 2  # bf16

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    def flops_per_layer(self) -> tuple[float, float]:
        """``(F_linear, F_attn)`` of one layer on one GPU."""
        d, s = self.hidden, self.tokens + self.text_tokens
        return self.batch * 2 * 12 * d * d * s, self.batch * 4 * s * s * d

    def local_tokens(self, n: int) -> int:
        """Tokens of one rank whose K/V it sends."""
        sent = self.tokens + (self.text_tokens if self.text_sharded else 0)
        return math.ceil(sent / n)

    def kv_numel(self, n: int) -> int:
        """Elements of one rank's K and V of one layer."""
        return self.batch * self.local_tokens(n) * 2 * self.hidden

    def kv_matrix_shape(self, n: int) -> tuple[int, int]:
        """The matrix compactfusion's integrations hand every codec
        (``integrations.strategies.local_kv``): token-major ``(batch*tokens, 2*hidden)``."""
        return (self.batch * self.local_tokens(n), 2 * self.hidden)


WORKLOADS: dict[str, Workload] = {
    "flux": Workload(
        "flux", "FLUX.1-dev 1024x1024", layers=57, tokens=4096, text_tokens=512, heads=24,
        head_dim=128, batch=1, steps=28, a2a_calls=2, text_sharded=True,
    ),
    "cogvideox": Workload(
        "cogvideox", "CogVideoX-2b 49x480x720", layers=30, tokens=17550, text_tokens=226,
        heads=30, head_dim=64, batch=2, steps=50, a2a_calls=4,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Compute:
    """Compute of one step: on one GPU, and per rank on ``n`` GPUs (split as the ring method
    needs it: linear layers and attention)."""

    linear_s: float  # all layers, one GPU
    attn_s: float
    source: str
    by_n: dict[int, tuple[float, float]] = field(default_factory=dict)  # measured per rank

    @property
    def total_s(self) -> float:
        return self.linear_s + self.attn_s

    def per_rank(self, n: int) -> tuple[float, float]:
        """``(linear, attention)`` seconds of one rank: measured at ``n`` when available,
        else the one-GPU time split perfectly."""
        if n in self.by_n:
            return self.by_n[n]
        return self.linear_s / n, self.attn_s / n


def derived_compute(w: Workload, peak_tflops: float, mfu: float) -> Compute:
    """Compute time from counted FLOPs at ``peak * mfu`` (a planning figure)."""
    if not (0 < mfu <= 1) or peak_tflops <= 0:
        raise ValueError(f"need 0 < mfu <= 1 and a positive peak, got {mfu}, {peak_tflops}")
    f_lin, f_attn = w.flops_per_layer()
    rate = peak_tflops * 1e12 * mfu
    return Compute(
        w.layers * f_lin / rate,
        w.layers * f_attn / rate,
        f"derived: counted FLOPs / ({peak_tflops:g} TFLOP/s x MFU {mfu:g}), not measured",
    )


def measure_layer_seconds(
    w: Workload, n: int, device: str = "cuda", reps: int = 10
) -> tuple[float, float]:
    """Median ``(linear, attention)`` seconds of one synthetic layer of ``w`` on one of ``n``
    GPUs: the layer's GEMMs on ``S'/n`` tokens and one SDPA call of ``S'/n`` queries over
    ``S'`` keys (bf16 on CUDA, float32 elsewhere)."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    d, s = w.hidden, w.tokens + w.text_tokens
    q_tokens = math.ceil(s / n)
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device=dev) * 0.02).to(dtype)

    x = rnd(w.batch * q_tokens, d)
    w_qkv, w_out, w_up, w_down = rnd(d, 3 * d), rnd(d, d), rnd(d, 4 * d), rnd(4 * d, d)
    q = rnd(w.batch, w.heads, q_tokens, w.head_dim)
    k = rnd(w.batch, w.heads, s, w.head_dim)
    v = rnd(w.batch, w.heads, s, w.head_dim)

    def linear():
        (x @ w_qkv).sum()
        h = x @ w_out
        return (torch.nn.functional.gelu(h @ w_up) @ w_down).sum()

    def attention():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).sum()

    def median_s(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(reps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    with torch.no_grad():
        return median_s(linear), median_s(attention)


def measured_compute(
    w: Workload, gpu_counts: Iterable[int], device: str = "cuda", reps: int = 10
) -> Compute:
    """Compute from :func:`measure_layer_seconds` at 1 GPU and at each per-rank shape, times
    ``layers``."""
    lin, attn = measure_layer_seconds(w, 1, device, reps)
    by_n = {}
    for n in gpu_counts:
        lin_n, attn_n = measure_layer_seconds(w, n, device, reps)
        by_n[n] = (w.layers * lin_n, w.layers * attn_n)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    return Compute(w.layers * lin, w.layers * attn, f"measured: synthetic layer on {name}", by_n)


@dataclass
class CodecTiming:
    """Codec time model: measured GB/s per (codec, op) where available, else a planning GB/s."""

    default_gbps: float = CODEC_GBPS["cuda"]
    measured: dict[tuple[str, str], list[tuple[int, float]]] = field(default_factory=dict)
    measured_device: str = ""

    @classmethod
    def from_csvs(cls, paths: Iterable[str], dtype: str = "bf16") -> CodecTiming:
        """Keep the GPU rows of the Triton kernels from ``benchmarks/kernels.py`` CSVs."""
        timing = cls()
        for path in paths:
            for row in read_csv(path):
                device = row.get("device", "")
                if not device or device.lower().startswith("cpu"):
                    continue
                if row.get("impl", "triton") != "triton" or row.get("dtype", dtype) != dtype:
                    continue
                try:
                    numel = int(row["rows"]) * int(row["cols"])
                    gbps = float(row["gbps"])
                except (KeyError, ValueError):
                    continue
                timing.measured.setdefault((row["codec"], row["op"]), []).append((numel, gbps))
                timing.measured_device = device
        return timing

    def gbps(self, codec: str, op: str, numel: int) -> tuple[float, str]:
        rows = self.measured.get((codec, op))
        if not rows:
            return self.default_gbps, f"planning {self.default_gbps:g} GB/s (not measured)"
        size, gbps = min(rows, key=lambda r: abs(math.log(r[0] / numel)))
        return gbps, f"measured {gbps:.0f} GB/s on {self.measured_device} ({size} elements)"

    def seconds(
        self, codec: str, op: str, numel: int, itemsize: int, payload: int
    ) -> tuple[float, str]:
        if op == "encode":
            passes = ENCODE_PASSES.get(codec, ENCODE_PASSES["default"])
        else:
            passes = 2
        nbytes = numel * itemsize * passes + payload
        gbps, source = self.gbps(codec, op, numel)
        launch = (
            LAUNCH_US.get(codec, LAUNCH_US["default"]) if op == "encode" else LAUNCH_US["default"]
        )
        return launch * 1e-6 + nbytes / (gbps * 1e9), source


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def t_allgather(nbytes: float, n: int, link: LinkModel) -> float:
    return (n - 1) * (link.latency_s + nbytes / link.bytes_per_s)


def t_all_to_all(nbytes: float, n: int, link: LinkModel, calls: int = 1) -> float:
    return calls * (n - 1) * link.latency_s + (n - 1) / n * nbytes / link.bytes_per_s


def t_hop(nbytes: float, link: LinkModel) -> float:
    return link.latency_s + nbytes / link.bytes_per_s


@dataclass
class Prediction:
    """One method on one (workload, GPU count, link)."""

    method: str
    step_s: float  # after warm-up
    warmup_step_s: float
    compute_s: float
    comm_s: float  # communication time not hidden behind compute, per step
    codec_s: float
    bytes_per_step: float  # sent by one rank per step after warm-up
    codec: str = ""
    choice: str = ""  # auto: what the policy chose
    note: str = ""

    def image_s(self, steps: int, warmup: int = WARMUP_STEPS) -> float:
        if math.isnan(self.step_s):
            return math.nan
        return warmup * self.warmup_step_s + (steps - warmup) * self.step_s


def predict(
    w: Workload, n: int, link: LinkModel, compute: Compute, timing: CodecTiming
) -> list[Prediction]:
    """Every method's prediction for ``w`` on ``n`` GPUs over ``link`` (formulas above)."""
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    L = w.layers
    lin, attn = compute.per_rank(n)
    c = lin + attn
    m = w.kv_numel(n) * w.itemsize
    ag_raw = t_allgather(m, n, link)
    raw_step = c + L * ag_raw
    preds = [
        Prediction("allgather", raw_step, raw_step, c, L * ag_raw, 0.0, L * m * (n - 1)),
    ]
    c_blk = attn / (L * n)
    ring_layer = (n - 1) * max(c_blk, t_hop(m, link)) + c_blk
    ring_step = lin + L * ring_layer
    preds.append(Prediction("ring", ring_step, ring_step, c, ring_step - c, 0.0, L * m * (n - 1)))
    if w.heads % n:
        nan = math.nan
        note = f"n/a: {w.heads} heads not divisible by {n}"
        preds.append(Prediction("ulysses", nan, nan, c, nan, 0.0, nan, note=note))
    else:
        # q, k, v and the output: 4 tensors of m / 2 bytes each.
        a2a = t_all_to_all(2 * m, n, link, calls=w.a2a_calls)
        step = c + L * a2a
        preds.append(Prediction("ulysses", step, step, c, L * a2a, 0.0, L * 2 * m * (n - 1) / n))
    stale = max(c, L * ag_raw)
    preds.append(Prediction("stale", stale, raw_step, c, stale - c, 0.0, L * m * (n - 1)))
    per_codec = {}
    for name in CODECS:
        preds.append(_compressed(w, n, link, c, raw_step, timing, name))
        per_codec[name] = preds[-1]
    for name in STALE_CODECS:
        blocking = per_codec[name]
        step = max(c + blocking.codec_s, blocking.comm_s)
        preds.append(
            Prediction(
                f"cf-{name}-stale",
                step,
                raw_step,
                c,
                step - c - blocking.codec_s,
                blocking.codec_s,
                blocking.bytes_per_step,
                codec=name,
                note=blocking.note,
            )  # fmt: skip
        )
    # auto: the library's own decision for its link hint.
    codec = get_codec(AUTO_CODEC)
    shape = w.kv_matrix_shape(n)
    t_raw, t_comp = compression_times(
        codec, shape, _dtype(w), link.policy_gbps(), device_type="cuda"
    )
    chosen = per_codec[AUTO_CODEC] if t_comp < t_raw else preds[0]
    preds.append(
        Prediction(
            "auto",
            chosen.step_s,
            raw_step,
            c,
            chosen.comm_s,
            chosen.codec_s,
            chosen.bytes_per_step,
            codec=AUTO_CODEC,
            choice=AUTO_CODEC if t_comp < t_raw else "raw",
            note=f"policy link {link.policy_link!r} = {link.policy_gbps():g} GB/s",
        )
    )
    return preds


def _dtype(w: Workload) -> torch.dtype:
    return {2: torch.bfloat16, 4: torch.float32}[w.itemsize]


def _compressed(w, n, link, c, raw_step, timing, name) -> Prediction:
    codec = get_codec(name)  # the codec's defaults: its preset
    numel = w.kv_numel(n)
    payload = codec.payload_nbytes(w.kv_matrix_shape(n), _dtype(w))
    t_enc, src = timing.seconds(name, "encode", numel, w.itemsize, payload)
    t_dec, _ = timing.seconds(name, "decode", numel, w.itemsize, payload)
    ag = t_allgather(payload, n, link)
    codec_s = w.layers * (t_enc + (n - 1) * t_dec)
    step = c + codec_s + w.layers * ag
    return Prediction(
        f"cf-{name}", step, raw_step, c, w.layers * ag, codec_s,
        w.layers * payload * (n - 1), codec=name, note=src,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
FIELDS = [
    "workload",
    "gpus",
    "link",
    "link_gbps",
    "method",
    "codec",
    "auto_choice",
    "step_ms",
    "warmup_step_ms",
    "image_s",
    "speedup_vs_1gpu",
    "compute_ms",
    "exposed_comm_ms",
    "codec_ms",
    "mb_sent_per_rank_per_step",
    "compute_source",
    "codec_source",
    "note",
    "host",
    "torch",
]


def build_rows(
    workloads: Iterable[Workload],
    gpu_counts: Iterable[int],
    links: Iterable[LinkModel],
    computes: dict[str, Compute],
    timing: CodecTiming,
) -> list[dict]:
    rows = []
    cuda = torch.cuda.is_available()
    stamp = {"host": device_name(cuda, "" if cuda else "no GPU used"), "torch": version("torch")}
    links = list(links)
    for w in workloads:
        comp = computes[w.name]
        one = comp.total_s
        rows.append(
            {
                "workload": w.label, "gpus": 1, "link": "-", "link_gbps": "", "method": "1gpu",
                "codec": "", "auto_choice": "", "step_ms": f"{one * 1e3:.2f}",
                "warmup_step_ms": f"{one * 1e3:.2f}", "image_s": f"{one * w.steps:.2f}",
                "speedup_vs_1gpu": "1.00", "compute_ms": f"{one * 1e3:.2f}",
                "exposed_comm_ms": "0.00", "codec_ms": "0.00", "mb_sent_per_rank_per_step": "0",
                "compute_source": comp.source, "codec_source": "", "note": "", **stamp,
            }
        )  # fmt: skip
        for n in gpu_counts:
            for link in links:
                for p in predict(w, n, link, comp, timing):
                    image = p.image_s(w.steps)
                    rows.append(
                        {
                            "workload": w.label, "gpus": n, "link": link.name,
                            "link_gbps": f"{link.gbps:g}", "method": p.method, "codec": p.codec,
                            "auto_choice": p.choice, "step_ms": _fmt(p.step_s * 1e3),
                            "warmup_step_ms": _fmt(p.warmup_step_s * 1e3),
                            "image_s": _fmt(image),
                            "speedup_vs_1gpu": _fmt(one * w.steps / image),
                            "compute_ms": _fmt(p.compute_s * 1e3),
                            "exposed_comm_ms": _fmt(p.comm_s * 1e3),
                            "codec_ms": _fmt(p.codec_s * 1e3),
                            "mb_sent_per_rank_per_step": _fmt(p.bytes_per_step / 1e6),
                            "compute_source": comp.source,
                            "codec_source": p.note if p.method.startswith("cf-") else "",
                            "note": "" if p.method.startswith("cf-") else p.note, **stamp,
                        }
                    )  # fmt: skip
    return rows


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def markdown(rows: list[dict], links: list[LinkModel]) -> str:
    """Per workload and GPU count: ms/step (speed-up per image vs 1 GPU) for every method and
    link, then the fastest method per cell."""
    out = []
    for wl in dict.fromkeys(r["workload"] for r in rows):
        wrows = [r for r in rows if r["workload"] == wl]
        one = next(r for r in wrows if r["method"] == "1gpu")
        out.append(f"### {wl}\n")
        out.append(
            f"1 GPU: {one['step_ms']} ms/step, {one['image_s']} s/image. "
            f"Compute: {one['compute_source']}. Cells: ms per step after warm-up "
            "(speed-up per image over 1 GPU).\n"
        )
        for n in sorted({int(r["gpus"]) for r in wrows if int(r["gpus"]) > 1}):
            out.append(f"\n**{n} GPUs**\n")
            out.append("| method | " + " | ".join(link.name for link in links) + " |")
            out.append("| --- |" + " --- |" * len(links))
            methods = dict.fromkeys(r["method"] for r in wrows if int(r["gpus"]) == n)
            for m in methods:
                cells = []
                for link in links:
                    r = _find(wrows, n, link.name, m)
                    if r["step_ms"] == "n/a":
                        cells.append("n/a")
                        continue
                    cell = f"{float(r['step_ms']):.1f} ({float(r['speedup_vs_1gpu']):.2f}x)"
                    if m == "auto":
                        cell += f" [{r['auto_choice']}]"
                    cells.append(cell)
                out.append(f"| {m} | " + " | ".join(cells) + " |")
            best = []
            for link in links:
                cands = [
                    r for r in wrows if int(r["gpus"]) == n and r["link"] == link.name
                    and r["step_ms"] != "n/a" and r["method"] != "auto"
                ]  # fmt: skip
                r = min(cands, key=lambda r: float(r["image_s"]))
                best.append(f"{r['method']} {float(r['image_s']):.1f} s")
            out.append("| fastest (s/image) | " + " | ".join(best) + " |")
        out.append("")
    return "\n".join(out)


def _find(rows, n, link, method):
    for r in rows:
        if int(r["gpus"]) == n and r["link"] == link and r["method"] == method:
            return r
    raise KeyError((n, link, method))


def plot(csv_path: str, png_path: str) -> None:
    """Time per step vs link for every method, one panel per (workload, GPU count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    gpus = sorted({int(r["gpus"]) for r in rows if int(r["gpus"]) > 1})
    fig, axes = plt.subplots(
        len(workloads), len(gpus), figsize=(5.2 * len(gpus), 4.2 * len(workloads)),
        squeeze=False,
    )  # fmt: skip
    for i, wl in enumerate(workloads):
        one = next(r for r in rows if r["workload"] == wl and r["method"] == "1gpu")
        for j, n in enumerate(gpus):
            ax = axes[i][j]
            sub = [r for r in rows if r["workload"] == wl and int(r["gpus"]) == n]
            links = list(dict.fromkeys(r["link"] for r in sub))
            for m in dict.fromkeys(r["method"] for r in sub):
                ys = [_find(sub, n, link, m)["step_ms"] for link in links]
                ys = [math.nan if y == "n/a" else float(y) for y in ys]
                style = "--" if m in ("allgather", "ring", "ulysses", "stale") else "-"
                lw = 2.5 if m == "auto" else 1.3
                ax.plot(range(len(links)), ys, style, marker="o", ms=3, lw=lw, label=m)
            ax.axhline(float(one["step_ms"]) / n, color="k", lw=0.8, ls=":", label="1 GPU / N")
            ax.set_xticks(range(len(links)))
            ax.set_xticklabels(links, rotation=20, fontsize=8)
            ax.set_yscale("log")
            ax.set_title(f"{wl}, {n} GPUs", fontsize=9)
            ax.set_ylabel("ms per step (after warm-up)")
            ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(
        f"Predicted time per step (model, not measured end to end): {rows[0]['compute_source']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


MEMORY_FIELDS = [
    "model", "mode", "gpus", "storage", "base_gb_per_rank", "held_gb_per_rank",
    "site_mb", "sites", "source", "note",
]  # fmt: skip
MEMORY_MODES = ("allgather", "ring", "stale", "ulysses", "distrifusion")
MEMORY_STORAGES = ("full", "int8")


def memory_rows(gpu_counts: Iterable[int]) -> list[dict]:
    """Per-rank base memory of every model in ``compactfusion.memory.MODELS`` (computed)."""
    rows = []
    for m in MODELS.values():
        for mode in MEMORY_MODES:
            for storage in MEMORY_STORAGES if mode != "distrifusion" else ("full",):
                for n in gpu_counts:
                    e = estimate(m, mode, n, storage)
                    rows.append(
                        {
                            "model": m.label, "mode": mode, "gpus": n, "storage": storage,
                            "base_gb_per_rank": f"{e.base_bytes / 1e9:.2f}",
                            "held_gb_per_rank": f"{e.held_bytes / 1e9:.2f}",
                            "site_mb": f"{e.site_bytes / 1e6:.1f}", "sites": e.sites,
                            "source": "computed from the model shapes (not measured)",
                            "note": m.note,
                        }
                    )  # fmt: skip
    return rows


def memory_markdown(rows: list[dict]) -> str:
    """One table per model: held GB per rank (bases in parentheses when they differ)."""
    gpus = sorted({int(r["gpus"]) for r in rows})
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        out.append(f"### {model}\n\n{mrows[0]['note']}.\n")
        out.append("| mode | storage | " + " | ".join(f"{n} GPUs" for n in gpus) + " |")
        out.append("| --- | --- |" + " --- |" * len(gpus))
        for mode, storage in dict.fromkeys((r["mode"], r["storage"]) for r in mrows):
            cells = []
            for n in gpus:
                r = next(
                    r for r in mrows
                    if (r["mode"], r["storage"], int(r["gpus"])) == (mode, storage, n)
                )  # fmt: skip
                held, base = r["held_gb_per_rank"], r["base_gb_per_rank"]
                cells.append(held if held == base else f"{held} ({base})")
            out.append(f"| {mode} | {storage} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _rel(path: str) -> str:
    """``path`` relative to the repository when inside it (so committed reports are portable)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full = os.path.abspath(path)
    return os.path.relpath(full, root) if full.startswith(root + os.sep) else full


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--gpus", default=",".join(map(str, GPU_COUNTS)))
    p.add_argument("--links", default=",".join(link.name for link in LINKS))
    p.add_argument("--compute", choices=("derived", "measured"), default="derived")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU)
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_PEAK_TFLOPS)
    p.add_argument(
        "--kernels-dir",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="where to look for kernels*.csv from benchmarks/kernels.py (GPU rows are used)",
    )
    p.add_argument("--fast", action="store_true", help="smoke run: 2 GPUs, nvlink4 and 25gbe")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, str]:
    args = _parse_args(argv)
    names = [s for s in args.workloads.split(",") if s]
    for name in names:
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    gpu_counts = [int(s) for s in args.gpus.split(",") if s]
    if any(n < 2 for n in gpu_counts):
        raise SystemExit("--gpus: every count must be at least 2")
    by_name = {link.name: link for link in LINKS}
    link_names = [s for s in args.links.split(",") if s]
    for name in link_names:
        if name not in by_name:
            raise SystemExit(f"unknown link {name!r}; choose from {sorted(by_name)}")
    if args.fast:
        gpu_counts, link_names = [2], ["nvlink4", "25gbe"]
    links = [by_name[name] for name in link_names]
    workloads = [WORKLOADS[name] for name in names]
    if args.compute == "measured":
        if not torch.cuda.is_available():
            raise SystemExit("--compute measured needs a CUDA GPU (none here): use derived")
        computes = {w.name: measured_compute(w, gpu_counts) for w in workloads}
    else:
        computes = {w.name: derived_compute(w, args.peak_tflops, args.mfu) for w in workloads}
    csvs = sorted(glob.glob(os.path.join(args.kernels_dir, "kernels*.csv")))
    timing = CodecTiming.from_csvs(csvs)
    rows = build_rows(workloads, gpu_counts, links, computes, timing)
    os.makedirs(args.out, exist_ok=True)
    paths = {
        "csv": os.path.join(args.out, "model.csv"),
        "md": os.path.join(args.out, "model.md"),
        "png": os.path.join(args.out, "model.png"),
    }
    write_csv(paths["csv"], FIELDS, rows)
    codec_note = (
        f"measured GPU kernel throughput from {', '.join(map(os.path.basename, csvs))} "
        f"({timing.measured_device}) where a codec has rows; planning figures otherwise"
        if timing.measured
        else f"no GPU rows in {_rel(args.kernels_dir)}/kernels*.csv: codec times are the planning "
        f"figure {timing.default_gbps:g} GB/s (not measured)"
    )
    header = (
        "## GPU time model (predicted, not measured end to end)\n\n"
        f"Generated by `benchmarks/model.py` on {rows[0]['host']}, torch {torch.__version__}. "
        f"Codec times: {codec_note}. Links: "
        + ", ".join(f"{link.name} {link.gbps:g} GB/s + {link.latency_us:g} us" for link in links)
        + " (effective per direction, planning figures). Formulas: module docstring.\n\n"
    )
    with open(paths["md"], "w") as f:
        f.write(header + markdown(rows, links))
    plot(paths["csv"], paths["png"])
    print(header + markdown(rows, links))
    mem_rows = memory_rows(gpu_counts)
    paths["memory_csv"] = os.path.join(args.out, "model_memory.csv")
    paths["memory_md"] = os.path.join(args.out, "model_memory.md")
    write_csv(paths["memory_csv"], MEMORY_FIELDS, mem_rows)
    with open(paths["memory_md"], "w") as f:
        f.write(
            "## Base memory per rank (computed from the model shapes, not measured)\n\n"
            "Generated by `benchmarks/model.py` with `compactfusion.memory.estimate`. GB "
            "(1e9 bytes) per rank that compactfusion holds between steps; in parentheses the "
            "bases alone (`stats()['base_bytes']`) where that differs: in `allgather` and "
            "`stale` modes with full storage the gathered buffer holding the peers' bases "
            "also holds the rank's own block. bf16 activations; int8 = 1 byte per value + a "
            "float32 scale per 256. `distrifusion` = `stale` mode with codec `raw` (the "
            "previous step's K/V, no bases). Temporaries within a step and the payloads in "
            "flight in `stale` mode are not included. Ulysses needs heads divisible by the "
            "rank count (true for all rows here).\n\n" + memory_markdown(mem_rows)
        )
    print(f"wrote {paths['csv']}, {paths['md']}, {paths['png']}")
    return paths


if __name__ == "__main__":
    main()
