"""Test helpers: spawned multi-rank worlds, xfuser and diffusers' context parallelism on CPU,
tiny seeded pipelines, and synthetic K/V trajectories for codec fidelity.

Nothing here imports xfuser or diffusers until a function that needs them is called, so
``import compactfusion.testing`` is cheap and works without the ``xdit`` extra.
"""

from compactfusion.testing.diffusers_cpu import prepare_diffusers_cpu
from compactfusion.testing.spawn import free_port, spawn_ranks
from compactfusion.testing.tiny_diffusers import (
    DIFFUSERS_KINDS,
    build_diffusers_pipeline,
    enable_context_parallel,
    generate_diffusers,
    tiny_flux2,
    tiny_qwenimage,
    tiny_wan,
)
from compactfusion.testing.tiny_pipelines import (
    KINDS,
    build_engine_config,
    build_pipeline,
    destroy_xfuser_distributed,
    generate,
    init_xfuser_distributed,
    make_inputs,
    tiny_cogvideox,
    tiny_flux,
    tiny_pixart,
    tiny_sd3,
)
from compactfusion.testing.trajectory import (
    TrajectoryConfig,
    TrajectoryResult,
    kv_trajectory,
    run_trajectory,
)
from compactfusion.testing.wire import counting_sent_bytes
from compactfusion.testing.xfuser_cpu import prepare_xfuser_cpu

__all__ = [
    "DIFFUSERS_KINDS",
    "KINDS",
    "build_diffusers_pipeline",
    "TrajectoryConfig",
    "TrajectoryResult",
    "build_engine_config",
    "build_pipeline",
    "counting_sent_bytes",
    "destroy_xfuser_distributed",
    "enable_context_parallel",
    "free_port",
    "generate",
    "generate_diffusers",
    "init_xfuser_distributed",
    "kv_trajectory",
    "make_inputs",
    "prepare_diffusers_cpu",
    "prepare_xfuser_cpu",
    "run_trajectory",
    "spawn_ranks",
    "tiny_cogvideox",
    "tiny_flux",
    "tiny_flux2",
    "tiny_pixart",
    "tiny_qwenimage",
    "tiny_sd3",
    "tiny_wan",
]
