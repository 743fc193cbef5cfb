"""Test helpers: spawned multi-rank worlds, xfuser on CPU, tiny seeded pipelines, and
synthetic K/V trajectories for codec fidelity.

Nothing here imports xfuser or diffusers until a function that needs them is called, so
``import compactfusion.testing`` is cheap and works without the ``xdit`` extra.
"""

from compactfusion.testing.spawn import free_port, spawn_ranks
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
from compactfusion.testing.xfuser_cpu import prepare_xfuser_cpu

__all__ = [
    "KINDS",
    "TrajectoryConfig",
    "TrajectoryResult",
    "build_engine_config",
    "build_pipeline",
    "destroy_xfuser_distributed",
    "free_port",
    "generate",
    "init_xfuser_distributed",
    "kv_trajectory",
    "make_inputs",
    "prepare_xfuser_cpu",
    "run_trajectory",
    "spawn_ranks",
    "tiny_cogvideox",
    "tiny_flux",
    "tiny_pixart",
    "tiny_sd3",
]
