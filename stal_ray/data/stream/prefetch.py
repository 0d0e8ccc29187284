"""An iterator's next items made in a background thread while the caller uses the current one.

data.decode_at = consumer decodes each training batch in the training worker (data.consumer): without this,
the worker decodes batch n+1 only after its step on batch n, and the step waits for it. With it, a thread
assembles and decodes batch n+1 (its pool's threads release the GIL in libjpeg-turbo) while the step on
batch n runs, as the stream's Ray Data tasks decode ahead of the consumer.

The items are the source's, in the source's order: one thread runs the source, so nothing about what it
yields changes. A source that raises raises in the caller. When the caller stops early (breaks out, or drops
the iterator), the thread stops after the item it is making, closes the source in its own thread (a Ray
Data iterator shuts down its execution) and is joined; for at most _JOIN_S seconds, so that a source whose
next item never comes (a streaming_split shard whose siblings stopped pulling) cannot hang the caller: the
daemon thread then ends whenever that item comes, or with the process.
"""

import queue
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_POLL_S = 0.05  # how often a thread waiting for room in the queue looks whether the caller has stopped
_JOIN_S = 30.0  # how long a caller that stops waits for the thread to finish the item it is making


class _End:
    """The source is exhausted (error None) or raised `error`."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def prefetched(source: Iterable[T], depth: int = 1) -> Iterator[T]:
    """source's items, up to `depth` of them made ahead in a background thread (depth 0: in the caller's
    thread, nothing ahead)."""
    if depth < 1:
        yield from source
        return
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    thread = threading.Thread(target=_fill, args=(iter(source), items, stop), name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item
            del item  # not kept alive here while the caller uses it and the next is waited for
    finally:
        stop.set()
        thread.join(_JOIN_S)
        if thread.is_alive():
            warnings.warn(f"the prefetch thread did not stop within {_JOIN_S:g} s (its source is still "
                          "making an item); left to end on its own", RuntimeWarning, stacklevel=2)


def _fill(iterator: Iterator, items: queue.Queue, stop: threading.Event) -> None:
    """The thread: the source's items into `items` until it ends, raises, or the caller stops."""
    try:
        for item in iterator:
            if not _offer(items, item, stop):
                return
            del item  # a batch's buffer is free for reuse once the caller has dropped it
        _offer(items, _End(), stop)
    except BaseException as error:  # noqa: BLE001 - handed to the caller, which raises it
        _offer(items, _End(error), stop)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _offer(items: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` once there is room; False, item dropped, when the caller has stopped first."""
    while not stop.is_set():
        try:
            items.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False
