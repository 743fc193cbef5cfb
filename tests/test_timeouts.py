"""``CompactConfig(timeout_s=...)`` in one process: validation, and the bounded waits'
behaviour with stand-in work handles (the real 2-rank check, a peer that raises and stays alive,
is in tests/test_multirank_guards.py)."""

import math
import time

import pytest
import torch

import compactfusion
from compactfusion import CollectiveTimeout, CompactConfig
from compactfusion.timeouts import wait_device, wait_until, wait_work


class FakeWork:
    """A work handle whose ``wait(timeout)`` sleeps, then raises or returns what it is told."""

    def __init__(self, outcome):
        self.outcome, self.timeouts = outcome, []

    def wait(self, timeout=None):
        self.timeouts.append(timeout)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def test_timeout_config():
    assert CompactConfig().timeout_s is None
    assert CompactConfig(timeout_s=2).timeout_s == 2.0
    for bad in (0, -1, math.nan, math.inf, True, "5"):
        with pytest.raises(ValueError, match="timeout_s"):
            CompactConfig(timeout_s=bad)
    # Each rank bounds its own waits: the cross-rank fingerprint ignores it.
    assert CompactConfig(timeout_s=5).fingerprint() == CompactConfig().fingerprint()
    assert issubclass(compactfusion.CollectiveTimeout, TimeoutError)


def test_wait_work_turns_torch_timeouts_into_collective_timeout():
    work = FakeWork(RuntimeError("Operation timed out!"))  # gloo's message
    with pytest.raises(CollectiveTimeout, match="the all-gather of 'kv' did not complete") as e:
        wait_work(work, "all-gather of 'kv'", 1.5)
    assert e.value.site == "all-gather of 'kv'" and e.value.timeout_s == 1.5
    assert work.timeouts[0].total_seconds() == 1.5
    with pytest.raises(CollectiveTimeout):
        wait_work(FakeWork(False), "x", 1.0)  # a backend that reports it by returning False
    # Other failures (a peer that died) keep torch's own error; no bound: a plain wait().
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        wait_work(FakeWork(RuntimeError("Connection closed by peer")), "x", 1.0)
    plain = FakeWork(True)
    wait_work(plain, "x", None)
    assert plain.timeouts == [None]


def test_wait_until_and_wait_device():
    start = time.monotonic()
    with pytest.raises(CollectiveTimeout, match="end_step"):
        wait_until(lambda: False, "step's compressed exchanges (end_step)", 0.2)
    assert 0.2 <= time.monotonic() - start < 5.0
    wait_until(lambda: True, "x", 0.2)
    wait_device(torch.device("cpu"), "x", 0.01)  # nothing queued on the CPU: returns
