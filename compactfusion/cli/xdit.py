"""``compactfusion-xdit``: xfuser's ``xdit`` launcher with compactfusion.

Takes every flag of xfuser 0.7's ``xdit`` (the model runner's) plus the ``--compact-*`` flags,
starts ``torchrun`` the way ``xdit`` does (``--nproc_per_node`` inferred from the parallel
degrees unless given; ``--nnodes``, ``--node_rank``, ``--master_addr``, ``--master_port``
forwarded) and runs :mod:`compactfusion.cli.xdit_run` on every rank. ``--help`` prints both
flag sets without starting anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

RANK_MODULE = "compactfusion.cli.xdit_run"


def import_xfuser() -> None:
    """Make ``import xfuser`` work here: on a machine without CUDA, xfuser refuses to import,
    so compactfusion's CPU fixes (``compactfusion.testing.prepare_xfuser_cpu``) are applied
    first; that is enough for ``--help`` and for CPU test runs."""
    os.environ.setdefault("LOG_LEVEL", "warning")  # xfuser logs a line per layer at debug
    import torch

    if torch.cuda.is_available() or "xfuser.config.config" in sys.modules:
        return
    from ..testing import prepare_xfuser_cpu

    prepare_xfuser_cpu()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (see the module docstring)."""
    args = sys.argv[1:] if argv is None else list(argv)
    import_xfuser()
    if "-h" in args or "--help" in args:
        from .xdit_run import build_parser

        build_parser().print_help()
        sys.exit(0)
    from xfuser.cli import extract_torchrun_args, get_nproc_from_args

    torchrun, runner_args = extract_torchrun_args(args)
    nproc = torchrun["--nproc_per_node"] or str(get_nproc_from_args(runner_args))
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={torchrun['--nnodes']}",
        f"--node_rank={torchrun['--node_rank']}",
        f"--master_addr={torchrun['--master_addr']}",
        f"--master_port={torchrun['--master_port']}",
        "-m", RANK_MODULE, *runner_args,
    ]  # fmt: skip
    process = subprocess.Popen(cmd, start_new_session=True)

    def stop(signum, frame):  # Ctrl+C: end torchrun and every rank it started
        try:
            os.killpg(os.getpgid(process.pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
        sys.exit(1)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    sys.exit(process.wait())


if __name__ == "__main__":
    main()
