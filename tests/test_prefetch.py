"""data.prefetch.prefetched: the source's items in its order, made ahead in one background thread that stops
and closes the source when the caller stops early, and whose errors reach the caller."""

import gc
import threading
import time

import pytest

from stal_ray.data.stream.prefetch import prefetched


def prefetch_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "prefetch"]


class Source:
    """A generator of 0..n-1 that records how far it got and whether it was closed, and in which thread."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at, self.made, self.closed_in = n, fail_at, 0, None

    def __iter__(self):
        try:
            for index in range(self.n):
                if index == self.fail_at:
                    raise ValueError(f"item {index}")
                self.made += 1
                yield index
        finally:
            self.closed_in = threading.current_thread().name


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_same_items_in_the_same_order(depth):
    assert list(prefetched(Source(50), depth)) == list(range(50))
    assert not prefetch_threads()


def test_the_next_item_is_made_while_the_caller_holds_this_one():
    source = Source(5)
    items = prefetched(source, depth=1)
    assert next(items) == 0
    deadline = time.monotonic() + 5
    while source.made < 3 and time.monotonic() < deadline:  # item 1 in the queue, item 2 made and waiting
        time.sleep(0.01)
    assert source.made == 3
    assert list(items) == [1, 2, 3, 4]


def test_an_error_of_the_source_is_raised_in_the_caller_after_the_items_before_it():
    got = []
    with pytest.raises(ValueError, match="item 3"):
        for item in prefetched(Source(10, fail_at=3)):
            got.append(item)
    assert got == [0, 1, 2] and not prefetch_threads()


def test_a_caller_that_breaks_stops_the_thread_and_the_source_is_closed_in_it():
    source = Source(1000)
    for item in prefetched(source, depth=2):
        if item == 4:
            break
    gc.collect()
    assert not prefetch_threads()
    assert source.closed_in == "prefetch" and source.made < 10


def test_a_dropped_iterator_stops_its_thread():
    source = Source(1000)
    items = prefetched(source)
    next(items)
    assert prefetch_threads()
    del items
    gc.collect()
    assert not prefetch_threads() and source.closed_in == "prefetch"


def test_a_source_stuck_in_its_next_item_does_not_hang_the_caller(monkeypatch):
    """A streaming_split shard can wait for a block its stopped siblings never let come: the caller waits
    _JOIN_S at most, warns, and the daemon thread ends when the item comes."""
    from stal_ray.data.stream import prefetch

    monkeypatch.setattr(prefetch, "_JOIN_S", 0.2)
    release = threading.Event()

    def stuck():
        yield 0
        release.wait(10)  # the next item takes "forever"
        yield 1

    items = prefetched(stuck())
    assert next(items) == 0
    time.sleep(0.05)  # the thread is now inside the source's next()
    with pytest.warns(RuntimeWarning, match="did not stop"):
        items.close()
    release.set()
    deadline = time.monotonic() + 5
    while prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not prefetch_threads()
