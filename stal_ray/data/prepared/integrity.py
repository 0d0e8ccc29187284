"""Shard checksums checked where a job starts: every shard a job will read hashed against its manifest's
sha256 in the driver, before any work, with a per-user cache of files already hashed.

Why in the driver and not in the read tasks: a damaged shard must stop a job in one line before Ray starts
work (a read task's error would be retried as a lost worker and end in a traceback, and evaluation reads
with Ray Data's own Parquet reader, which cannot hash what it reads). The cost is one read of the split per
job start; the cache makes a second start free. Its key is fsspec's `ukey` of the file: on local disk the
size, modification and change times (a write changes the change time, which no user can set back); on S3
the ETag (a new object for every write). Damage that changes none of them (a disk's decaying sector, bytes
changed under a mounted file system) is caught only when the file is hashed again: after the cache entry
is dropped (`STAL_HASH_CACHE=off`, or deleting the cache file).
"""

import concurrent.futures
import hashlib
import json
import logging
import os
from pathlib import Path

from stal_ray.core import storage
from stal_ray.data.prepared.handle import PreparedData, as_prepared
from stal_ray.data.prepared.manifest import PREPARE_COMMAND, CorruptDatasetError, Manifest

logger = logging.getLogger(__name__)

CACHE_VARIABLE = "STAL_HASH_CACHE"  # a file path for the cache, or "off" to hash every time
_CHUNK = 8 << 20
_READERS = 4  # shards hashed at once: hashlib releases the GIL on large updates, S3 reads wait on the network


def cache_path() -> Path | None:
    """The cache file: STAL_HASH_CACHE, else shard-hashes.json in the project's cache folder (STAL_RAY_CACHE,
    default ~/.cache/stal_ray, as the pose models'); None when STAL_HASH_CACHE=off."""
    chosen = os.environ.get(CACHE_VARIABLE)
    if chosen and chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    return Path(os.environ.get("STAL_RAY_CACHE", Path.home() / ".cache" / "stal_ray")) / "shard-hashes.json"


def _load_cache(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _save_cache(path: Path | None, cache: dict) -> None:
    """Replaced in one step; a cache that cannot be written costs only a second hashing next time."""
    if path is None:
        return
    try:
        storage.write_atomic(str(path), json.dumps(cache).encode(), mode=0o600)  # 0o600: as tempfile's
    except OSError as error:
        logger.debug("shard hash cache %s not written: %s", path, error)


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_shards(data: PreparedData | str, splits=("train", "test")) -> Manifest:
    """The manifest of the data set `data`, every shard of `splits` checked against its sha256.

    Raises CorruptDatasetError naming the first damaged shard and the fix (prepare again) before any work;
    IncompleteDatasetError (from read_manifest, when `data` is a URI) for a missing shard, a wrong size or a
    manifest that names a file outside its data set.
    """
    data = as_prepared(data)
    uri, manifest = data.uri, data.manifest
    fs, _ = data.filesystem()
    where = cache_path()
    cache = _load_cache(where)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    work = []
    with data.errors():
        for split in splits:
            for entry, path in zip(manifest.files[split], manifest.paths(split), strict=True):
                key, identity = f"{protocol}://{path}", fs.ukey(path)
                known = cache.get(key)
                if isinstance(known, dict) and known.get("ukey") == identity:
                    if known.get("sha256") != entry.sha256:
                        _refuse(uri, entry.path)
                    continue
                work.append((entry, path, key, identity))
        with concurrent.futures.ThreadPoolExecutor(max(1, min(_READERS, len(work)))) as pool:
            digests = list(pool.map(lambda item: _sha256(fs, item[1]), work))
    for (_, _, key, identity), digest in zip(work, digests, strict=True):
        cache[key] = {"ukey": identity, "sha256": digest}
    if work:
        _save_cache(where, cache)
    for (entry, *_), digest in zip(work, digests, strict=True):
        if digest != entry.sha256:
            _refuse(uri, entry.path)
    return manifest


def _refuse(uri: str, shard: str) -> None:
    raise CorruptDatasetError(
        f"{uri}: shard {shard} differs from the sha256 its manifest records (its bytes changed after it was "
        f"written); prepare the data set again ({PREPARE_COMMAND.format(uri=uri)} --overwrite, then "
        "jobs/estimate_pose.py if it had estimated joints)")
