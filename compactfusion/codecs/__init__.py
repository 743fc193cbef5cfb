"""Reference codecs (torch): encode a tensor into a packed ``uint8`` payload and back.

``get_codec(name, **params)`` returns a :class:`Codec`. Registered codecs: ``raw``, ``fp8``,
``int2``, ``int1``, ``nm_sparse`` and ``lowrank``. These torch implementations are the CPU
path and the oracle for the fused Triton kernels in ``compactfusion.kernels``.
"""

from .base import (
    SUPPORTED_DTYPES,
    Codec,
    PayloadError,
    decode_header,
    encode_header,
    header_nbytes,
    rows_cols,
)
from .registry import available_codecs, codec_class, get_codec, register_codec
from . import raw  # noqa: F401,E402  (registers the codec)

__all__ = [
    "SUPPORTED_DTYPES",
    "Codec",
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
