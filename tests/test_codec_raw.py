"""The raw codec and the payload header shared by every codec."""

import pytest
import torch

from compactfusion.codecs import (
    PayloadError,
    available_codecs,
    decode_header,
    encode_header,
    get_codec,
    header_nbytes,
)

SHAPES = [(), (1,), (1, 1), (5, 123), (7, 96), (2, 3, 17), (2, 3, 4, 5)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_round_trip_is_bit_exact(shape, dtype):
    codec = get_codec("raw")
    x = (torch.randn(shape) * 1e3).to(dtype)
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == codec.payload_nbytes(shape, dtype)
    y = codec.decode(payload)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(y.reshape(-1).view(torch.uint8), x.reshape(-1).view(torch.uint8))


def test_raw_keeps_special_values_and_non_contiguous_input():
    codec = get_codec("raw")
    x = torch.tensor([[0.0, -0.0, float("inf")], [float("-inf"), 1e-45, 3.4e38]]).T
    y = codec.decode(codec.encode(x))
    assert torch.equal(y.view(torch.int32), x.contiguous().view(torch.int32))


def test_registry():
    assert set(available_codecs()) == {"raw", "fp8", "int2", "int1", "nm_sparse", "lowrank"}
    with pytest.raises(ValueError, match="unknown codec 'int3'"):
        get_codec("int3")
    with pytest.raises(ValueError, match="bad parameters"):
        get_codec("raw", rank=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_unsupported_dtypes(dtype):
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        get_codec("raw").encode(torch.zeros(4, 4, dtype=dtype))


def test_empty_and_too_many_dims():
    with pytest.raises(ValueError, match="empty"):
        get_codec("raw").encode(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="more than 8"):
        get_codec("raw").payload_nbytes((1,) * 9, torch.float32)


def test_header_layout():
    hdr = encode_header(2, torch.bfloat16, (4096, 3072), (256, 0, 0, 0))
    assert hdr.numel() == header_nbytes(2) == 32
    assert bytes(hdr[:2].tolist()) == b"CF"
    codec_id, dtype, shape, params, size = decode_header(hdr)
    assert (codec_id, dtype, shape, params, size) == (2, torch.bfloat16, (4096, 3072),
                                                      (256, 0, 0, 0), 32)  # fmt: skip


def _corrupt(payload, index, value):
    bad = payload.clone()
    bad[index] = value
    return bad


def test_corrupt_truncated_and_mismatched_payloads():
    raw = get_codec("raw")
    p = raw.encode(torch.randn(5, 7))
    with pytest.raises(PayloadError, match="magic"):
        raw.decode(_corrupt(p, 0, ord("X")))
    with pytest.raises(PayloadError, match="version"):
        raw.decode(_corrupt(p, 2, 99))
    with pytest.raises(PayloadError, match="codec id"):
        raw.decode(_corrupt(p, 3, 2))
    with pytest.raises(PayloadError, match="dtype code"):
        raw.decode(_corrupt(p, 4, 9))
    with pytest.raises(PayloadError, match="truncated or padded"):
        raw.decode(p[:-16])
    with pytest.raises(PayloadError, match="shorter than a header"):
        raw.decode(p[:5])
    with pytest.raises(PayloadError, match="invalid shape"):
        raw.decode(_set_dim(p, 0))
    with pytest.raises(PayloadError, match="1-D torch.uint8"):
        raw.decode(p.view(torch.int8))
    # A payload of another shape than the receiver's base is refused.
    with pytest.raises(PayloadError, match="but the base is"):
        raw.decode_residual(p, torch.zeros(7, 5))


def _set_dim(payload, value):
    bad = payload.clone()
    bad[16:24] = torch.tensor(list(int(value).to_bytes(8, "little", signed=True)),
                              dtype=torch.uint8)  # fmt: skip
    return bad
