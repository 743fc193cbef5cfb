"""One rank of ``compactfusion-xdit``: xfuser's model runner with compactfusion patched in.

Does what ``python -m xfuser.runner`` does (parse the runner flags, build
``xFuserModelRunner``, preprocess, initialise, run or profile, save, clean up) with one
addition: unless ``--compact-off``, the model is patched during ``initialize`` right after its
pipeline is loaded and its runtime state is set up, before torch.compile warm-up and step
caching (:func:`compactfusion.integrations.xdit_runner.patch_when_initialized`). The last rank
writes ``stats.json`` beside xfuser's outputs (its compactfusion statistics, and with
``--compact-compare`` the relative L2 difference from an uncompressed run of the same inputs).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np

from .flags import COMPACT_DESTS, add_compact_flags, compact_config
from .xdit import import_xfuser


def build_parser():
    """xfuser's runner parser (``xFuserArgs.add_runner_args``) plus the ``--compact-*`` flags."""
    import_xfuser()
    from xfuser import xFuserArgs
    from xfuser.config import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="compactfusion-xdit",
        description="xfuser's model runner (xdit) with compactfusion's compressed exchanges",
    )
    xFuserArgs.add_runner_args(parser)
    add_compact_flags(parser)
    return parser


def _as_arrays(output) -> list[np.ndarray]:
    items = output.images or output.videos or []
    return [np.asarray(item, dtype=np.float64) for item in items]


def relative_difference(output, reference) -> float:
    """Relative L2 difference of two xfuser ``DiffusionOutput`` objects (images or videos)."""
    a, b = _as_arrays(output), _as_arrays(reference)
    if len(a) != len(b) or not a:
        raise ValueError("the two runs produced different numbers of outputs")
    num = sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True))
    den = sum(float(np.sum(y**2)) for y in b)
    return (num / den) ** 0.5 if den else float("nan")


def _write_stats(runner, report: dict[str, Any]) -> None:
    from xfuser.core.utils.runner_utils import is_last_process

    if not is_last_process():
        return
    path = os.path.join(runner.config.output_directory, "stats.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"compactfusion statistics saved to {path}")


def main(argv: list[str] | None = None) -> None:
    """Run one rank (see the module docstring)."""
    import compactfusion as cf
    from compactfusion.integrations.xdit_runner import patch_when_initialized

    parser = build_parser()
    namespace = parser.parse_args(argv)
    config = compact_config(namespace, parser)
    args = {k: v for k, v in vars(namespace).items() if k not in COMPACT_DESTS}

    from xfuser.runner import setup_logging, xFuserModelRunner

    setup_logging()
    runner = xFuserModelRunner(args)
    runner.print_args(vars(namespace))
    input_args = runner.preprocess_args(args)
    if config is not None:
        patch_when_initialized(runner.model, config)
    runner.initialize(input_args)

    report: dict[str, Any] = {"compactfusion": None if config is None else config.as_dict()}
    if namespace.profile:
        _, _, profile = runner.profile(input_args)
        runner.save(profile=profile)
    else:
        output, timings = runner.run(input_args)
        if config is not None:
            report["stats"] = cf.stats(runner.model)
        if namespace.compact_compare:
            cf.unpatch(runner.model)
            reference, reference_timings = runner.run(input_args)
            if output is not None and reference is not None:
                report["compare"] = {
                    "relative_l2_vs_uncompressed": relative_difference(output, reference),
                    "uncompressed_timings": reference_timings,
                }
        report["timings"] = timings
        runner.save(output=output, timings=timings)
    _write_stats(runner, report)
    runner.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
