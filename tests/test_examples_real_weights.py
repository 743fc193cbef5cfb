"""The examples' real-weights path: ``--model DIR`` loaded with ``from_pretrained``.

Tiny random FLUX and CogVideoX checkpoints are written with diffusers' ``save_pretrained``
(:mod:`compactfusion.testing.tiny_checkpoints`: tokenizers and text encoders built in memory,
nothing downloaded), then each example runs under torchrun on 2 CPU ranks (gloo) for 2 steps
with the prompt going through the tokenizers and text encoders, as with real weights. One
launch per example (~15-20 s each, mostly ``import xfuser`` in both ranks).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_examples import _check_compressed, _ok, _run, example_modules

pytestmark = [
    pytest.mark.xfuser,
    pytest.mark.skipif(
        importlib.util.find_spec("xfuser") is None, reason="needs the xdit extra (xfuser==0.7.0)"
    ),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from compactfusion.testing.tiny_checkpoints import (
        save_tiny_cogvideox_checkpoint,
        save_tiny_flux_checkpoint,
    )

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "flux": Path(save_tiny_flux_checkpoint(root / "flux")),
        "cogvideox": Path(save_tiny_cogvideox_checkpoint(root / "cogvideox")),
    }


def _stats(out: Path, model: Path) -> dict:
    stats = json.loads((out / "stats.json").read_text())
    assert stats["model"] == {"requested": str(model), "weights": str(model), "tiny": False}
    assert stats["parallel"]["world_size"] == 2 and stats["parallel"]["ring_degree"] == 2
    return stats


def test_flux_example_loads_a_checkpoint(tmp_path, checkpoints):
    """FluxPipeline.save_pretrained output -> xFuserFluxPipeline.from_pretrained, CLIP + T5
    prompts, int2 over ring attention, uncompressed reference for the PSNR."""
    out, model = tmp_path / "flux", checkpoints["flux"]
    proc = _run(
        tmp_path,
        ["examples/flux_example.py", "--model", str(model), "--num_inference_steps", "2",
         "--height", "32", "--width", "32", "--max_sequence_length", "16",
         "--prompt", "a cat", "--compact-codec", "int2", "--compact-compare",
         "--output-dir", str(out)],
    )  # fmt: skip
    stdout = _ok(proc)
    assert f"loading weights from the local directory {model}" in stdout

    from PIL import Image

    with Image.open(out / "flux.png") as image:
        assert image.size == (32, 32)
    stats = _stats(out, model)
    assert stats["inputs"]["prompt"] == "a cat" and stats["inputs"]["max_sequence_length"] == 16
    _check_compressed(stats["runs"]["compressed"], min_ratio=6.0)  # int2 on bf16: ~7.7x
    assert 20.0 < stats["psnr_db_vs_uncompressed"] < 200.0  # lossy, but close


def test_cogvideox_example_loads_a_checkpoint(tmp_path, checkpoints):
    """CogVideoXPipeline.save_pretrained output -> xFuserCogVideoXPipeline.from_pretrained, T5
    prompts (and the empty negative prompt: CFG), int1 over the ring relay."""
    out, model = tmp_path / "cogvideox", checkpoints["cogvideox"]
    proc = _run(
        tmp_path,
        ["examples/cogvideox_example.py", "--model", str(model), "--num_inference_steps", "2",
         "--height", "32", "--width", "32", "--num_frames", "5", "--prompt", "a panda",
         "--compact-codec", "int1", "--compact-mode", "ring", "--output-dir", str(out)],
    )  # fmt: skip
    stdout = _ok(proc)
    assert f"loading weights from the local directory {model}" in stdout

    from PIL import Image

    frames = sorted((out / "cogvideox_frames").glob("frame_*.png"))
    assert frames, "no frames written"
    with Image.open(frames[0]) as frame:
        assert frame.size == (32, 32)
    stats = _stats(out, model)
    assert stats["inputs"]["prompt"] == "a panda"
    _check_compressed(stats["runs"]["compressed"], min_ratio=12.0)  # int1 on bf16: ~15x


def test_geometries_match_the_saved_and_tiny_models(checkpoints):
    """The examples' ``geometry`` read from configs as ``save_pretrained`` writes them, and the
    ``tiny_geometry`` they use without weights, agree with the models they describe."""
    from compactfusion.testing import tiny_cogvideox, tiny_flux

    with example_modules() as examples:
        read_configs = examples.validation.read_configs
        for module, tiny in ((examples.flux, tiny_flux), (examples.cogvideox, tiny_cogvideox)):
            example = module.EXAMPLE
            configs = read_configs(str(checkpoints[example.kind]), example.pipeline_class)
            saved = module.geometry(*configs)
            pipe = tiny(head_dim=64)  # as the example's build_tiny
            built = module.geometry(dict(pipe.transformer.config), dict(pipe.vae.config))
            assert built == example.tiny_geometry
            assert saved.row_pixels == built.row_pixels and saved.heads == built.heads
            assert saved.patch_size == built.patch_size
        # The saved CogVideoX has sin-cos positions (as CogVideoX-2B): a fixed text length.
        configs = read_configs(str(checkpoints["cogvideox"]), "CogVideoXPipeline")
        assert examples.cogvideox.geometry(*configs).fixed_text_len == 226
