"""Codec registry: names and header ids map to codec classes."""

from __future__ import annotations

from typing import Any

from .base import Codec

_BY_NAME: dict[str, type[Codec]] = {}
_BY_ID: dict[int, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator registering a codec under ``cls.name`` and ``cls.codec_id``."""
    if cls.name in _BY_NAME or cls.codec_id in _BY_ID:
        raise ValueError(f"codec {cls.name!r} (id {cls.codec_id}) is already registered")
    _BY_NAME[cls.name] = cls
    _BY_ID[cls.codec_id] = cls
    return cls


def available_codecs() -> list[str]:
    """Names of all registered codecs."""
    return sorted(_BY_NAME)


def codec_class(name: str) -> type[Codec]:
    """The class registered as ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown codec {name!r}; available: {', '.join(available_codecs())}"
        ) from None


def get_codec(name: str, **params: Any) -> Codec:
    """Instantiate codec ``name`` with its parameters.

    Example: ``get_codec("int2", group_size=128)``. Unknown names or bad parameters raise
    ``ValueError``.
    """
    cls = codec_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for codec {name!r}: {exc}") from None
