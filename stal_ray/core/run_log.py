"""The driver's log kept in the run folder as log.txt (as fast-reid and torchreid keep theirs): everything the
job prints, its Ray workers' lines included, copied to `<run folder>/log.txt` on local disk or S3 every
UPLOAD_EVERY_S seconds and when the job ends, so a run under `ray job submit` leaves its log with its
checkpoints. A run resumed under the same name appends to its log."""

import contextlib
import io
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

from stal_ray.core import storage

LOG_FILE = "log.txt"
UPLOAD_EVERY_S = 60.0


class _Tee(io.TextIOBase):
    """A text stream writing to `stream` and to `copy` (both flushed together)."""

    def __init__(self, stream, copy, lock: threading.Lock):
        self.stream, self.copy, self.lock = stream, copy, lock

    def write(self, text: str) -> int:
        self.stream.write(text)
        with self.lock:
            self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        with self.lock:
            self.copy.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def run_log(run_dir: str, *, endpoint_url: str | None = None,
            every_s: float = UPLOAD_EVERY_S) -> Iterator[str]:
    """Tee stdout and stderr into `<run_dir>/log.txt` while the block runs; yields that URI. The copy is
    written only once the run folder exists (a job refused before it writes anything leaves nothing), and
    the local file beside it is removed at the end."""
    target = storage.join(run_dir, LOG_FILE)
    fs, path = storage.filesystem(target, endpoint_url=endpoint_url, check=False)
    folder = storage.filesystem(run_dir, endpoint_url=endpoint_url, check=False)[1]
    handle, local = tempfile.mkstemp(prefix="stal-log-", suffix=".txt")
    lock, stop = threading.Lock(), threading.Event()
    with os.fdopen(handle, "w", encoding="utf-8") as copy:
        with contextlib.suppress(FileNotFoundError):
            copy.write(fs.cat_file(path).decode("utf-8", "replace"))  # a resumed run appends
        sent = [copy.tell()]

        def upload() -> None:
            with lock:
                copy.flush()
                size = copy.tell()
            if size == sent[0] or not fs.exists(folder):
                return
            with open(local, "rb") as source:
                fs.pipe_file(path, source.read())
            sent[0] = size

        def keep_uploading() -> None:
            while not stop.wait(every_s):
                with contextlib.suppress(Exception):  # a passing S3 error: the next round or the end retries
                    upload()

        thread = threading.Thread(target=keep_uploading, name="run-log", daemon=True)
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(stdout, copy, lock), _Tee(stderr, copy, lock)
        thread.start()
        try:
            yield target
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = stdout, stderr
            stop.set()
            thread.join()
            try:
                upload()
            except Exception as error:  # the job's own outcome matters more than its log's copy
                print(f"warning: could not write {target}: {error}", file=sys.stderr)
            finally:
                os.remove(local)
