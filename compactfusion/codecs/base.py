"""The codec interface and the self-describing payload format every codec shares.

A *payload* is a 1-D ``torch.uint8`` tensor: a small fixed header followed by the codec's
packed data. The header makes a payload self-describing (the receiver learns the shape and
dtype from it) and lets corrupt or mismatched payloads be rejected with a clear error.

Header layout (little-endian, padded to a multiple of 16 bytes so that every data section that
follows can be viewed as fp32/bf16 without misalignment)::

    offset  size  field
    0       2     magic b"CF"
    2       1     format version (FORMAT_VERSION)
    3       1     codec id (see ``Codec.codec_id``)
    4       1     dtype code: 0 float32, 1 float16, 2 bfloat16
    5       1     ndim (0..8)
    6       1     status flags (bit 0, FLAG_NOT_FINITE: the sender's input, residual or
                  reconstruction was not finite or out of range, see "Deferred checks";
                  bit 1, FLAG_OUT_OF_RANGE: raw values too large or not finite to compress
                  against)
    7       1     reserved, zero
    8       8     four uint16 codec parameters (e.g. group size, N and M, rank)
    16      8*nd  shape, int64 per dimension
    ...           zero padding to a multiple of 16

Headers are built on the host once per (codec, dtype, shape, device) and cached on the device
(:func:`device_header`), so encoding a payload never packs or copies header bytes from the host.

Deferred checks: a lossy codec refuses inf/nan (and reconstructions that would overflow the
dtype) by raising :class:`NonFiniteInput`, which costs a device-to-host read per check. Inside
:func:`deferred_checks` the same checks instead OR a device-side flag that the caller reads
later (the compressed collectives read all their flags once per denoising step); the payload
is then undefined and must be marked with ``FLAG_NOT_FINITE``.

Every codec views its input as a matrix of ``rows = numel / shape[-1]`` tokens by
``cols = shape[-1]`` channels (a 0-d tensor is 1x1). Scales are per token or per group of
channels inside one token, never over the whole tensor, so one pass over the input suffices.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import struct
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

MAGIC = b"CF"
FORMAT_VERSION = 1
MAX_NDIM = 8
_FIXED = struct.Struct("<2sBBBBBB4H")  # 16 bytes
ALIGN = 16
FLAGS_OFFSET = 6  # byte of the header holding the status flags
FLAG_NOT_FINITE = 1  # the payload is undefined: the sender's values were not finite
FLAG_OUT_OF_RANGE = 2  # a raw payload whose values cannot serve as a base (see residual.py)
_KNOWN_FLAGS = FLAG_NOT_FINITE | FLAG_OUT_OF_RANGE

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}
SUPPORTED_DTYPES = tuple(DTYPE_CODES)


class PayloadError(ValueError):
    """A payload is corrupt, truncated, or does not match the codec decoding it."""


class NonFiniteInput(ValueError):
    """A lossy codec was asked to encode inf or nan (the residual state then sends raw)."""


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def header_nbytes(ndim: int) -> int:
    """Size of the header for a tensor with ``ndim`` dimensions."""
    return align_up(_FIXED.size + 8 * ndim)


def rows_cols(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """The token-by-channel matrix view every codec uses: ``(numel // shape[-1], shape[-1])``."""
    if len(shape) == 0:
        return 1, 1
    cols = int(shape[-1])
    numel = math.prod(int(s) for s in shape)
    return (numel // cols if cols else 0), cols


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPE_CODES:
        raise TypeError(
            f"compactfusion codecs support float32, float16 and bfloat16 tensors, got {dtype}"
        )


def _check_shape(shape: tuple[int, ...]) -> None:
    if len(shape) > MAX_NDIM:
        raise ValueError(f"tensors with more than {MAX_NDIM} dimensions are not supported")
    if any(s == 0 for s in shape):
        raise ValueError(f"cannot encode an empty tensor of shape {tuple(shape)}")


class Codec(ABC):
    """Encode a tensor into a packed ``uint8`` payload and decode it back.

    Subclasses implement the matrix-level methods ``_data_nbytes``, ``_encode_rows`` and
    ``_decode_rows``; this class owns the header, validation and the residual helpers. The
    torch implementations here are the reference (and the CPU path); fused Triton kernels in
    ``compactfusion.kernels`` reproduce them.

    Codecs may keep per-call-site state (the low-rank codec warm-starts from the previous
    factors): ``new_state()`` creates it and the residual state stores one per site.
    """

    name: ClassVar[str]
    codec_id: ClassVar[int]
    lossless: ClassVar[bool] = False

    # --- parameters -------------------------------------------------------------------------
    def header_params(self) -> tuple[int, int, int, int]:
        """Four uint16 parameters stored in the header (checked again on decode)."""
        return (0, 0, 0, 0)

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form (name and parameters), used for config fingerprints and stats."""
        return {"name": self.name}

    def describe(self) -> dict[str, Any]:
        """Deprecated name of :meth:`as_dict` (removed in the next release)."""
        warnings.warn(
            f"{type(self).__name__}.describe() is deprecated, use as_dict()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.as_dict()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A codec written against the old name overrides ``describe``: use it as ``as_dict``
        # (warning once, at class creation) instead of silently reporting no parameters.
        if "describe" in cls.__dict__ and "as_dict" not in cls.__dict__:
            warnings.warn(
                f"{cls.__qualname__} overrides Codec.describe(), which is deprecated: rename "
                "it to as_dict()",
                DeprecationWarning,
                stacklevel=2,
            )
            cls.as_dict = cls.__dict__["describe"]

    def new_state(self) -> Any:
        """Per-call-site codec state (``None`` for stateless codecs)."""
        return None

    # --- matrix-level hooks -------------------------------------------------------------------
    @abstractmethod
    def _data_nbytes(self, rows: int, cols: int, dtype: torch.dtype) -> int:
        """Bytes of packed data for a ``rows x cols`` matrix of ``dtype``."""

    @abstractmethod
    def _encode_rows(
        self, r: torch.Tensor, dtype: torch.dtype, state: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack a float32 ``rows x cols`` matrix. Returns ``(data, reconstruction)``.

        ``data`` is a 1-D uint8 tensor of ``_data_nbytes`` bytes; ``reconstruction`` is the
        float32 matrix that ``_decode_rows(data)`` returns, bit for bit (so a sender can update
        its base without decoding its own payload).
        """

    @abstractmethod
    def _decode_rows(
        self, data: torch.Tensor, rows: int, cols: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Unpack ``data`` into a float32 ``rows x cols`` matrix."""

    # --- public API ---------------------------------------------------------------------------
    def payload_nbytes(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> int:
        """Exact size in bytes of ``encode(x)`` for a tensor of this shape and dtype."""
        check_dtype(dtype)
        shape = tuple(int(s) for s in shape)
        _check_shape(shape)
        rows, cols = rows_cols(shape)
        return header_nbytes(len(shape)) + align_up(self._data_nbytes(rows, cols, dtype))

    def encode(self, x: torch.Tensor, state: Any = None) -> torch.Tensor:
        """Encode ``x`` (fp32, fp16 or bf16, any shape) into a 1-D uint8 payload."""
        payload, _ = self.encode_with_reconstruction(x, state)
        return payload

    def decode(self, payload: torch.Tensor) -> torch.Tensor:
        """Decode a payload produced by ``encode``; shape and dtype come from its header."""
        shape, dtype, data = self.parse(payload)
        rows, cols = rows_cols(shape)
        return self._decode_rows(data, rows, cols, dtype).to(dtype).reshape(shape)

    def encode_with_reconstruction(
        self, x: torch.Tensor, state: Any = None, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode ``x``; also return the float32 matrix the receiver will decode.

        ``dtype`` is the dtype recorded in the header (default ``x.dtype``), the dtype
        ``decode`` returns. A lossy codec raises :class:`NonFiniteInput` when ``x`` holds inf
        or nan, or when the reconstruction would not be finite in ``dtype`` (finite values
        near the dtype's maximum can round up to a scale or level beyond it), so ``decode``
        never turns finite input into inf; inside :func:`deferred_checks` the outcome is
        recorded instead (no host read). A lossless codec (``raw``) sends any value as it is.
        """
        dtype = x.dtype if dtype is None else dtype
        payload, recon = self._encode_unchecked(x, state, dtype)
        if not self.lossless:
            check_fits(recon, dtype, self.name)
        return payload, recon

    def _encode_unchecked(
        self, x: torch.Tensor, state: Any, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode_with_reconstruction`` without the range check of the reconstruction (inf
        and nan in ``x`` are still refused): a residual may exceed ``dtype`` while the sum
        with its base does not, which is what ``encode_residual`` checks."""
        check_dtype(dtype)
        check_dtype(x.dtype)
        shape = tuple(x.shape)
        _check_shape(shape)
        rows, cols = rows_cols(shape)
        r = x.reshape(rows, cols).float()
        data, recon = self._encode_rows(r, dtype, state)
        payload = self._assemble(shape, dtype, data, rows, cols)
        return payload, recon

    # --- residual helpers (overridden by fused kernels) ---------------------------------------
    def encode_residual(
        self, x: torch.Tensor, base: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sender side of one step: encode ``x - base``; return ``(payload, new_base)``.

        ``new_base = (base.float() + decoded residual).to(base.dtype)``, computed with exactly
        the arithmetic ``decode_residual`` uses, so sender and receiver bases are bit-identical.
        Raises ``NonFiniteInput`` when the residual is not finite or the new base would not
        be (a sum beyond the dtype's range): the caller then sends ``x`` raw.
        """
        base_float = base.float()
        r = x.to(torch.float32, copy=True).sub_(base_float)  # in place: fewer fresh pages
        payload, recon = self._encode_unchecked(r.reshape(x.shape), state, x.dtype)
        total = base_float.reshape(recon.shape) + recon
        check_fits(total, base.dtype, self.name)
        return payload, total.to(base.dtype).reshape(base.shape)

    def decode_residual(
        self,
        payload: torch.Tensor,
        base: torch.Tensor,
        out: torch.Tensor | None = None,
        *,
        check_header: bool = True,
    ) -> torch.Tensor:
        """Receiver side of one step: ``out = base + decode(payload)`` (``out`` may be ``base``).

        With ``check_header=False`` the header is not read back (no device-to-host transfer):
        the payload must be one this codec encoded for a tensor of ``base``'s shape and dtype,
        which the caller knows from state both sides share (only the size is checked; see
        :func:`header_mismatch` for a device-side check of the header).
        """
        if check_header:
            shape, dtype, data = self.parse(payload)
            if tuple(base.shape) != tuple(shape) or base.dtype != dtype:
                raise PayloadError(
                    f"payload describes a {tuple(shape)} {dtype} tensor but the base is "
                    f"{tuple(base.shape)} {base.dtype}"
                )
        else:
            shape, dtype = tuple(base.shape), base.dtype
            data = self.payload_data(payload, shape, dtype)
        rows, cols = rows_cols(shape)
        return add_rounded(base, self._decode_rows(data, rows, cols, dtype), out)

    def decode_known(
        self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """``decode`` for a payload this codec encoded for ``shape``/``dtype``, without reading
        the header back (see ``decode_residual(check_header=False)``)."""
        rows, cols = rows_cols(shape)
        data = self.payload_data(payload, shape, dtype)
        return self._decode_rows(data, rows, cols, dtype).to(dtype).reshape(shape)

    def payload_data(
        self, payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """The data section of a payload this codec encoded for ``shape``/``dtype``, sliced
        without reading the header (its size is checked; a non-contiguous payload raises
        :class:`PayloadError` and a misaligned one is copied, see :func:`aligned_payload`)."""
        need = self.payload_nbytes(shape, dtype)
        payload = aligned_payload(payload)
        if payload.numel() != need:
            raise PayloadError(
                f"{self.name} payload for shape {tuple(shape)} {dtype} must be a 1-D uint8 "
                f"tensor of {need} bytes, got {payload.numel()}"
            )
        hdr = header_nbytes(len(shape))
        rows, cols = rows_cols(shape)
        return payload[hdr : hdr + self._data_nbytes(rows, cols, dtype)]

    def device_header(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        """This codec's header for ``shape``/``dtype`` on ``device`` (cached; do not modify)."""
        return device_header(self.codec_id, dtype, tuple(shape), self.header_params(), device)

    # --- header -------------------------------------------------------------------------------
    def _assemble(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        data: torch.Tensor,
        rows: int,
        cols: int,
    ) -> torch.Tensor:
        expected = self._data_nbytes(rows, cols, dtype)
        if data.dtype != torch.uint8 or data.numel() != expected:
            raise RuntimeError(
                f"codec {self.name} produced {data.numel()} bytes of {data.dtype}, "
                f"expected {expected} uint8"
            )
        hdr = header_nbytes(len(shape))
        total = hdr + align_up(expected)
        payload = torch.empty(total, dtype=torch.uint8, device=data.device)
        payload[:hdr] = self.device_header(shape, dtype, data.device)
        payload[hdr : hdr + expected] = data
        if total > hdr + expected:
            payload[hdr + expected :] = 0
        return payload

    def parse(self, payload: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype, torch.Tensor]:
        """Validate a payload for this codec; return ``(shape, dtype, data)``.

        A non-contiguous payload raises :class:`PayloadError`; a misaligned one is copied
        (see :func:`aligned_payload`)."""
        payload = aligned_payload(payload)
        codec_id, dtype, shape, params, hdr = decode_header(payload)
        if codec_id != self.codec_id:
            raise PayloadError(
                f"payload was encoded by codec id {codec_id}, not by {self.name} "
                f"(id {self.codec_id})"
            )
        if params != self.header_params():
            raise PayloadError(
                f"payload parameters {params} do not match this {self.name} codec's "
                f"{self.header_params()}"
            )
        rows, cols = rows_cols(shape)
        need = self._data_nbytes(rows, cols, dtype)
        if payload.numel() != hdr + align_up(need):
            raise PayloadError(
                f"{self.name} payload for shape {shape} {dtype} must be "
                f"{hdr + align_up(need)} bytes, got {payload.numel()} (truncated or padded)"
            )
        return shape, dtype, payload[hdr : hdr + need]


def add_rounded(
    base: torch.Tensor, recon: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``(base.float() + recon).to(base.dtype)``, written to ``out`` when given (``out`` may be
    ``base`` or a strided slice of a buffer).

    ``recon`` is the float32 ``rows x cols`` matrix of a codec; the sum is formed in float32 and
    rounded once to nearest even, exactly as the fused kernels do. (Every operand is converted
    explicitly: mixed-dtype elementwise ops are several times slower on CPU.)"""
    if out is not None and (out.dtype != base.dtype or out.numel() != base.numel()):
        raise ValueError(
            f"out must hold {base.numel()} elements of {base.dtype} (it becomes the base), got "
            f"{out.numel()} of {out.dtype}"
        )
    total = base.float().reshape(recon.shape) + recon
    if out is None:
        return total.to(base.dtype).reshape(base.shape)
    out.copy_(total.view(out.shape))
    return out


def rounding_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude that rounds to inf in ``dtype`` (max + half an ulp; inf for
    float32, whose values are the float32 sums themselves)."""
    if dtype == torch.float32:
        return math.inf
    fi = torch.finfo(dtype)
    return fi.max + 2.0 ** math.floor(math.log2(fi.max)) * fi.eps / 2


class DeferredChecks:
    """The device-side outcome of the checks made inside :func:`deferred_checks`."""

    def __init__(self) -> None:
        self._failed: torch.Tensor | None = None

    def add(self, failed: torch.Tensor) -> None:
        """OR a 0-d bool tensor (True: a check failed) into the outcome (no host read)."""
        self._failed = failed if self._failed is None else self._failed | failed

    def failed(self, device: torch.device | str) -> torch.Tensor:
        """0-d bool tensor on ``device``: whether any check failed (False if none ran)."""
        if self._failed is None:
            return torch.zeros((), dtype=torch.bool, device=device)
        return self._failed


_DEFERRED: contextvars.ContextVar[DeferredChecks | None] = contextvars.ContextVar(
    "compactfusion_deferred_checks", default=None
)


@contextlib.contextmanager
def deferred_checks() -> Iterator[DeferredChecks]:
    """Run codec calls whose finiteness checks record a device-side flag instead of raising.

    ``with deferred_checks() as checks: payload, base = codec.encode_residual(x, base)`` then
    ``checks.failed(device)`` tells (on the device, no synchronisation) whether the payload
    and new base are undefined because a value was not finite or out of range. Outside this
    context, :func:`check_finite` and :func:`check_fits` raise :class:`NonFiniteInput`."""
    checks = DeferredChecks()
    token = _DEFERRED.set(checks)
    try:
        yield checks
    finally:
        _DEFERRED.reset(token)


def require_finite(ok: torch.Tensor, message: str) -> None:
    """Raise :class:`NonFiniteInput` with ``message`` unless the 0-d bool tensor ``ok`` is
    True; inside :func:`deferred_checks`, record ``~ok`` instead (no host read)."""
    deferred = _DEFERRED.get()
    if deferred is not None:
        deferred.add(~ok)
    elif not bool(ok):
        raise NonFiniteInput(message)


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteInput` unless every element of ``t`` is finite (inside
    :func:`deferred_checks`: record the outcome instead). Codecs pass a reduction that
    propagates inf and nan (a max of magnitudes) when they have one: checking it costs
    nothing next to a pass over the residual."""
    require_finite(torch.isfinite(t).all(), f"{name} cannot encode non-finite values (inf or nan)")


def check_fits(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Raise :class:`NonFiniteInput` unless every value of the float32 tensor ``t`` stays
    finite when rounded to ``dtype`` (nan fails too); inside :func:`deferred_checks`, record
    the outcome instead. One reduction pass."""
    lo, hi = torch.aminmax(t)
    limit = rounding_limit(dtype)
    require_finite(
        (lo > -limit) & (hi < limit),
        f"{name}: the reconstruction is not finite in {str(dtype).replace('torch.', '')}",
    )


def encode_header(
    codec_id: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    params: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> torch.Tensor:
    """Serialize a header (see the module docstring) into a uint8 CPU tensor."""
    check_dtype(dtype)
    _check_shape(tuple(shape))
    for p in params:
        if not 0 <= p < 1 << 16:
            raise ValueError(f"header parameter {p} does not fit in uint16")
    raw = _FIXED.pack(
        MAGIC, FORMAT_VERSION, codec_id, DTYPE_CODES[dtype], len(shape), 0, 0, *params
    )
    raw += struct.pack(f"<{len(shape)}q", *shape)
    raw += b"\0" * (header_nbytes(len(shape)) - len(raw))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


MAX_HEADER_NBYTES = 16 + 8 * MAX_NDIM  # the largest header (MAX_NDIM dimensions)


@functools.lru_cache(maxsize=1024)
def _device_header(codec_id, dtype, shape, params, device) -> torch.Tensor:
    return encode_header(codec_id, dtype, shape, params).to(device)


def device_header(
    codec_id: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    params: tuple[int, int, int, int] = (0, 0, 0, 0),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """:func:`encode_header` built once per (codec, dtype, shape, params, device) and cached
    on ``device`` (immutable bytes shared by every caller: never modify the result)."""
    return _device_header(codec_id, dtype, tuple(shape), tuple(params), torch.device(device))


def aligned_payload(payload: torch.Tensor) -> torch.Tensor:
    """``payload`` laid out for decoding: a contiguous 1-D ``uint8`` tensor starting at a
    multiple of ``ALIGN`` (16) bytes, so that every data section can be viewed as bf16, fp16
    or fp32.

    Every decoder calls it first (no host read: it looks at the tensor's metadata only):

    * a payload that is not a 1-D ``uint8`` tensor, or not contiguous (``p[::2]``, a column
      of a byte matrix), raises :class:`PayloadError`: a payload is one buffer of bytes, and
      a strided view of one is almost always a slicing mistake (``p[::2]`` holds every other
      byte), so it is refused rather than silently copied; call ``.contiguous()`` first when
      the view's elements really are the payload's bytes in order;
    * a contiguous payload that starts at an address that is not a multiple of ``ALIGN``
      (e.g. a slice at an odd offset of a larger receive buffer) holds the right bytes in
      order: it is copied once into a fresh, aligned tensor, and decodes exactly as the
      original. The compressed collectives never pay for it: their payloads are rows of
      fresh receive buffers, and every payload size is a multiple of ``ALIGN``.
    """
    if not isinstance(payload, torch.Tensor):
        raise PayloadError(f"a payload must be a torch.uint8 tensor, got {type(payload).__name__}")
    if payload.dtype != torch.uint8 or payload.dim() != 1:
        raise PayloadError(
            f"a payload must be a 1-D torch.uint8 tensor, got {tuple(payload.shape)} "
            f"{payload.dtype}"
        )
    if payload.numel() > 1 and payload.stride(0) != 1:
        raise PayloadError(
            f"a payload must be a contiguous buffer, got a view with stride "
            f"{payload.stride(0)} (as p[::2] makes); pass the buffer the payload was received "
            "into, or .contiguous() if the view's elements are the payload's bytes in order"
        )
    if payload.data_ptr() % ALIGN:
        return payload.clone()
    return payload


def payload_flags(payload: torch.Tensor) -> torch.Tensor:
    """The status flags byte of a payload (a 0-d uint8 tensor on its device: no host read)."""
    return payload[FLAGS_OFFSET]


def header_mismatch(payload: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: whether ``payload``'s header differs from ``expected`` (a header from
    :func:`device_header`) anywhere but the status flags. Computed on the device, so a
    receiver that trusts a layout it shares with the sender can still detect a mismatch and
    report it with the next host read."""
    n = expected.numel()
    if payload.numel() < n:
        raise PayloadError(f"payload of {payload.numel()} bytes is shorter than its header")
    differs = payload[:n] != expected
    differs[FLAGS_OFFSET] = False
    return differs.any()


def decode_header(
    payload: torch.Tensor, host_copy: bytes | None = None
) -> tuple[int, torch.dtype, tuple[int, ...], tuple[int, int, int, int], int]:
    """Parse and validate a header: ``(codec_id, dtype, shape, params, header_nbytes)``.

    ``host_copy`` may hold the payload's first bytes (at least the header) already on the
    host, e.g. from one batched device-to-host copy of many payloads' headers: the payload
    itself is then not read, which avoids a device synchronisation per payload on CUDA.
    """
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.dim() != 1:
        raise PayloadError("a payload must be a 1-D torch.uint8 tensor")
    if payload.numel() < _FIXED.size:
        raise PayloadError(f"payload of {payload.numel()} bytes is shorter than a header")
    if host_copy is None:
        n = min(payload.numel(), MAX_HEADER_NBYTES)
        host_copy = bytes(payload[:n].cpu().tolist())
    magic, version, codec_id, dcode, ndim, flags, reserved, *params = _FIXED.unpack(
        host_copy[: _FIXED.size]
    )
    if magic != MAGIC:
        raise PayloadError(f"bad payload magic {magic!r} (expected {MAGIC!r}): not a payload")
    if version != FORMAT_VERSION:
        raise PayloadError(
            f"payload format version {version} is not supported (this build reads "
            f"{FORMAT_VERSION}); sender and receiver must run the same compactfusion"
        )
    if dcode not in CODE_DTYPES:
        raise PayloadError(f"payload names unknown dtype code {dcode}")
    if ndim > MAX_NDIM or reserved != 0 or flags & ~_KNOWN_FLAGS:
        raise PayloadError("payload header is corrupt (ndim, flags or reserved field)")
    hdr = header_nbytes(ndim)
    if payload.numel() < hdr or len(host_copy) < _FIXED.size + 8 * ndim:
        raise PayloadError("payload is truncated inside its header")
    shape = struct.unpack(f"<{ndim}q", host_copy[_FIXED.size : _FIXED.size + 8 * ndim])
    if any(s <= 0 for s in shape):
        raise PayloadError(f"payload header holds an invalid shape {shape}")
    return codec_id, CODE_DTYPES[dcode], tuple(shape), tuple(params), hdr
