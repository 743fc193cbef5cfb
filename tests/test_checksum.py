"""``CompactConfig(checksum=True)``: a 16-byte checksum trailer on every payload, verified by the
receiver on the device (in one process: a sender and a receiver compressor; the same checks
over real gloo collectives are in tests/test_multirank_guards.py)."""

import pytest
import torch

from compactfusion import CompactConfig, PayloadError, ResidualCompressor
from compactfusion.checksum import CHECKSUM_NBYTES, payload_checksum, with_checksum
from compactfusion.codecs.base import FLAGS_OFFSET, header_nbytes
from compactfusion.testing.host_reads import HostReadCounter

KEY, GROUP = ("kv", 0), "kv"
SHAPE = (16, 64)
STEPS = 4  # the first is the raw warm-up


def activation(step):
    g = torch.Generator().manual_seed(step)
    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    return (base + 0.05 * step * torch.randn(SHAPE, generator=g)).to(torch.bfloat16)


def pair(checksum, codec="int2"):
    cfg = CompactConfig(codec=codec, min_numel=0, checksum=checksum)
    return ResidualCompressor(cfg), ResidualCompressor(cfg)


def exchange(sender, receiver, x, flip=None):
    """One exchange of ``x`` through ``send``/``receive``; ``flip`` = (byte index, bit mask)
    corrupts the payload in transit. Returns (payload size, output); both run ``end_step``
    (the receiver's may raise)."""
    compressed = sender.exchange_compressed(GROUP, [KEY], SHAPE, x.dtype)
    assert compressed == receiver.exchange_compressed(GROUP, [KEY], SHAPE, x.dtype)
    (payload,) = sender.send(GROUP, [(KEY, x)], compressed)
    assert payload.numel() == sender.exchange_nbytes(SHAPE, x.dtype, compressed)
    wire = payload.clone()
    if flip is not None:
        wire[flip[0]] ^= flip[1]
    out = torch.empty_like(x)
    receiver.receive(GROUP, KEY, wire, out, compressed)
    sender.end_step()
    receiver.end_step()
    return payload.numel(), out


def test_checksum_changes_with_every_single_byte_and_swapped_words():
    payload = torch.randint(0, 256, (512,), dtype=torch.uint8, generator=torch.Generator())
    reference = payload_checksum(payload)
    assert reference.dtype == torch.uint8 and reference.numel() == CHECKSUM_NBYTES
    for i in range(payload.numel()):
        for mask in (1, 128):
            bad = payload.clone()
            bad[i] ^= mask
            assert not torch.equal(payload_checksum(bad), reference), (i, mask)
    words = payload.view(torch.int32).clone()
    words[[3, 70]] = words[[70, 3]]  # same sum, different order
    assert not torch.equal(payload_checksum(words.view(torch.uint8)), reference)
    # Larger than one period of the position weights (32749 words), with a tail.
    big = torch.randint(0, 256, (4 * 40000,), dtype=torch.uint8)
    bad = big.clone()
    bad[-3] ^= 4
    assert not torch.equal(payload_checksum(big), payload_checksum(bad))
    # A misaligned view is checksummed like an aligned copy of it.
    assert torch.equal(payload_checksum(big[1:9]), payload_checksum(big[1:9].clone()))
    assert torch.equal(with_checksum(payload)[-CHECKSUM_NBYTES:], reference)


def test_bases_bit_identical_and_outputs_unchanged_with_checksum():
    on_s, on_r = pair(True)
    off_s, off_r = pair(False)
    for step in range(STEPS):
        x = activation(step)
        n_on, out_on = exchange(on_s, on_r, x)
        n_off, out_off = exchange(off_s, off_r, x)
        assert n_on == n_off + CHECKSUM_NBYTES
        assert torch.equal(out_on, out_off)  # the checksum does not touch the numerics
        assert torch.equal(on_s.base(KEY), on_r.base(KEY))  # sender and receiver agree
        assert torch.equal(on_r.base(KEY), off_r.base(KEY))
    # The trailer is counted as payload bytes.
    assert on_s.stats()["payload_bytes"] == off_s.stats()["payload_bytes"] + STEPS * 16


@pytest.mark.parametrize("compressed_step", [False, True])
def test_a_corrupt_byte_raises_on_the_receiver(compressed_step):
    """Flipped bits in the header, the flags byte, the data and the trailer: the receiver's
    end_step raises PayloadError; the sender's does not."""
    x0, x1 = activation(0), activation(1)
    nbytes = exchange(*pair(True), x0)[0]  # raw warm-up size
    if compressed_step:
        s, r = pair(True)
        exchange(s, r, x0)
        nbytes = s.exchange_nbytes(SHAPE, x1.dtype, True)
    hdr = header_nbytes(len(SHAPE))
    for index, mask in [(1, 2), (FLAGS_OFFSET, 64), (hdr, 1), (hdr + 37, 128), (nbytes - 1, 8)]:
        s, r = pair(True)
        if compressed_step:
            exchange(s, r, x0)
        x = x1 if compressed_step else x0
        with pytest.raises(PayloadError, match="checksum"):
            exchange(s, r, x, flip=(index, mask))
        assert s.end_step() is True  # the sender saw nothing wrong


def test_without_checksum_a_corrupt_data_byte_decodes_silently():
    """checksum=False: behaviour unchanged (no trailer, the corruption goes unnoticed)."""
    s, r = pair(False)
    exchange(s, r, activation(0))
    hdr = header_nbytes(len(SHAPE))
    _, out = exchange(s, r, activation(1), flip=(hdr + 37, 128))
    assert out.shape == SHAPE  # no error: nothing detects it


def test_receive_with_checksum_reads_nothing_back():
    s, r = pair(True)
    exchange(s, r, activation(0))
    x = activation(1)
    compressed = s.exchange_compressed(GROUP, [KEY], SHAPE, x.dtype)
    with HostReadCounter() as reads:
        (payload,) = s.send(GROUP, [(KEY, x)], compressed)
        r.receive(GROUP, KEY, payload, torch.empty_like(x), compressed)
    assert reads.count() == 0
    with HostReadCounter() as reads:
        r.end_step()
    assert reads.count() == 1  # the step's one flag read carries the verdict


def test_encode_decode_carry_and_verify_the_trailer():
    cfg = CompactConfig(codec="int2", min_numel=0, checksum=True)
    s, r = ResidualCompressor(cfg), ResidualCompressor(cfg)
    plain = ResidualCompressor(cfg.replace(checksum=False))
    for step in range(3):
        x = activation(step)
        payload = s.encode(KEY, x)
        assert payload.numel() == plain.encode(KEY, x).numel() + CHECKSUM_NBYTES
        assert torch.equal(r.decode(KEY, payload), s.base(KEY))
    payload = s.encode(KEY, activation(3))
    payload[40] ^= 1
    with pytest.raises(PayloadError, match="checksum"):
        r.decode(KEY, payload)
    with pytest.raises(PayloadError, match="more than 16 bytes"):
        r.decode(KEY, torch.zeros(8, dtype=torch.uint8))


def test_checksum_config():
    with pytest.raises(ValueError, match="checksum"):
        CompactConfig(codec="raw", checksum=True)
    with pytest.raises(ValueError, match="checksum"):
        CompactConfig(checksum="yes")
    assert CompactConfig().checksum is False
    assert CompactConfig(checksum=True).fingerprint() != CompactConfig().fingerprint()
