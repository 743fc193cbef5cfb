"""``benchmarks/link.py --smoke`` runs end to end and writes the CSV, table and plot it promises.

As root the smoke run uses real namespaces and a rate-limited veth pair (1 Gbit/s); otherwise it
falls back to loopback. Either way: two spawned ranks, a tiny FLUX, every method, seconds.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "link.py")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # benchmarks.netns

pytestmark = [
    pytest.mark.xfuser,
    pytest.mark.skipif(
        importlib.util.find_spec("xfuser") is None, reason="needs xfuser (the xdit extra)"
    ),
]


def _load_module():
    spec = importlib.util.spec_from_file_location("benchmark_link", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(120)
def test_link_smoke_writes_csv_table_and_plot(tmp_path):
    link = _load_module()
    out = tmp_path / "results"
    pythonpath = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--out", str(out), "--timeout", "90"],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_outputs(link, out, proc.stdout)


def _check_outputs(link, out, stdout: str) -> None:
    with open(out / "link.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == link.COLUMNS
        rows = list(reader)

    # One row per method for the single smoke rate, in the benchmark's order.
    assert [r["method"] for r in rows] == [m.label for m in link.METHODS]
    assert len({r["rate"] for r in rows}) == 1
    by_method = {r["method"]: r for r in rows}
    for r in rows:
        assert float(r["step_s_median"]) > 0
        assert float(r["step_s_min"]) <= float(r["step_s_median"]) <= float(r["step_s_max"])
        assert int(r["steps_timed"]) == 2
        assert int(r["bytes_per_step"]) > 0
        assert r["torch"] and r["xfuser"] == "0.7.0" and r["cpu"]
    assert float(by_method[link.BASELINE]["speedup_vs_raw_allgather"]) == 1.0
    raw = int(by_method[link.BASELINE]["bytes_per_step"])
    # Uncompressed methods send the whole K/V (payload headers aside); compressed ones send
    # less (warm-up excluded).
    for name in ("raw-ring", "stale", "ulysses-raw"):
        assert abs(int(by_method[name]["bytes_per_step"]) - raw) < 0.02 * raw
    for name in ("int2", "int1", "int2-ring", "int2-stale", "int1-stale"):
        assert int(by_method[name]["bytes_per_step"]) * 4 < raw
    assert float(by_method["int1"]["ratio"]) > float(by_method["int2"]["ratio"]) > 4

    if "loopback" in stdout:
        assert rows[0]["link"] == "loopback" and rows[0]["rate"] == "unlimited"
    else:
        assert rows[0]["link"].startswith("netns")
        assert not math.isinf(float(rows[0]["rate_mbit"]))
        # Bytes counted on the veth include the payloads (plus TCP/IP headers).
        assert int(by_method[link.BASELINE]["wire_bytes_per_step"]) >= raw
    assert (out / "link.png").stat().st_size > 0
    table = (out / "link.md").read_text()
    assert table.startswith("| method") and "int1" in table
    assert "| int2 |" in stdout


def test_rate_parsing_and_burst():
    link = _load_module()
    assert link.parse_rate("100mbit") == 100.0
    assert link.parse_rate("1gbit") == 1000.0
    assert link.parse_rate("2.5gbit") == 2500.0
    assert math.isinf(link.parse_rate("unlimited"))
    for bad in ("fast", "10", "0mbit", "-1gbit"):
        with pytest.raises(Exception, match="bad rate"):
            link.parse_rate(bad)
    assert link.rate_name(1000.0) == "1gbit" and link.rate_name(100.0) == "100mbit"
    from benchmarks import netns

    assert netns.tbf_burst_bytes(100.0) == 64 * 1024  # floor
    assert netns.tbf_burst_bytes(10_000.0) == 5_000_000  # 4 ms at 10 Gbit/s


@pytest.mark.timeout(120)
def test_without_root_full_run_refuses_and_smoke_uses_loopback(monkeypatch, tmp_path, capsys):
    link = _load_module()
    monkeypatch.setattr(link.os, "geteuid", lambda: 1000)
    assert link.main(["--rates", "1gbit", "--out", str(tmp_path / "full")]) == 2
    assert "needs root" in capsys.readouterr().err
    assert not (tmp_path / "full").exists()

    out = tmp_path / "smoke"
    assert link.main(["--smoke", "--out", str(out), "--timeout", "90"]) == 0
    stdout = capsys.readouterr().out
    assert "over loopback" in stdout and "not running as root" in stdout
    _check_outputs(link, out, stdout)
