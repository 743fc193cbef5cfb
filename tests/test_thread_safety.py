"""One ``ResidualCompressor`` (one patched pipeline) used from two threads raises
``ConcurrentUseError`` instead of letting sender and receiver bases diverge silently; handing it
over between threads (``release``, or one generation after another) works."""

import threading

import pytest
import torch

from compactfusion import CompactConfig, ConcurrentUseError, ResidualCompressor
from compactfusion.integrations.generation import generation_of
from compactfusion.integrations.state import PipelineState

KEY = ("kv", 0)


def x_at(step):
    return (torch.ones(8, 64) + 0.1 * step).to(torch.bfloat16)


def in_thread(fn):
    """Run ``fn()`` in a new thread; return its result or the exception it raised."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except Exception as exc:  # handed back to the test
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    return box.get("error", box.get("result"))


def test_second_thread_raises_and_changes_nothing():
    comp = ResidualCompressor(CompactConfig(min_numel=0))
    comp.encode(KEY, x_at(0))  # the main thread holds it now
    base, calls = comp.base(KEY).clone(), comp.stats()["calls"]
    for call in (
        lambda: comp.encode(KEY, x_at(1)),
        lambda: comp.decode(("kv", 1), comp.codec.encode(x_at(1))),
        lambda: comp.send("g", [(KEY, x_at(1))], False),
        lambda: comp.end_step(),
        lambda: comp.reset(),
        lambda: comp.release(),
    ):
        err = in_thread(call)
        assert isinstance(err, ConcurrentUseError), err
        assert "held by thread 'MainThread'" in str(err)
    assert torch.equal(comp.base(KEY), base) and comp.stats()["calls"] == calls
    comp.encode(KEY, x_at(1))  # the holder carries on


def test_release_hands_the_compressor_over():
    comp = ResidualCompressor(CompactConfig(min_numel=0))
    comp.encode(KEY, x_at(0))
    comp.release()
    assert isinstance(in_thread(lambda: comp.encode(KEY, x_at(1))), torch.Tensor)
    # That thread has exited: its hold ended with it.
    comp.encode(KEY, x_at(2))
    comp.release()
    # A live thread that holds it and never releases it: the main thread is refused.
    holding, leave = threading.Event(), threading.Event()

    def hold():
        comp.encode(KEY, x_at(3))
        holding.set()
        leave.wait(timeout=60)

    t = threading.Thread(target=hold, name="holder")
    t.start()
    assert holding.wait(timeout=60)
    with pytest.raises(ConcurrentUseError, match="'holder'"):
        comp.encode(KEY, x_at(4))
    with pytest.raises(ConcurrentUseError):
        comp.release()
    leave.set()
    t.join(timeout=60)
    comp.encode(KEY, x_at(4))


def test_concurrent_encoders_are_detected():
    """Two threads encoding the same site at once: without the check both would advance the
    one base in an order no receiver can reproduce."""
    comp = ResidualCompressor(CompactConfig(min_numel=0))
    start, finish = threading.Barrier(2), threading.Barrier(2)  # both alive throughout
    errors, done = [], []

    def worker(offset):
        start.wait()
        try:
            for step in range(50):
                comp.encode(KEY, x_at(step + offset))
            done.append(offset)
        except ConcurrentUseError as exc:
            errors.append(exc)
        finally:
            finish.wait()

    threads = [threading.Thread(target=worker, args=(o,)) for o in (0, 100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(errors) == 1 and len(done) == 1


def test_held_block_releases_at_its_end():
    comp = ResidualCompressor(CompactConfig(min_numel=0))
    with comp.held():
        comp.encode(KEY, x_at(0))
        with comp.held():  # nested: still held after the inner block
            pass
        assert isinstance(in_thread(lambda: comp.encode(KEY, x_at(1))), ConcurrentUseError)
    assert isinstance(in_thread(lambda: comp.encode(KEY, x_at(1))), torch.Tensor)


def test_generations_of_one_pipeline_from_two_threads():
    """A generation holds the pipeline's compressor: a second generation started from another
    thread meanwhile raises before it resets anything; afterwards any thread may run one."""
    cfg = CompactConfig(min_numel=0)
    state = PipelineState(config=cfg)
    state.checked = True  # no process group here: skip the cross-rank check
    inside, leave = threading.Event(), threading.Event()

    def first():
        with generation_of(state):
            state.compressor.encode(KEY, x_at(0))
            inside.set()
            leave.wait(timeout=60)
            state.compressor.encode(KEY, x_at(1))
        return state.compressor.base(KEY).clone()

    box = {}
    t = threading.Thread(target=lambda: box.setdefault("base", first()))
    t.start()
    assert inside.wait(timeout=60)
    with pytest.raises(ConcurrentUseError):
        with generation_of(state):
            pass
    leave.set()
    t.join(timeout=60)
    # The first generation was not disturbed: its last encode saw its own base.
    assert state.compressor.stats()["sites"][repr(KEY)]["raw_sends"] == 1
    assert torch.equal(box["base"], state.compressor.base(KEY))
    with generation_of(state):  # the next generation, in another thread: fine
        state.compressor.encode(KEY, x_at(2))
    assert state.generations == 2


@pytest.mark.slow  # importing dynamo takes seconds
def test_the_check_does_not_break_a_compiled_graph():
    import torch._dynamo

    comp = ResidualCompressor(CompactConfig(min_numel=0))
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x + comp._claim(), fullgraph=True, backend="eager")
    assert torch.equal(fn(torch.zeros(3)), torch.zeros(3))  # traced: the check is skipped
    assert comp._owner is None
