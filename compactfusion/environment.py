"""Describing the machine a result was measured on (for stamping benchmark outputs)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform`` as a fallback), e.g.
    ``"CPU AMD EPYC 9R45 x86_64"``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU {line.split(':', 1)[1].strip()} {platform.machine()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"
