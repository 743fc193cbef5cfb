"""The ``--compact-*`` command-line flags and the :class:`~compactfusion.CompactConfig` they give.

xfuser's ``FlexibleArgumentParser`` rewrites every ``--a-b`` to ``--a_b`` before parsing, so each
flag is registered under both spellings.
"""

from __future__ import annotations

import argparse
import json
import warnings
from typing import Any

from ..codecs import available_codecs
from ..config import LINK_HINTS, MODES, POLICIES, PRESETS, CompactConfig, preset_name

COMPACT_DESTS = (
    "compact_codec",
    "compact_codec_params",
    "compact_mode",
    "compact_warmup",
    "compact_policy",
    "compact_link",
    "compact_off",
    "compact_compare",
)


def flag(group, name: str, **kwargs) -> None:
    """Add ``--name`` under both spellings (``--a-b`` and ``--a_b``) to an argument group."""
    group.add_argument(f"--{name}", f"--{name.replace('-', '_')}", **kwargs)


def add_compact_flags(parser: argparse.ArgumentParser) -> None:
    """Add the ``compactfusion`` argument group to ``parser``."""
    group = parser.add_argument_group("compactfusion")
    flag(
        group,
        "compact-codec",
        default=None,
        help=f"codec (its preset): {available_codecs()} (default: int2)",
    )
    flag(
        group,
        "compact-codec-params",
        default=None,
        help="codec parameters as JSON, e.g. '{\"rank\": 8}'",
    )
    flag(group, "compact-mode", choices=MODES, default="allgather", help="ring strategy")
    flag(group, "compact-warmup", type=int, default=None, help="raw steps per site (default: 1)")
    flag(
        group,
        "compact-policy",
        choices=POLICIES,
        default="always",
        help="auto needs --compact-link",
    )
    flag(
        group,
        "compact-link",
        default=None,
        help=f"link hint for --compact-policy auto: {sorted(LINK_HINTS)} or a bandwidth in GB/s",
    )
    flag(group, "compact-off", action="store_true", help="run plain xfuser: nothing is patched")
    flag(
        group,
        "compact-compare",
        action="store_true",
        help="also run the same inputs uncompressed (same seed) and report how far the output is",
    )


def compact_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The :class:`CompactConfig` the flags describe (None for ``--compact-off``); bad values
    end in ``parser.error`` naming the flag."""
    if args.compact_off:
        given = [
            name
            for name in ("compact_codec", "compact_codec_params", "compact_warmup", "compact_link")
            if getattr(args, name) is not None
        ]
        if given or args.compact_mode != "allgather" or args.compact_policy != "always":
            parser.error("--compact-off runs without compactfusion: drop the other --compact-*")
        if args.compact_compare:
            parser.error("--compact-compare compares with compactfusion on: drop --compact-off")
        return None
    with warnings.catch_warnings():  # a command-line user sees the deprecation of "sparse"/"off"
        warnings.simplefilter("default", DeprecationWarning)
        codec = preset_name(args.compact_codec or "int2")
    fields: dict[str, Any] = {"mode": args.compact_mode, "policy": args.compact_policy}
    if args.compact_warmup is not None:
        fields["warmup_steps"] = args.compact_warmup
    if args.compact_link is not None:
        try:
            fields["link"] = float(args.compact_link)
        except ValueError:
            fields["link"] = args.compact_link
    try:
        if args.compact_codec_params is not None:
            params = json.loads(args.compact_codec_params)
            if not isinstance(params, dict):
                raise ValueError("--compact-codec-params must be a JSON object")
            fields["codec_params"] = params
        if codec in PRESETS:
            return CompactConfig.preset(codec, **fields)
        return CompactConfig(codec=codec, **fields)
    except (ValueError, NotImplementedError) as exc:  # json.JSONDecodeError is a ValueError
        parser.error(f"compactfusion: {exc}")
