"""The wheel ships ``kernels/`` as ``compactfusion.kernels`` and never a top-level ``kernels``."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_wheel_layout(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
           "-w", str(tmp_path), str(ROOT)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"no build backend in this environment: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("compactfusion-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "compactfusion/kernels/__init__.py" in names
    assert any(n.startswith("compactfusion/kernels/") and n.endswith(".py") and
               not n.endswith("__init__.py") for n in names)  # fmt: skip
    assert "compactfusion/codecs/int2.py" in names
    assert "compactfusion/integrations/xdit.py" in names
    top_level = {n.split("/")[0] for n in names}
    assert "kernels" not in top_level, sorted(top_level)
    assert not any(n.startswith("tests/") or n.startswith("benchmarks/") for n in names)


def test_installed_kernels_package_is_compactfusion_kernels():
    import compactfusion.kernels as k

    assert Path(k.__file__).resolve().parent == ROOT / "kernels"
