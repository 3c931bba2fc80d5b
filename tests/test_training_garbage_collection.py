"""training/garbage_collection: what --manual-gc turns off and when it collects; the
collections it counts for the logs."""
import gc

import pytest

from megatron_patch.training.garbage_collection import GarbageCollection


def make_cycles(count: int) -> None:
    for _ in range(count):
        node = {}
        node["self"] = node


@pytest.fixture(autouse=True)
def restore_collector():
    enabled = gc.isenabled()
    yield
    (gc.enable if enabled else gc.disable)()


def test_manual_collects_only_when_asked_and_restores_the_collector():
    with GarbageCollection(manual=True, interval=3) as collection:
        assert not gc.isenabled()
        assert collection.take() == (0.0, 0)  # the collection on entry is setup's, not counted
        make_cycles(100_000)  # would start dozens of automatic collections
        for iteration in range(1, 8):
            collection.after_step(iteration)
        seconds, count = collection.take()
        assert count == 2 and seconds > 0  # after iterations 3 and 6
        collection.before_eval()
        collection.after_eval()
        assert collection.take()[1] == 2
    assert gc.isenabled()
    assert collection._observe not in gc.callbacks


def test_no_collections_around_evaluation_with_no_manual_gc_eval():
    with GarbageCollection(manual=True, interval=0, around_eval=False) as collection:
        collection.before_eval()
        collection.after_eval()
        for iteration in range(1, 100):
            collection.after_step(iteration)
        assert collection.take()[1] == 0


def test_automatic_collections_are_counted_and_left_alone():
    with GarbageCollection() as collection:
        assert gc.isenabled()
        make_cycles(100_000)
        collection.after_step(3)
        collection.before_eval()
        seconds, count = collection.take()
        assert count > 10 and seconds > 0  # the collector's own passes
        assert collection.take() == (0.0, 0)  # counted once
    assert gc.isenabled()
