"""The ``auto`` policy: compress a site only when it saves time on the given link.

For a site of ``numel`` elements of ``itemsize`` bytes, a link of ``B`` GB/s and a codec that
processes memory at ``T`` GB/s::

    t_raw        = raw_bytes / B
    t_compressed = payload_bytes / B + (encode_bytes + decode_bytes) / T
    encode_bytes = numel * 3 * itemsize + payload_bytes   (read x, read base, write base)
    decode_bytes = numel * 2 * itemsize + payload_bytes   (read base, write base)

and the site is compressed when ``t_compressed < t_raw``. ``T`` defaults to the codec
throughput in ``CODEC_GBPS`` for the device type (see ``benchmarks/kernels.py`` for how to
measure it on your GPU) and can be set with the environment variable
``COMPACTFUSION_CODEC_GBPS``.
"""

from __future__ import annotations

import math
import os

import torch

# Memory throughput a codec sustains, in GB/s of the bytes above. The CUDA figure is a
# planning figure, the kernels' design target (80% of an H100's ~3 TB/s copy bandwidth), not a
# measurement. The CPU figure is a round number inside what was measured
# (``benchmarks/kernels.py --device cpu --torch-only --threads 1``, which prints this figure
# per size): the torch reference int1/int2, one thread of an AMD EPYC (Zen 5, KVM guest),
# torch 2.13.0+cpu: 1.1-2.1 GB/s at 1024x3072 bf16, 0.5 GB/s at 4608x3072, where fresh pages
# for the temporaries dominate (1.9-2.2 GB/s once glibc keeps freed memory; see the README).
# Override with COMPACTFUSION_CODEC_GBPS after measuring your own machine; it must be the
# same on every rank (it is part of the config check).
CODEC_GBPS = {"cuda": 2400.0, "cpu": 1.0}


def codec_throughput_gbps(device_type: str) -> float:
    env = os.environ.get("COMPACTFUSION_CODEC_GBPS")
    if env:
        value = float(env)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"COMPACTFUSION_CODEC_GBPS must be a positive number, got {env!r}")
        return value
    return CODEC_GBPS.get(device_type, CODEC_GBPS["cpu"])


def compression_times(
    codec, shape: tuple[int, ...], dtype: torch.dtype, link_gbps: float, device_type: str
) -> tuple[float, float]:
    """``(t_raw, t_compressed)`` in seconds by the formula in the module docstring."""
    numel = math.prod(shape)
    raw = numel * dtype.itemsize
    payload = codec.payload_nbytes(shape, dtype)
    codec_bw = codec_throughput_gbps(device_type) * 1e9
    work = numel * 5 * dtype.itemsize + 2 * payload
    return raw / (link_gbps * 1e9), payload / (link_gbps * 1e9) + work / codec_bw


def worth_compressing(
    codec,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    link_gbps: float | None,
    device_type: str = "cuda",
) -> bool:
    """Whether compressing saves time on this link (always True without a link hint)."""
    if link_gbps is None:
        return True
    t_raw, t_comp = compression_times(codec, shape, dtype, link_gbps, device_type)
    return t_comp < t_raw
