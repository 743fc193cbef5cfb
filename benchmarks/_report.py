"""What every benchmark writes its results with: CSV files, the machine stamp, image metrics.

* :func:`write_csv` / :func:`read_csv`: one header line, then one row per dict. A row with a
  key that is not a column raises (a misspelt column is an error, not a lost value); a
  missing key is written empty. Plots and tables are drawn from what :func:`read_csv` reads
  back, so a committed CSV is the whole record of a run.
* :func:`machine_stamp`: the device a result was measured on (the GPU's name when the run
  used CUDA, else the CPU model and core count), the CPU, the versions of torch, triton,
  xfuser and diffusers, Python's, and the date. Each benchmark copies the fields its CSV has
  columns for.
* :func:`ssim` (and :func:`compactfusion.metrics.psnr`, re-exported): the decoded output of a
  run against a reference run.

The scripts import this as ``benchmarks._report`` with the repository root on ``sys.path``
(each script puts it there, so they run from a checkout without installing anything).
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import os
import platform
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from compactfusion.metrics import psnr  # noqa: F401  (re-exported for the benchmarks)

VERSIONED = ("torch", "triton", "xfuser", "diffusers")  # packages every stamp names
NOT_INSTALLED = "n/a"


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------
def write_csv(path: str, fields: list[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """Write ``rows`` under the header ``fields`` to ``path`` (its folder is created);
    returns ``path``. Raises ``ValueError`` for a row key that is not in ``fields``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: str) -> list[dict[str, str]]:
    """The rows of a CSV written by :func:`write_csv` (values as strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# Machine stamp
# --------------------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU model, e.g. ``"CPU AMD EPYC 9R45 x86_64"`` (``compactfusion.environment``)."""
    from compactfusion.environment import cpu_name as describe

    return describe()


def version(package: str, missing: str | None = NOT_INSTALLED) -> str | None:
    """The installed version of ``package`` (``missing`` when it is not installed); torch's
    as imported (``torch.__version__``)."""
    if package == "torch":
        return torch.__version__
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return missing


def device_name(cuda: bool | None = None, detail: str = "") -> str:
    """The device results were measured on: the GPU's name when ``cuda`` (default: whether
    CUDA is available), else ``"<cpu_name()> (<n> cores)"``; ``detail`` is appended after a
    comma (e.g. ``"no GPU"``, ``"Triton interpreter"``)."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else f"{cpu_name()} ({os.cpu_count()} cores)"
    return f"{name}, {detail}" if detail else name


def machine_stamp(cuda: bool | None = None, detail: str = "") -> dict[str, Any]:
    """Where and with what a result was measured: ``device`` (see :func:`device_name`),
    ``cpu``, ``cpu_cores``, ``gpu`` (empty without CUDA), the versions of ``torch``,
    ``triton``, ``xfuser`` and ``diffusers``, ``python`` and ``date`` (ISO, seconds)."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    return {
        "device": device_name(cuda, detail),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if cuda else "",
        **{package: version(package) for package in VERSIONED},
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------
# Image metrics
# --------------------------------------------------------------------------------------------
def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win: int = 11, sigma: float = 1.5
) -> float:
    """Mean SSIM of two image batches ``[..., C, H, W]`` (Wang et al. 2004: Gaussian window
    ``win`` x ``win`` of ``sigma``, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``; valid windows
    only, per channel, then the mean). Images smaller than the window use a window of their
    own (odd) size instead."""
    if a.shape != b.shape or a.dim() < 3:
        raise ValueError(f"need two equal [..., C, H, W] tensors, got {a.shape} and {b.shape}")
    c, h, w = a.shape[-3:]
    x = a.reshape(-1, c, h, w).double()
    y = b.reshape(-1, c, h, w).double()
    win = min(win, h - (h + 1) % 2, w - (w + 1) % 2)
    kernel = _gaussian_window(win, sigma).to(x)[None, None].expand(c, 1, win, win)

    def blur(t):
        return F.conv2d(t, kernel, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())
