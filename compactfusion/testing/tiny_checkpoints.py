"""Tiny random FLUX and CogVideoX checkpoints on disk, complete enough for ``from_pretrained``.

The torchrun examples load real weights with ``xFuserFluxPipeline.from_pretrained`` /
``xFuserCogVideoXPipeline.from_pretrained``. To run that path without downloading anything,
these functions build the tiny seeded pipelines of :mod:`~compactfusion.testing.tiny_pipelines`,
add text encoders and tokenizers built in memory (:mod:`~compactfusion.testing.tiny_text`), and
write the whole pipeline with diffusers' own ``save_pretrained``: the directory has the layout
of a real checkpoint (``model_index.json``, one folder per component) and prompts go through
the tokenizers and text encoders as with real weights.

``vae_scale_factor`` picks the VAE depth: 2 (the default: one downsampling, fastest) or 8
(three, as in FLUX.1 and CogVideoX), so that the pixel sizes the real models accept (and
xfuser's divisibility rules for them) apply unchanged. Needs diffusers and transformers, not
xfuser.
"""

from __future__ import annotations

import math
import os

import torch

from .tiny_pipelines import tiny_cogvideox, tiny_flux
from .tiny_text import char_clip_tokenizer, char_t5_tokenizer

__all__ = ["save_tiny_cogvideox_checkpoint", "save_tiny_flux_checkpoint"]

CLIP_LENGTH = 16  # padded CLIP prompt length of the tiny FLUX (77 in FLUX.1)


def _levels(vae_scale_factor: int) -> int:
    """VAE blocks for a spatial factor (each block but the last halves height and width)."""
    if vae_scale_factor < 1 or vae_scale_factor & (vae_scale_factor - 1):
        raise ValueError(f"vae_scale_factor must be a power of two, got {vae_scale_factor}")
    return int(math.log2(vae_scale_factor)) + 1


def _t5_encoder(tokenizer, width: int):
    """A one-layer T5 encoder of width ``width`` (the transformer's text embedding width)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    )


def _clip_encoder(tokenizer, width: int):
    """A one-layer CLIP text encoder whose pooled output has ``width`` features."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=width,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    )


def _flux_vae(template, levels: int):
    """The tiny FLUX VAE (``template``) with ``levels`` blocks instead of two."""
    from diffusers import AutoencoderKL

    config = dict(template.config)
    channels = tuple(config["block_out_channels"])
    config.update(
        down_block_types=(config["down_block_types"][0],) * levels,
        up_block_types=(config["up_block_types"][0],) * levels,
        block_out_channels=(channels[0],) * (levels - 1) + (channels[-1],),
    )
    return AutoencoderKL.from_config(config)


def _cogvideox_vae(template, levels: int):
    """The tiny CogVideoX VAE (``template``) with ``levels`` blocks instead of two."""
    from diffusers import AutoencoderKLCogVideoX

    config = dict(template.config)
    config.update(
        down_block_types=(config["down_block_types"][0],) * levels,
        up_block_types=(config["up_block_types"][0],) * levels,
        block_out_channels=(config["block_out_channels"][0],) * levels,
    )
    return AutoencoderKLCogVideoX.from_config(config)


def save_tiny_flux_checkpoint(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    heads: int = 4,
    head_dim: int = 16,
    vae_scale_factor: int = 2,
) -> str:
    """Write a tiny random FLUX.1 with ``FluxPipeline.save_pretrained`` and return the path.

    Components: the transformer of :func:`~compactfusion.testing.tiny_flux` (2 + 2 blocks,
    ``heads`` x ``head_dim``, text width 32, no guidance embedding), its VAE (deepened to
    ``vae_scale_factor``), a flow-matching scheduler, a CLIP tokenizer and one-layer CLIP
    text encoder (pooled width 32, prompts padded to 16 tokens) and a T5 tokenizer and
    one-layer T5 encoder (width 32). Weights are seeded: the same on every call and rank.
    """
    from diffusers import FluxPipeline

    levels = _levels(vae_scale_factor)
    base = tiny_flux(seed=seed, heads=heads, head_dim=head_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        vae = base.vae if levels == 2 else _flux_vae(base.vae, levels)
        tokenizer = char_clip_tokenizer(CLIP_LENGTH)
        text_encoder = _clip_encoder(tokenizer, base.transformer.config.pooled_projection_dim)
        tokenizer_2 = char_t5_tokenizer()
        text_encoder_2 = _t5_encoder(tokenizer_2, base.transformer.config.joint_attention_dim)
    pipe = FluxPipeline(
        scheduler=base.scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=base.transformer,
    )
    directory = os.fspath(directory)
    pipe.save_pretrained(directory)
    return directory


def save_tiny_cogvideox_checkpoint(
    directory: str | os.PathLike,
    *,
    seed: int = 0,
    heads: int = 4,
    head_dim: int = 16,
    text_len: int = 226,
    rotary: bool = False,
    vae_scale_factor: int = 2,
) -> str:
    """Write a tiny random CogVideoX with ``CogVideoXPipeline.save_pretrained``; return the path.

    Components: the transformer of :func:`~compactfusion.testing.tiny_cogvideox` (2 blocks,
    ``heads`` x ``head_dim``, patch size 2, ``text_len`` text positions as the pipeline's
    default ``max_sequence_length`` of 226; sin-cos positions as CogVideoX-2B, or RoPE as 5B
    with ``rotary``), its 3-D VAE (temporal factor 4, deepened to ``vae_scale_factor``), the
    CogVideoX DDIM scheduler, and a T5 tokenizer and one-layer T5 encoder (width 32).
    """
    from diffusers import CogVideoXPipeline

    levels = _levels(vae_scale_factor)
    base = tiny_cogvideox(
        seed=seed, heads=heads, head_dim=head_dim, text_len=text_len, rotary=rotary
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 100)
        vae = base.vae if levels == 2 else _cogvideox_vae(base.vae, levels)
        tokenizer = char_t5_tokenizer()
        text_encoder = _t5_encoder(tokenizer, base.transformer.config.text_embed_dim)
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=base.transformer,
        scheduler=base.scheduler,
    )
    directory = os.fspath(directory)
    pipe.save_pretrained(directory)
    return directory
