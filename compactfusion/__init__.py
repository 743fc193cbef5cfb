"""compactfusion: compressed residual communication for parallel diffusion inference.

Adjacent denoising steps produce nearly identical activations, so instead of the activations
that ranks exchange, compactfusion sends a compressed residual against a base that sender and
receiver share, with error feedback. Entry points:

- ``compactfusion.patch(pipe, config)`` / ``unpatch`` / ``patched`` / ``stats``: compress an
  xDiT (xfuser) pipeline's ring attention, patch parallelism and Ulysses traffic, or that of
  diffusers' own context parallelism (``enable_parallelism``); ``generation`` marks the
  generations of a patched diffusers transformer run from your own loop.
- ``CompactConfig``: all settings (codec, warm-up, policy, mode), with named presets.
- ``ResidualCompressor``: the per-site residual state, usable on its own.
- ``compactfusion.codecs.get_codec``: the codecs (raw, fp8, int2, int1, nm_sparse, lowrank).
- ``compactfusion.verify_bases(pipe)``: check (a collective) that every receiver's bases equal
  their senders' bit for bit.
- Errors: ``ConfigMismatchError`` (ranks configured differently), ``PayloadError`` (a corrupt
  or mismatched payload), ``CollectiveTimeout`` (a peer did not take part within
  ``CompactConfig.timeout_s``), ``ConcurrentUseError`` (one pipeline used from two threads),
  ``BaseDivergenceError``.
"""

from .api import generation, is_patched, patch, patched, stats, unpatch
from .codecs import PayloadError, available_codecs, get_codec
from .collectives import ConfigMismatchError
from .config import PRESETS, CompactConfig
from .residual import ConcurrentUseError, ResidualCompressor
from .timeouts import CollectiveTimeout
from .verify import BaseDivergenceError, verify_bases

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "BaseDivergenceError",
    "CollectiveTimeout",
    "CompactConfig",
    "ConcurrentUseError",
    "ConfigMismatchError",
    "PayloadError",
    "ResidualCompressor",
    "available_codecs",
    "generation",
    "get_codec",
    "is_patched",
    "patch",
    "patched",
    "stats",
    "unpatch",
    "verify_bases",
]
