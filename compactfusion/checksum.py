"""Payload checksums (``CompactConfig(checksum=True)``): computed and compared on the device.

With checksums on, every payload travels with a 16-byte *trailer* after its last byte (so the
payload format of the codecs is unchanged): two int64 sums over the payload read as int32
words ``v_i``, ``i = 0 .. n-1``::

    s1 = sum_i v_i
    s2 = sum_j (c_j mod M) * (j + 1),   c_j = sum_{i = j mod P} v_i,   P = 32749, M = 2**31 - 1

Both are exact (no overflow below 16 GB of payload). Any change of one word changes ``s1``;
changes of two words that cancel in ``s1`` change ``s2`` unless the words are a multiple of
``P`` words (128 KiB) apart. Cost: one read of the payload (a column sum of an ``n/P x P``
view, 16 rows at a time) plus a few operations on ``P`` values, on each side; sending also
copies the payload once to append the trailer (measured in ``benchmarks/checksum_cost.py``).

The receiver's verdict is a 0-d bool tensor on the device: the compressed collectives OR it
into the exchange's status flags, read once per step by ``ResidualCompressor.end_step``.
"""

from __future__ import annotations

import functools

import torch

CHECKSUM_NBYTES = 16  # two int64 sums; keeps payload sizes multiples of 16
_P = 32749  # the period of the position weights (a prime below 2**15)
_M = 2**31 - 1  # column sums are reduced modulo this prime before weighting
_CHUNK_ROWS = 16  # rows of P words summed at once (2 MiB of int32)


@functools.lru_cache(maxsize=16)
def _weights(device: torch.device) -> torch.Tensor:
    return torch.arange(1, _P + 1, dtype=torch.int64, device=device)


def _words(payload: torch.Tensor) -> torch.Tensor:
    """``payload`` (1-D uint8) as int32 words; a misaligned or odd-sized payload (never one
    that compactfusion sends) is copied and zero-padded first."""
    pad = -payload.numel() % 4
    if pad or payload.data_ptr() % 4:
        payload = torch.cat([payload, payload.new_zeros(pad)])
    return payload.view(torch.int32)


def payload_checksum(payload: torch.Tensor) -> torch.Tensor:
    """The checksum of a 1-D uint8 ``payload`` as 16 uint8 bytes on its device (no host
    read)."""
    v = _words(payload)
    n = v.numel()
    full = n - n % _P
    cols = torch.zeros(_P, dtype=torch.int64, device=v.device)
    rows = v[:full].view(-1, _P)
    for start in range(0, rows.shape[0], _CHUNK_ROWS):  # int64 temporaries stay in cache
        cols += rows[start : start + _CHUNK_ROWS].sum(0, dtype=torch.int64)
    if full < n:
        cols[: n - full] += v[full:].to(torch.int64)
    s1 = cols.sum()
    s2 = ((cols % _M) * _weights(v.device)).sum()
    return torch.stack([s1, s2]).view(torch.uint8)


def with_checksum(payload: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``payload`` followed by its checksum trailer."""
    out = torch.empty(payload.numel() + CHECKSUM_NBYTES, dtype=torch.uint8, device=payload.device)
    out[: payload.numel()] = payload
    out[payload.numel() :] = payload_checksum(payload)
    return out


def split_checksum(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(body, trailer)`` of a payload that carries a checksum trailer (views, no copy)."""
    n = payload.numel() - CHECKSUM_NBYTES
    return payload[:n], payload[n:]


def checksum_mismatch(payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(body, bad)``: the payload without its trailer, and a 0-d bool tensor on the device
    telling whether the body's checksum differs from the trailer (no host read)."""
    body, trailer = split_checksum(payload)
    return body, (payload_checksum(body) != trailer).any()


__all__ = [
    "CHECKSUM_NBYTES",
    "checksum_mismatch",
    "payload_checksum",
    "split_checksum",
    "with_checksum",
]
