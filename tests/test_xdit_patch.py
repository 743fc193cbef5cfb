"""compactfusion.patch on real xfuser 0.7.0 pipelines (tiny random models, spawned ranks).

Backend and device come from the machine: gloo on CPU here, NCCL on CUDA when there are at
least as many GPUs as ranks (those runs are marked ``multigpu``). Each spawn groups many checks,
because starting ranks and importing xfuser costs ~15 s.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from compactfusion.testing import spawn_ranks

# xfuser itself is imported only inside the spawned ranks (after the CPU fixes).
pytestmark = [
    pytest.mark.xfuser,
    pytest.mark.skipif(
        importlib.util.find_spec("xfuser") is None, reason="needs the xdit extra (xfuser==0.7.0)"
    ),
]

EXACT = 1e-6  # raw codec vs the uncompressed runs (relative L2)
LOSSY = {"int2": 0.05, "int1": 0.08}  # documented bound for the tiny models, relative L2


def backend_for(world: int) -> tuple[str, str]:
    if torch.cuda.is_available() and torch.cuda.device_count() >= world:
        return "nccl", "cuda"
    return "gloo", "cpu"


def _setup(device: str):
    if device == "cpu":
        from compactfusion.testing import prepare_xfuser_cpu

        prepare_xfuser_cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class ByteCounter:
    """Counts the bytes this rank hands to torch.distributed's collectives and P2P calls."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.bytes, self.saved = dist, 0, {}
        names = ("all_gather_into_tensor", "all_gather_single", "all_to_all_single",
                 "batch_isend_irecv")  # fmt: skip
        for name in names:
            if not hasattr(dist, name):
                continue
            self.saved[name] = getattr(dist, name)
            setattr(dist, name, self._wrap(name, self.saved[name]))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if name == "batch_isend_irecv":
                self.bytes += sum(
                    op.tensor.numel() * op.tensor.element_size()
                    for op in args[0]
                    if op.op is self.dist.isend
                )
            else:
                t = args[1]
                self.bytes += t.numel() * t.element_size()
            return fn(*args, **kwargs)

        return counted

    def restore(self):
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)


# --------------------------------------------------------------------------------------------
def _flux_ring_checks(rank, world, device):
    _setup(device)
    import compactfusion as cf
    from compactfusion import CompactConfig
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    res = {}
    single = generate(build_pipeline("flux", device=device), "flux", steps=4)
    pipe = build_pipeline("flux", ring=2, device=device)
    plain = generate(pipe, "flux", steps=4)
    res["parallel_vs_single"] = rel(plain, single)
    for mode in ("allgather", "ring", "stale"):
        with cf.patched(pipe, CompactConfig(codec="raw", mode=mode)):
            out = generate(pipe, "flux", steps=4)
        res[f"raw_{mode}_vs_parallel"] = rel(out, plain)
        res[f"raw_{mode}_vs_single"] = rel(out, single)
        if mode == "stale":
            raw_stale = out
    for codec in ("int2", "int1"):
        for mode in ("allgather", "ring"):
            with cf.patched(pipe, CompactConfig(codec=codec, mode=mode, min_numel=0)):
                out = generate(pipe, "flux", steps=4)
            res[f"{codec}_{mode}"] = rel(out, plain)
    # Compressed DistriFusion: near the full-precision stale run, a fraction of its bytes.
    with cf.patched(pipe, CompactConfig(codec="int2", mode="stale", min_numel=0)):
        out = generate(pipe, "flux", steps=4)
        res["int2_stale_ratio"] = cf.stats(pipe)["ratio_after_warmup"]
    res["int2_stale_vs_raw_stale"] = rel(out, raw_stale)
    res["int2_stale"] = rel(out, plain)
    # Two generations in a row, the second at another resolution: both correct.
    plain_48 = generate(pipe, "flux", steps=3, height=48, width=48)
    with cf.patched(pipe, CompactConfig(codec="raw")):
        a = generate(pipe, "flux", steps=3)
        b = generate(pipe, "flux", steps=3, height=48, width=48)
    res["two_gens_raw"] = max(rel(a, generate(pipe, "flux", steps=3)), rel(b, plain_48))
    cfg = CompactConfig(codec="int2", min_numel=0)
    with cf.patched(pipe, cfg):
        a = generate(pipe, "flux", steps=3)
        b = generate(pipe, "flux", steps=3, height=48, width=48)
        res["stats_generations"] = cf.stats(pipe)["generations"]
    res["two_gens_int2"] = max(rel(a, generate(pipe, "flux", steps=3)), rel(b, plain_48))
    # Patching is idempotent for the same config and refuses a different one.
    cf.patch(pipe, cfg)
    cf.patch(pipe, CompactConfig(codec="int2", min_numel=0))
    try:
        cf.patch(pipe, CompactConfig(codec="int1"))
        res["repatch_error"] = None
    except ValueError as exc:
        res["repatch_error"] = str(exc)
    cf.unpatch(pipe)
    res["is_patched_after_unpatch"] = cf.is_patched(pipe)
    res["unpatched_equal"] = torch.equal(generate(pipe, "flux", steps=4), plain)
    # Two patched pipelines in one process keep separate state.
    other = build_pipeline("flux", ring=2, device=device, seed=1)
    plain_other = generate(other, "flux", steps=3)
    with cf.patched(pipe, CompactConfig(codec="int2", min_numel=0)):
        with cf.patched(other, CompactConfig(codec="int1", min_numel=0)):
            a1 = generate(pipe, "flux", steps=3)
            b1 = generate(other, "flux", steps=3)
            a2 = generate(pipe, "flux", steps=3)
            res["two_pipes_codecs"] = (cf.stats(pipe)["codec"]["name"],
                                       cf.stats(other)["codec"]["name"])  # fmt: skip
        res["two_pipes_after_inner_unpatch"] = torch.equal(generate(pipe, "flux", steps=3), a1)
    res["two_pipes_repeatable"] = torch.equal(a1, a2)
    res["two_pipes_other"] = rel(b1, plain_other)
    # Ranks configured differently fail with the same clear error on every rank.
    mismatch = CompactConfig(codec="int2" if rank == 0 else "int1")
    try:
        with cf.patched(pipe, mismatch):
            generate(pipe, "flux", steps=2)
        res["mismatch_error"] = None
    except ValueError as exc:
        res["mismatch_error"] = str(exc)
    return res


@pytest.mark.timeout(400)
def test_flux_ring_modes_codecs_and_lifecycle():
    backend, device = backend_for(2)
    results = spawn_ranks(_flux_ring_checks, 2, device, backend=backend, timeout=380)
    for res in results:
        assert res["parallel_vs_single"] < 1e-5
        for mode in ("allgather", "ring"):
            assert res[f"raw_{mode}_vs_parallel"] < EXACT, res
            assert res[f"raw_{mode}_vs_single"] < 1e-5, res
        # DistriFusion attends to one-step-stale K/V: close, not exact.
        assert 0 < res["raw_stale_vs_parallel"] < 0.05, res
        assert 0 < res["int2_stale_vs_raw_stale"] < LOSSY["int2"], res
        assert 0 < res["int2_stale"] < 0.05 + LOSSY["int2"], res
        # float32 K/V: int2 is ~15x before its per-channel scales (2 bytes per codec column),
        # which weigh on this tiny model's few K/V rows: 10.6x here
        assert res["int2_stale_ratio"] > 10, res
        for codec, bound in LOSSY.items():
            for mode in ("allgather", "ring"):
                assert 0 < res[f"{codec}_{mode}"] < bound, (codec, mode, res)
        assert res["two_gens_raw"] < EXACT
        assert res["two_gens_int2"] < LOSSY["int2"]
        assert res["stats_generations"] == 2
        assert "different CompactConfig" in res["repatch_error"]
        assert res["is_patched_after_unpatch"] is False
        assert res["unpatched_equal"] is True
        assert "differs across ranks" in res["mismatch_error"]
        assert res["two_pipes_codecs"] == ("int2", "int1")
        assert res["two_pipes_repeatable"] and res["two_pipes_after_inner_unpatch"]
        assert 0 < res["two_pipes_other"] < LOSSY["int1"]


# --------------------------------------------------------------------------------------------
def _wire_ratio_checks(rank, world, device):
    """bf16 FLUX with 4 heads x 64 at 64x64 px: each rank's K+V shard is 2 x 132 x 256 >= 64K
    elements. Counts what this rank hands to torch.distributed after warm-up."""
    _setup(device)
    import compactfusion as cf
    from compactfusion import CompactConfig
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    pipe = build_pipeline("flux", ring=2, device=device, dtype=torch.bfloat16, head_dim=64)
    steps, out = 4, {}
    for codec in ("raw", "int2", "int1"):
        with cf.patched(pipe, CompactConfig(codec=codec, warmup_steps=1)):
            counter = ByteCounter()
            try:
                generate(pipe, "flux", steps=steps, height=64, width=64)
            finally:
                counter.restore()
            st = cf.stats(pipe)
        sites = [s for s in st["sites"].values() if s["role"] == "send"]
        kv_elements = sum(s["raw_bytes"] for s in sites) // 2 // steps  # bf16, per step
        out[codec] = {
            "per_step": st["bytes_per_step"],
            "counted": counter.bytes,
            "kv_elements_per_layer": kv_elements // len(sites),
            "kv_bf16_bytes_per_step": kv_elements * 2,
        }
    return out


@pytest.mark.timeout(300)
def test_bytes_on_the_wire_shrink_by_codec_ratio():
    backend, device = backend_for(2)
    results = spawn_ranks(_wire_ratio_checks, 2, device, backend=backend, timeout=280)
    for res in results:
        assert res["int2"]["kv_elements_per_layer"] >= 64 * 1024
        raw_kv = res["raw"]["kv_bf16_bytes_per_step"]
        for codec, target in (("int2", 7.0), ("int1", 14.0)):
            after_warmup = res[codec]["per_step"][1:]
            assert all(raw_kv / b >= target for b in after_warmup), (codec, raw_kv, after_warmup)
        # Everything handed to torch.distributed beyond the per-step accounting (the config
        # hash, xfuser's own output gather) is the same whatever the codec, and small.
        extra = {c: res[c]["counted"] - sum(res[c]["per_step"]) for c in ("raw", "int2", "int1")}
        assert len(set(extra.values())) == 1, extra
        assert 0 <= extra["raw"] < 0.01 * res["raw"]["counted"], extra
        assert res["int2"]["counted"] < res["raw"]["counted"] / 2  # warm-up step included


# --------------------------------------------------------------------------------------------
def _other_models_checks(rank, world, device):
    _setup(device)
    import compactfusion as cf
    from compactfusion import CompactConfig
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    res = {}
    singles = {}
    for kind, degrees in (
        ("flux", {"ulysses": 2}),
        ("cogvideox", {"ring": 2}),
        ("sd3", {"ring": 2}),
        ("pixart", {"ring": 2}),
        ("cogvideox", {"ulysses": 2}),  # q, k, v and output exchanged separately
        ("sd3", {"ulysses": 2}),  # replicated joint text through the all-to-alls
        ("pixart", {"ulysses": 2}),
    ):
        if kind not in singles:
            singles[kind] = generate(build_pipeline(kind, device=device), kind, steps=3)
        single = singles[kind]
        pipe = build_pipeline(kind, device=device, **degrees)
        plain = generate(pipe, kind, steps=3)
        with cf.patched(pipe, "raw"):
            raw = generate(pipe, kind, steps=3)
        with cf.patched(pipe, CompactConfig(codec="int2", min_numel=0)):
            lossy = generate(pipe, kind, steps=3)
            ratio = cf.stats(pipe)["ratio_after_warmup"]
        res[f"{kind} {degrees}"] = (rel(raw, plain), rel(raw, single), rel(lossy, plain), ratio)
    # xfuser's own FP8 Ulysses communication and compactfusion exclude each other.
    runtime = pipe.engine_config.runtime_config
    runtime.use_fp8_comms = True
    try:
        cf.patch(pipe)
        res["fp8_comms_error"] = None
    except ValueError as exc:
        res["fp8_comms_error"] = str(exc)
    finally:
        runtime.use_fp8_comms = False
    return res


@pytest.mark.timeout(400)
def test_ulysses_cogvideox_sd3_pixart():
    backend, device = backend_for(2)
    results = spawn_ranks(_other_models_checks, 2, device, backend=backend, timeout=380)
    for res in results:
        assert "use_fp8_comms" in res.pop("fp8_comms_error")
        for kind, (raw_err, raw_single_err, lossy_err, ratio) in res.items():
            # xfuser's own ring attention differs from the single-process run by up to 1.5e-6
            # (PixArt); the raw patch must match one of them to 1e-6 and both to 1e-5.
            assert min(raw_err, raw_single_err) < EXACT, (kind, raw_err, raw_single_err)
            assert max(raw_err, raw_single_err) < 1e-5, (kind, raw_err, raw_single_err)
            assert 0 < lossy_err < LOSSY["int2"], (kind, lossy_err)
            assert ratio > 3, (kind, ratio)


# --------------------------------------------------------------------------------------------
def _four_rank_checks(rank, world, device):
    _setup(device)
    import compactfusion as cf
    from compactfusion import CompactConfig
    from compactfusion.testing.tiny_pipelines import build_pipeline, generate

    res = {}
    for kind, degrees in (
        ("flux", {"ring": 2, "ulysses": 2}),
        ("cogvideox", {"ring": 2, "cfg": 2}),
        ("flux", {"ring": 4}),  # the relay passes payloads on through 3 hops
    ):
        pipe = build_pipeline(kind, device=device, **degrees)
        plain = generate(pipe, kind, steps=3)
        with cf.patched(pipe, "raw"):
            raw = generate(pipe, kind, steps=3)
        with cf.patched(pipe, CompactConfig(codec="int2", min_numel=0, mode="ring")):
            lossy = generate(pipe, kind, steps=3)
        res[f"{kind} {degrees}"] = (rel(raw, plain), rel(lossy, plain))
        if degrees.get("cfg"):  # compressed stale mode on a ring subgroup
            with cf.patched(pipe, CompactConfig(codec="raw", mode="stale")):
                stale = generate(pipe, kind, steps=3)
            with cf.patched(pipe, CompactConfig(codec="int2", min_numel=0, mode="stale")):
                stale_int2 = generate(pipe, kind, steps=3)
                ratio = cf.stats(pipe)["ratio_after_warmup"]
            res["stale"] = (rel(stale, plain), rel(stale_int2, stale), ratio)
    return res


@pytest.mark.timeout(500)
def test_four_ranks_ring_x_ulysses_and_cfg():
    backend, device = backend_for(4)
    results = spawn_ranks(_four_rank_checks, 4, device, backend=backend, timeout=480)
    for res in results:
        # Staleness costs more than int2 on top of it, and the stale K/V did travel compressed.
        stale_err, stale_int2_err, ratio = res.pop("stale")
        assert 0 < stale_int2_err < stale_err < 0.05 and ratio > 5, (stale_err, stale_int2_err)
        for kind, (raw_err, lossy_err) in res.items():
            assert raw_err < EXACT, (kind, raw_err)
            assert 0 < lossy_err < LOSSY["int2"], (kind, lossy_err)


# --------------------------------------------------------------------------------------------
def test_plain_diffusers_pipeline_is_refused():
    import compactfusion as cf
    from compactfusion.testing.tiny_pipelines import tiny_flux

    with pytest.raises(TypeError, match="plain diffusers pipeline"):
        cf.patch(tiny_flux())
    with pytest.raises(TypeError, match="cannot patch"):
        cf.patch(object())
    with pytest.raises(ValueError, match="not patched"):
        cf.unpatch(tiny_flux())
    with pytest.raises(TypeError, match="config must be"):
        cf.patch(tiny_flux(), config=42)
