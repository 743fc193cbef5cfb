"""``benchmarks/_report.py``: the one CSV writer, machine stamp and PSNR/SSIM every benchmark
uses (and no benchmark keeps a copy of its own)."""

from __future__ import annotations

import csv
import datetime
import os
import re
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import _report  # noqa: E402


def test_csv_round_trip_and_unknown_column(tmp_path):
    path = str(tmp_path / "deeper" / "rows.csv")  # the folder is created
    rows = [{"a": 1, "b": "x,y"}, {"a": 2.5}]  # a missing key is written empty
    assert _report.write_csv(path, ["a", "b"], rows) == path
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == ["a", "b"]
    assert _report.read_csv(path) == [{"a": "1", "b": "x,y"}, {"a": "2.5", "b": ""}]
    with pytest.raises(ValueError, match="typo"):
        _report.write_csv(path, ["a", "b"], [{"a": 1, "typo": 2}])


def test_committed_result_csvs_parse():
    """Every committed CSV reads back with a header and rows of that header's width."""
    folder = os.path.join(ROOT, "benchmarks", "results")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".csv"))
    assert names
    for name in names:
        rows = _report.read_csv(os.path.join(folder, name))
        assert rows, name
        assert all(None not in r and None not in r.values() for r in rows), name


def test_machine_stamp():
    stamp = _report.machine_stamp(cuda=False, detail="no GPU")
    assert set(stamp) == {
        "device", "cpu", "cpu_cores", "gpu", "torch", "triton", "xfuser", "diffusers",
        "python", "date",
    }  # fmt: skip
    assert stamp["torch"] == torch.__version__ and stamp["gpu"] == ""
    assert stamp["device"] == f"{stamp['cpu']} ({os.cpu_count()} cores), no GPU"
    assert stamp["device"].lower().startswith("cpu")  # model.py skips CPU rows of kernels.csv
    datetime.datetime.fromisoformat(stamp["date"])
    assert _report.version("surely-not-an-installed-package") == _report.NOT_INSTALLED
    assert _report.version("surely-not-an-installed-package", missing=None) is None


def test_ssim_and_psnr_on_hand_computed_cases():
    a = torch.full((1, 3, 16, 16), 0.5)
    b = torch.full((1, 3, 16, 16), 0.6)
    c1 = 0.01**2
    # Constant images: no variance, so SSIM is the luminance term alone.
    assert _report.ssim(a, b) == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1))
    assert _report.ssim(a, a) == pytest.approx(1.0)
    assert _report.psnr(a, b) == pytest.approx(20.0)  # mse 0.01
    assert _report.psnr(a, b, data_range=2.0) == pytest.approx(20.0 + 20 * 0.30103, rel=1e-5)
    assert _report.psnr(a, a) == float("inf")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 24, generator=g)
    noisy = [(x + s * torch.randn(x.shape, generator=g)).clamp(0, 1) for s in (0.01, 0.1)]
    assert 1 > _report.ssim(x, noisy[0]) > _report.ssim(x, noisy[1]) > 0
    with pytest.raises(ValueError):
        _report.ssim(x, x[:1])


def test_no_benchmark_keeps_its_own_copy():
    """CSV writing, CPU description and PSNR/SSIM live in ``_report`` (and the library's
    ``environment.cpu_name`` / ``metrics.psnr``) only: no benchmark or example has a copy."""
    copies = re.compile(r"csv\.DictWriter|csv\.writer\(|/proc/cpuinfo|def (psnr|ssim|cpu_\w+)\(")
    found = []
    for sub in ("benchmarks", "examples"):
        folder = os.path.join(ROOT, sub)
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py") and name != "_report.py":
                with open(os.path.join(folder, name)) as f:
                    found += [f"{sub}/{name}: {m.group(0)}" for m in copies.finditer(f.read())]
    assert found == []
