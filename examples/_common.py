"""Shared plumbing of the torchrun examples ``flux_example.py`` and ``cogvideox_example.py``.

Each example describes its model family in an :class:`Example` (how to load real weights, how
to build the tiny stand-in, what to pass to the pipeline, how to save the output) and calls
:func:`main`, which does the rest the same way for both:

1. Device and backend: CUDA + NCCL when a GPU is visible, otherwise CPU + gloo (with
   :func:`compactfusion.testing.prepare_xfuser_cpu` applied before xfuser is imported).
2. Arguments: xfuser's own (``xFuserArgs.add_cli_args``) plus the ``--compact-*`` flags and a
   few of the example's own (``--output-dir``, ``--dtype``, ``--warmup-generation``). With
   several ranks and no parallel degree, ring attention spans all of them.
3. Weights: ``--model`` as a local directory, or as a Hugging Face repo id already in the local
   cache. Nothing is downloaded (``HF_HUB_OFFLINE=1`` unless set otherwise); without local
   weights the example says so and runs a tiny random model built from a config instead.
4. Checks (:mod:`_validation`): sizes, parallel degrees, text length and flags are checked
   against the model's JSON configs before any process group exists or any weight is read;
   every problem is reported at once with what would work (exit status 2).
5. The process group comes from torchrun's ``env://`` variables (``xFuserArgs.create_config``);
   started without torchrun, the script runs as a world of one (nothing to compress).
6. One generation (two with ``--compact-compare``: uncompressed first, same seed), a denoising
   progress bar on rank 0 only, then on rank 0: the image / video frames and ``stats.json``.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DTYPES",
    "TINY",
    "Example",
    "StepTimer",
    "check_arguments",
    "main",
    "psnr",
    "resolve_weights",
]

# Run from a checkout without installing: the repository root holds the ``compactfusion``
# package; this directory holds ``_validation`` (on the path already when a script here runs).
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
for _dir in (_REPO, _HERE):
    if _dir not in sys.path:
        sys.path.insert(0, _dir)

from _validation import Geometry, problems, read_configs  # noqa: E402

from compactfusion.environment import cpu_name  # noqa: E402
from compactfusion.metrics import psnr  # noqa: E402

TINY = "tiny"  # ``--model tiny`` asks for the tiny random model without looking for weights
# xfuser input arguments whose default depends on the model (real or tiny, image or video).
_PER_MODEL = (
    "height",
    "width",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "prompt",
    "max_sequence_length",
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Example:
    """What differs between the example scripts; everything else lives in :func:`main`.

    Attributes:
        kind: ``"flux"`` or ``"cogvideox"`` (as in :mod:`compactfusion.testing.tiny_pipelines`).
        description: first line of ``--help``.
        default_model: repo id used when ``--model`` is not given (looked up in the local cache).
        defaults: input defaults for real weights (``height``, ``width``, ``num_inference_steps``,
            ``guidance_scale``, ``prompt``, and ``num_frames`` for video).
        tiny_defaults: the same for the tiny model (small enough for a CPU).
        load: ``(path, engine_config, dtype) -> xfuser pipeline`` from local weights.
        build_tiny: ``(engine_config, dtype) -> xfuser pipeline`` with random weights.
        call_kwargs: ``(pipe, inputs, tiny, generator) -> dict`` of pipeline call arguments,
            where ``inputs`` is the resolved dict of the input defaults above.
        save: ``(output, out_dir, stem) -> list of written paths``; ``output`` is what the
            pipeline returned (``return_dict=False``, first element) on rank 0.
        to_array: ``output -> float numpy array in [0, 1]``, for PSNR between two runs.
        pipeline_class: the diffusers pipeline class a checkpoint must hold
            (``model_index.json``'s ``_class_name``).
        geometry: ``(transformer config, vae config) -> Geometry`` (dicts read from the
            checkpoint's JSON files), for the checks in :mod:`_validation`.
        tiny_geometry: the same for the tiny model (``test_examples_real_weights.py`` checks it
            against ``geometry`` of the tiny model's configs).
        check: ``(args, inputs, geometry, sp) -> list of problems`` specific to the model.
    """

    kind: str
    description: str
    default_model: str
    defaults: dict[str, Any]
    tiny_defaults: dict[str, Any]
    load: Callable[..., Any]
    build_tiny: Callable[..., Any]
    call_kwargs: Callable[..., dict[str, Any]]
    save: Callable[..., list[str]]
    to_array: Callable[[Any], Any]
    pipeline_class: str
    geometry: Callable[[dict[str, Any], dict[str, Any]], Geometry]
    tiny_geometry: Geometry
    check: Callable[..., list[str]]


# --------------------------------------------------------------------------------------------
# Process set-up (before xfuser is imported)
# --------------------------------------------------------------------------------------------


def _prepare_process() -> str:
    """Quiet the libraries, forbid downloads, make xfuser importable; return the device type."""
    os.environ.setdefault("LOG_LEVEL", "warning")  # xfuser defaults to debug: a line per layer
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk only
    if "RANK" not in os.environ:  # plain ``python example.py``: a world of one, as torchrun would
        from compactfusion.testing import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    warnings.filterwarnings("ignore", category=FutureWarning)
    if torch.cuda.is_available():
        return "cuda"
    from compactfusion.testing import prepare_xfuser_cpu

    prepare_xfuser_cpu()  # must precede the first ``import xfuser`` in this process
    return "cpu"


def _quiet_other_ranks() -> None:
    """Progress bars (weight loading, denoising) on rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # only needed for text encoders of real checkpoints
        return
    transformers_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def build_parser(example: Example):
    """xfuser's parser with ``--model`` optional, input defaults per model, and our flags."""
    from xfuser import xFuserArgs
    from xfuser.config import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description=example.description)
    xFuserArgs.add_cli_args(parser)
    for action in parser._actions:  # xfuser marks --model required; we have a default
        if action.dest == "model":
            action.required = False
            action.default = example.default_model
            action.help = (
                "local directory with diffusers weights, a Hugging Face repo id found in the "
                f"local cache, or '{TINY}' (default: {example.default_model}; without local "
                "weights a tiny random model is used)"
            )
    # None = "the default for the model that gets loaded" (real and tiny defaults differ).
    parser.set_defaults(**dict.fromkeys(_PER_MODEL))

    from compactfusion.cli.flags import add_compact_flags, flag

    add_compact_flags(parser)
    ex = parser.add_argument_group("example")
    flag(ex, "output-dir", default=f"outputs/{example.kind}_example", help="where rank 0 writes")
    flag(ex, "dtype", choices=sorted(DTYPES), default="bf16", help="pipeline dtype")
    flag(
        ex,
        "warmup-generation",
        action="store_true",
        help="run one untimed, uncompressed 2-step generation first (kernel set-up, caches)",
    )
    return parser


def compact_config(args, parser):
    """The :class:`~compactfusion.CompactConfig` the flags describe (None for --compact-off)."""
    from compactfusion.cli.flags import compact_config as from_flags

    return from_flags(args, parser)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def resolve_weights(model: str, download_dir: str | None) -> tuple[str | None, str]:
    """``(local path or None, explanation)``. Never touches the network."""
    if model == TINY:
        return None, f"--model {TINY}: using the tiny random model"
    if os.path.isdir(model):
        return os.path.abspath(model), f"loading weights from the local directory {model}"
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id=model, cache_dir=download_dir, local_files_only=True)
    except Exception as exc:  # not a repo id, not cached, hub not installed: all mean "no"
        return None, (
            f"no local weights for {model!r}: not a directory and not in the local Hugging Face "
            f"cache ({type(exc).__name__}); nothing is downloaded. Running a tiny random model "
            "built from a config instead; pass --model /path/to/weights for real weights."
        )
    return path, f"loading weights for {model} from the local Hugging Face cache: {path}"


# --------------------------------------------------------------------------------------------
# Timing and outputs
# --------------------------------------------------------------------------------------------


class StepTimer:
    """Wall time of every transformer call (one per denoising step), measured on this rank.

    Forward hooks on the transformer; on CUDA the device is synchronised at both ends so the
    time covers the kernels and the communication of the step, not just their launch.
    """

    def __init__(self, transformer: torch.nn.Module, cuda: bool):
        self.cuda = cuda
        self.seconds: list[float] = []
        self._start = 0.0
        self._handles = [
            transformer.register_forward_pre_hook(self._begin),
            transformer.register_forward_hook(self._end),
        ]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _begin(self, module, args) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _end(self, module, args, output) -> None:
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)

    def reset(self) -> None:
        self.seconds = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _output_on_rank0(output: Any) -> Any:
    """The pipeline output on rank 0 (xfuser returns it on the last data-parallel group only)."""
    has = [None] * dist.get_world_size()
    dist.all_gather_object(has, output is not None)
    if has[0]:
        return output
    holders = [rank for rank, flag in enumerate(has) if flag]
    if not holders:
        raise RuntimeError("no rank received an output from the pipeline")
    box = [output]
    dist.broadcast_object_list(box, src=holders[-1])
    return box[0] if dist.get_rank() == 0 else None


def _first(result: Any) -> Any:
    """First element of a ``return_dict=False`` result; None where this rank got nothing."""
    if result is None:
        return None
    output = result[0]
    if isinstance(output, list) and all(item is None for item in output):
        return None  # xfuser CogVideoX returns [None] * batch off the output ranks
    return output


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: map them to None (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("compactfusion", "torch", "xfuser", "diffusers", "yunchang", "triton"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    if out["compactfusion"] is None:  # running from a checkout
        import compactfusion

        out["compactfusion"] = getattr(compactfusion, "__version__", None)
    return out


def _machine(device_type: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device_type, "backend": dist.get_backend()}
    if device_type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    info["cpu"] = cpu_name()
    return info


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(example: Example, argv: list[str] | None = None) -> None:
    """Parse, set up the world, load or build the model, generate, save (see module doc)."""
    device_type = _prepare_process()
    _quiet_other_ranks()
    parser = build_parser(example)
    args = parser.parse_args(argv)
    if args.output_type != "pil":
        parser.error("this example saves images: --output_type must stay 'pil'")
    config = compact_config(args, parser)
    dtype = DTYPES[args.dtype]
    path, weights_note = resolve_weights(args.model, args.download_dir)
    tiny = path is None
    inputs = _inputs(example, args, tiny)
    _default_ring_degree(args)
    found = check_arguments(example, args, inputs, path, config is not None, device_type)
    if found:  # before the process group and the weights: fails in seconds, on every rank
        if os.environ.get("RANK", "0") != "0":
            raise SystemExit(2)
        # Without the usage: xfuser's parser has a hundred flags.
        parser.exit(2, "\n  - ".join([f"{parser.prog}: cannot run as given:", *found]) + "\n")

    from xfuser import xFuserArgs

    for name in _PER_MODEL:  # not used by this model: xfuser's own default for InputConfig
        if getattr(args, name) is None:
            setattr(args, name, getattr(xFuserArgs, name))
    engine_config, _input_config = xFuserArgs.from_cli_args(args).create_config()  # env://
    engine_config.runtime_config.dtype = dtype
    try:
        _run(example, args, engine_config, config, dtype, path, weights_note, inputs, device_type)
    finally:
        _teardown()


def check_arguments(
    example: Example, args, inputs: dict[str, Any], path: str | None, compressing: bool,
    device_type: str,
) -> list[str]:  # fmt: skip
    """Every problem with the arguments (see :mod:`_validation`), read from the checkpoint's
    JSON configs at ``path`` (None: the tiny model); [] when the run can start."""
    if path is None:
        geometry = example.tiny_geometry
    else:
        try:
            geometry = example.geometry(*read_configs(path, example.pipeline_class))
        except ValueError as exc:
            return [str(exc)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return problems(
        args, inputs, geometry, world=world, device_type=device_type, compressing=compressing,
        check=example.check,
    )  # fmt: skip


def _inputs(example: Example, args, tiny: bool) -> dict[str, Any]:
    """Generation inputs: what was given on the command line, else the model's defaults."""
    defaults = example.tiny_defaults if tiny else example.defaults
    inputs = dict(defaults)
    for name in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale"):
        value = getattr(args, name)
        if value is not None and name in defaults:
            inputs[name] = value
    if args.prompt:
        inputs["prompt"] = args.prompt[0] if len(args.prompt) == 1 else list(args.prompt)
    if args.negative_prompt:
        negative = args.negative_prompt
        inputs["negative_prompt"] = negative[0] if len(negative) == 1 else list(negative)
    if args.max_sequence_length is not None:
        inputs["max_sequence_length"] = args.max_sequence_length
    inputs["seed"] = args.seed
    for name, value in inputs.items():  # InputConfig reads these from args
        if hasattr(args, name) and name not in ("prompt", "negative_prompt"):
            setattr(args, name, value)
    return inputs


def _default_ring_degree(args) -> None:
    """With several ranks and no parallel degree given, use them all for ring attention."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    degrees = [
        args.ring_degree,
        args.ulysses_degree,
        2 if args.use_cfg_parallel else 1,
        getattr(args, "pipefusion_parallel_degree", 1),
        getattr(args, "data_parallel_degree", 1),
        getattr(args, "tensor_parallel_degree", 1),
    ]
    if world > 1 and math.prod(degrees) == 1:
        args.ring_degree = world
        if os.environ.get("RANK", "0") == "0":
            print(f"no parallel degree given: using --ring_degree {world} (all {world} ranks)")


def _run(example, args, engine_config, config, dtype, path, weights_note, inputs, device_type):
    from xfuser.core.distributed import get_world_group

    import compactfusion

    rank = dist.get_rank()
    world = dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(weights_note)
    cuda = device_type == "cuda"
    device = torch.device("cuda", get_world_group().local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    start = time.perf_counter()
    if path is None:
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "kept in float32" notes from casting a toy
        try:
            pipe = example.build_tiny(engine_config, dtype).to(device)
        finally:
            diffusers_logging.set_verbosity(level)
        if inputs.get("prompt"):
            say("the tiny model has no text encoder: --prompt is ignored (random embeddings)")
    else:
        pipe = example.load(path, engine_config, dtype)
        _place(pipe, args, device)
    load_seconds = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=rank != 0, leave=True)

    parallel = engine_config.parallel_config
    sp = parallel.ring_degree * parallel.ulysses_degree
    if config is not None and sp == 1:
        say(
            "no sequence parallelism (ring_degree = ulysses_degree = 1): compactfusion has "
            "nothing to compress, running uncompressed"
        )
        config = None
    say(
        f"{example.kind}: world {world} ({dist.get_backend()}, {device_type}), ring "
        f"{parallel.ring_degree} x ulysses {parallel.ulysses_degree} x cfg "
        f"{parallel.cfg_degree}, {inputs['num_inference_steps']} steps, "
        f"compactfusion: {_describe(config)}"
    )

    if args.warmup_generation:
        _generate(example, pipe, {**inputs, "num_inference_steps": 2}, path is None)
    timer = StepTimer(pipe.module.transformer, cuda)
    if rank == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    outputs: dict[str, Any] = {}
    runs: dict[str, Any] = {}
    try:
        plan = [("reference", None)] if args.compact_compare and config is not None else []
        plan.append(("compressed" if config is not None else "uncompressed", config))
        for label, cfg in plan:
            timer.reset()
            t0 = time.perf_counter()
            if cfg is None:
                output, st = _generate(example, pipe, inputs, path is None), None
            else:
                with compactfusion.patched(pipe, cfg):
                    output = _generate(example, pipe, inputs, path is None)
                    st = compactfusion.stats(pipe)
            seconds = time.perf_counter() - t0
            output = _output_on_rank0(output)
            per_rank = [None] * world
            dist.all_gather_object(per_rank, st["bytes_per_step"] if st else None)
            runs[label] = _summary(cfg, st, timer.seconds, seconds, per_rank)
            outputs[label] = output
    finally:
        timer.remove()

    if rank != 0:
        return
    label = plan[-1][0]
    files = example.save(outputs[label], args.output_dir, example.kind)
    result: dict[str, Any] = {
        "example": example.kind,
        "model": {"requested": args.model, "weights": path, "tiny": path is None},
        "inputs": {k: v for k, v in inputs.items() if k != "prompt" or path is not None},
        "dtype": args.dtype,
        "parallel": {
            "world_size": world,
            "ring_degree": parallel.ring_degree,
            "ulysses_degree": parallel.ulysses_degree,
            "cfg_degree": parallel.cfg_degree,
            "pipefusion_degree": parallel.pp_degree,
            "data_parallel_degree": parallel.dp_degree,
        },
        "compactfusion": None if config is None else config.as_dict(),
        "load_seconds": load_seconds,
        "runs": runs,
        "files": files,
        "versions": _versions(),
        "machine": _machine(device_type),
        "command": sys.argv,
    }
    if "reference" in outputs:
        ref_files = example.save(outputs["reference"], args.output_dir, f"{example.kind}_reference")
        result["files"] += ref_files
        quality = psnr(example.to_array(outputs[label]), example.to_array(outputs["reference"]))
        result["psnr_db_vs_uncompressed"] = quality
    stats_path = os.path.join(args.output_dir, "stats.json")
    with open(stats_path, "w") as f:
        json.dump(_finite(result), f, indent=2, default=str)
    _report(runs, result, stats_path)


def _place(pipe, args, device: torch.device) -> None:
    """Move real weights to the device, honouring xfuser's memory flags."""
    if args.enable_sequential_cpu_offload:
        pipe.enable_sequential_cpu_offload(gpu_id=device.index or 0)
    elif args.enable_model_cpu_offload:
        pipe.enable_model_cpu_offload(gpu_id=device.index or 0)
    else:
        pipe.to(device)
    if args.enable_tiling:
        pipe.vae.enable_tiling()
    if args.enable_slicing:
        pipe.vae.enable_slicing()


def _generate(example: Example, pipe, inputs: dict[str, Any], tiny: bool) -> Any:
    # A CPU generator gives the same noise on every machine and every rank.
    generator = torch.Generator("cpu").manual_seed(inputs["seed"])
    kwargs = example.call_kwargs(pipe, inputs, tiny, generator)
    return _first(pipe(output_type="pil", return_dict=False, **kwargs))


def _summary(cfg, st, step_seconds, seconds, per_rank) -> dict[str, Any]:
    """One run's numbers for stats.json (bytes: this rank; per_rank: every rank)."""
    warmup = cfg.warmup_steps if cfg is not None else 0
    out: dict[str, Any] = {
        "seconds_total": seconds,
        "seconds_per_step": step_seconds,
        "seconds_per_step_median": _median(step_seconds),
        "seconds_per_step_median_after_warmup": _median(step_seconds[warmup:]),
    }
    if st is None:
        out["bytes_per_step"] = None  # nothing patched: compactfusion saw no traffic
        return out
    sent, raw = st["bytes_per_step"], st["raw_bytes_per_step"]
    out.update(
        warmup_steps=warmup,
        bytes_per_step=sent,
        raw_bytes_per_step=raw,
        bytes_per_step_median_after_warmup=_median(sent[warmup:]),
        raw_bytes_per_step_median_after_warmup=_median(raw[warmup:]),
        ratio_after_warmup=st["ratio_after_warmup"],
        bytes_per_step_per_rank=per_rank,
        compactfusion_stats=st,
    )
    return out


def _describe(config) -> str:
    if config is None:
        return "off"
    text = f"{config.codec} {dict(config.codec_params) or ''} mode={config.mode}".replace("  ", " ")
    if config.policy == "auto":
        text += f" policy=auto link={config.link}"
    return text


def _report(runs: dict[str, Any], result: dict[str, Any], stats_path: str) -> None:
    for label, run in runs.items():
        line = f"{label}: {run['seconds_total']:.2f} s"
        step = run["seconds_per_step_median"]
        if step is not None:
            line += f", {step * 1e3:.1f} ms/step (median)"
        if run.get("bytes_per_step") is not None:
            sent = run["bytes_per_step_median_after_warmup"]
            ratio = run["ratio_after_warmup"]
            if sent is not None:
                line += f", {sent / 1024:.1f} KiB/rank/step after warm-up"
            if ratio is not None and math.isfinite(ratio):
                line += f" ({ratio:.1f}x smaller than raw)"
        print(line)
    if "psnr_db_vs_uncompressed" in result:
        print(f"PSNR vs uncompressed: {result['psnr_db_vs_uncompressed']:.1f} dB")
    print(f"wrote {', '.join(result['files'])} and {stats_path}")


def _teardown() -> None:
    """Destroy xfuser's groups and the default process group (safe if half set up)."""
    try:
        from xfuser.core.distributed import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("run examples/flux_example.py or examples/cogvideox_example.py instead")
