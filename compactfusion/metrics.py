"""Image-quality metrics shared by the examples and the benchmarks."""

from __future__ import annotations

import math

import torch


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``a`` against ``b`` (inf when equal), for values
    spanning ``data_range`` (1.0 for images in [0, 1]); tensors or numpy arrays, computed in
    float64."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


__all__ = ["psnr"]
