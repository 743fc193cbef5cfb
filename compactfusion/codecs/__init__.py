"""Reference codecs (torch): encode a tensor into a packed ``uint8`` payload and back.

``get_codec(name, **params)`` returns a :class:`Codec`. Registered codecs: ``raw``, ``fp8``,
``int2``, ``int1``, ``nm_sparse`` and ``lowrank``. These torch implementations are the CPU
path and the oracle for the fused Triton kernels in ``compactfusion.kernels``.
"""

from .base import (
    SUPPORTED_DTYPES,
    Codec,
    NonFiniteInput,
    PayloadError,
    decode_header,
    encode_header,
    header_nbytes,
    rows_cols,
)
from .registry import available_codecs, codec_class, get_codec, register_codec


def _register_builtin_codecs() -> None:
    # Every module in this package other than the plumbing defines and registers one codec.
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "registry") and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_register_builtin_codecs()

__all__ = [
    "SUPPORTED_DTYPES",
    "Codec",
    "NonFiniteInput",
    "PayloadError",
    "available_codecs",
    "codec_class",
    "decode_header",
    "encode_header",
    "get_codec",
    "header_nbytes",
    "register_codec",
    "rows_cols",
]
