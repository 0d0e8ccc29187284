"""Publishing a prepared data set atomically: one folder per version, a pointer swapped last, a writer lock.

Layout under <out> (local folder or s3://bucket/prefix):

    current.json                   the pointer: {"format": 1, "version": ID, "previous": ID or null, ...}
    versions/<ID>/manifest.json    a version: its manifest and shards (stal_ray/data/prepared/manifest.py),
    never versions/<ID>/train/, test/    changed once written
    .prepare.lock                  held by the prepare writing here, if any
    validation/                    validation splits (stal_ray/data/prepared/validation.py), keyed by
    fingerprint

A prepare writes a new version under versions/<ID>/ (IDs sort by creation time), then replaces current.json
in one step (one PUT on S3, a rename on local disk), then removes the versions it no longer keeps. Readers
resolve current.json once, so they see the old data set or the new one, whole, whatever moment a prepare is
killed at. The version before the current one is kept by default (so a job that resolved it before the
swap reads on) and removed by the next prepare; older ones and the leftovers of killed prepares go at once.

A data set written before versions existed (manifest.json, train/, test/ at <out> itself, no current.json)
is read as it is; a prepare over it keeps it as the previous version (LEGACY) and removes it later.

The lock is an object created only if absent (O_EXCL locally, a conditional PUT on S3) that its holder
rewrites every HEARTBEAT_S seconds; one whose holder died (a dead pid on this host, or no heartbeat for
STALE_S seconds) is taken over. A second prepare into the same folder fails at once with PrepareLockedError.
"""

import contextlib
import json
import logging
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

from fsspec.implementations.local import LocalFileSystem

from stal_ray.core import storage
from stal_ray.core.storage import StorageError

logger = logging.getLogger(__name__)

POINTER = "current.json"
VERSIONS = "versions"
LOCK = ".prepare.lock"
LEGACY = "legacy-root"  # a data set written before versions: manifest.json and shards at the root
POINTER_FORMAT = 1
HEARTBEAT_S = 30.0
STALE_S = 300.0
_WAIT_POLL_S = 1.0

_MANIFEST = "manifest.json"
_SPLITS = ("train", "test")
_PART = re.compile(r"part-\d{5}\.parquet")
_VERSION = re.compile(r"v-\d{8}T\d{12}Z-[0-9a-f]{8}")


class PrepareLockedError(StorageError):
    """Another prepare holds the lock of the output folder."""


def new_version() -> str:
    """A version ID that sorts by creation time: v-<UTC time to the microsecond>-<random>."""
    return f"v-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"


def version_root(root: str, version: str) -> str:
    """Where the version's manifest and shards live, as a path of the data set's filesystem."""
    return root if version == LEGACY else posixpath.join(root, VERSIONS, version)


def version_parts(version: str) -> tuple[str, ...]:
    """The version folder relative to the data set root, as path components."""
    return () if version == LEGACY else (VERSIONS, version)


def read_pointer(fs, root: str) -> dict | None:
    """The pointer's contents, None when the data set has none (never published this way). ValueError when
    it is unreadable or names no valid version."""
    try:
        raw = fs.cat_file(posixpath.join(root, POINTER))
    except FileNotFoundError:
        return None
    try:
        pointer = json.loads(raw)
        version = pointer["version"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{POINTER} is unreadable ({error!r})") from None
    if pointer.get("format") != POINTER_FORMAT or not isinstance(version, str) or not (
            version == LEGACY or _VERSION.fullmatch(version)):
        raise ValueError(f"{POINTER} names no version this code reads ({raw[:200]!r})")
    return pointer


def current_version(fs, root: str) -> tuple[str | None, str | None]:
    """(current, previous) version IDs: from the pointer, else LEGACY when a manifest sits at the root."""
    pointer = read_pointer(fs, root)
    if pointer is not None:
        return pointer["version"], pointer.get("previous")
    return (LEGACY if fs.exists(posixpath.join(root, _MANIFEST)) else None), None


def swap_pointer(fs, root: str, version: str, previous: str | None) -> None:
    """Make `version` the current one, in one step: the moment readers switch over."""
    body = json.dumps({"format": POINTER_FORMAT, "version": version, "previous": previous,
                       "published": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                      indent=2) + "\n"
    path = posixpath.join(root, POINTER)
    storage.put_atomic(fs, path, body.encode(), fsync=True)  # a reader opens the old pointer or the new


def remove_unreferenced(fs, root: str, keep: set[str | None]) -> None:
    """Remove every version not in `keep`, and leftovers of killed prepares; a version's manifest goes first,
    so a version half removed never looks complete. Only names this module writes are touched."""
    folder = posixpath.join(root, VERSIONS)
    if fs.exists(folder):
        for path in sorted(fs.ls(folder, detail=False)):
            name = posixpath.basename(path.rstrip("/"))
            if _VERSION.fullmatch(name) and name not in keep:
                logger.info("removing version %s (neither current nor kept as previous)", name)
                with contextlib.suppress(FileNotFoundError):
                    fs.rm(posixpath.join(path, _MANIFEST))
                fs.rm(path, recursive=True)
    if LEGACY not in keep:
        _remove_legacy(fs, root)
    if fs.exists(root):
        for path in fs.ls(root, detail=False):
            if posixpath.basename(path.rstrip("/")).startswith(".tmp-"):
                logger.info("removing %s, left by an interrupted run", path)
                fs.rm(path, recursive=True)


def _remove_legacy(fs, root: str) -> None:
    manifest = posixpath.join(root, _MANIFEST)
    if fs.exists(manifest):
        logger.info("removing the data set at %s written before versions", root)
        fs.rm(manifest)
    for split in _SPLITS:
        folder = posixpath.join(root, split)
        if fs.exists(folder):
            for path in fs.ls(folder, detail=False):
                if _PART.fullmatch(posixpath.basename(path)):  # only ours: never a user's other files
                    fs.rm(path)


# ---------------------------------------------------------------------------------------------- the lock


@contextlib.contextmanager
def prepare_lock(fs, root: str, uri: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the output folder's lock while the body runs; PrepareLockedError when another prepare holds it
    for more than wait_s seconds."""
    path = posixpath.join(root, LOCK)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
             "started": time.time()}
    _acquire(fs, path, owner, uri, time.monotonic() + wait_s)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fs, path, owner, stop), daemon=True,
                            name="prepare-lock-heartbeat")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        with contextlib.suppress(Exception):  # releasing: an error here must not hide the body's
            if (_read_lock(fs, path) or {}).get("token") == owner["token"]:
                fs.rm(path)


def _acquire(fs, path: str, owner: dict, uri: str, deadline: float) -> None:
    takeovers = 0
    while takeovers < 3:
        if _create(fs, path, _lock_body(owner)):
            return
        holder = _read_lock(fs, path)
        if holder is None:
            continue  # released between our attempt and the read
        reason = _stale(holder)
        if reason is None and time.monotonic() < deadline:
            time.sleep(_WAIT_POLL_S)
            continue
        if reason is None:
            started = datetime.fromtimestamp(float(holder.get("started", 0)), timezone.utc)
            raise PrepareLockedError(
                f"{uri}: another prepare is writing here (host {holder.get('host')}, "
                f"pid {holder.get('pid')}, since {started:%Y-%m-%d %H:%M:%S} UTC); wait for it to finish, "
                f"or if it is dead and this one is wrong, delete {posixpath.join(uri, LOCK)}")
        logger.warning("taking over the lock %s of a prepare that %s", path, reason)
        takeovers += 1
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
    raise PrepareLockedError(f"{uri}: could not take the prepare lock {posixpath.join(uri, LOCK)}; "
                             "another prepare keeps taking it: wait for it, then re-run")


def _lock_body(owner: dict) -> bytes:
    return json.dumps({**owner, "heartbeat": time.time()}).encode()


def _create(fs, path: str, body: bytes) -> bool:
    """Write the lock object if none exists, in one step; False when one does."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
        return True
    bucket, key = path.split("/", 1)
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except FileExistsError:  # s3fs's translation of 412 PreconditionFailed
        return False
    except Exception:
        if fs.exists(path):  # a server that fails while refusing the write (some S3 emulators answer 500)
            return False
        raise
    return True


def _read_lock(fs, path: str) -> dict | None:
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return {"host": "?", "pid": "?", "heartbeat": 0}  # a torn write of a dead holder: stale


def _stale(holder: dict) -> str | None:
    """Why the holder of a lock is gone, None when it may be alive."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return f"died (pid {holder['pid']} is gone)"
        except PermissionError:
            pass  # alive, another user's
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > STALE_S:
        return f"stopped (no heartbeat for {age:.0f} s)"
    return None


def _heartbeat(fs, path: str, owner: dict, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            if (_read_lock(fs, path) or {}).get("token") != owner["token"]:
                logger.error("the prepare lock %s was taken over by another prepare", path)
                return
            storage.put_atomic(fs, path, _lock_body(owner), fsync=True)
        except Exception as error:  # a storage hiccup: the next beat tries again
            logger.warning("could not refresh the prepare lock %s (%s)", path, error)
