"""Preparing a data set: a MARS-layout release written as Parquet shards and a manifest, atomically, once.

write_shards reads the release's frames into rows (stal_ray/data/prepared/shard_rows.py: frames checked,
keypoints joined), writes them as shard files (stal_ray/data/prepared/shard_files.py) into a new version
folder in the format of stal_ray/data/prepared/manifest.py, writes the manifest last and publishes the
version by swapping the pointer (stal_ray/data/prepared/publish.py). Over a complete data set of the same
source and settings it writes nothing; of another one it refuses unless asked to overwrite.
"""

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from tqdm import tqdm

from stal_ray.core import storage
from stal_ray.data.prepared import pollution, protocol, publish, shard_rows
from stal_ray.data.prepared.manifest import (
    SCHEMA_VERSION,
    TEST_SCHEMA,
    TRAIN_SCHEMA,
    DatasetExistsError,
    IncompleteDatasetError,
    Manifest,
    read_manifest,
)
from stal_ray.data.prepared.shard_files import write_split
from stal_ray.data.releases.base import Release
from stal_ray.data.releases.frame_check import MAX_BAD_FRACTION, BadFrames, jpeg_problem

logger = logging.getLogger(__name__)


def write_shards(release: Release, out: str, *, keypoints: str | None = None,
                 target_file_bytes: int = 128 << 20, overwrite: bool = False,
                 endpoint_url: str | None = None, progress: bool = True,
                 max_bad_fraction: float = MAX_BAD_FRACTION, keep_previous: bool = True,
                 lock_wait_s: float = 0.0, dataset: dict | None = None) -> Manifest:
    """Write `release` as Parquet shards and a manifest under `out`; returns the manifest.

    Keypoints come from `keypoints` (Parquet of manifest.KEYPOINTS_SCHEMA) or else release.keypoints_path,
    joined by frame file name. The shards and the manifest go into a new version folder, published by one swap
    of the pointer (stal_ray/data/prepared/publish.py), so readers see the previous data set whole until that
    moment and the new one whole after it, wherever the run is interrupted. Over a complete data set of the
    same source and settings this is a no-op (manifest.reused is True); of another one it raises
    DatasetExistsError unless overwrite=True. keep_previous keeps the version it replaces until the next
    prepare (for jobs still reading it); otherwise that is removed right after the swap. Another prepare
    writing to `out` raises publish.PrepareLockedError, unless it finishes within lock_wait_s seconds (then
    its data set is checked as above). `dataset` (stal_ray.data.prepared.protocol.describe; default MARS's)
    goes into the manifest; its `pollution` settings, when set, black out a box of every frame
    (stal_ray.data.prepared.pollution).
    """
    plan = _Plan.of(release, out, keypoints=keypoints, target_file_bytes=target_file_bytes,
                    endpoint_url=endpoint_url, progress=progress, max_bad_fraction=max_bad_fraction,
                    dataset=dataset)
    with storage.errors(out, endpoint_url):
        # checked before the lock (a reader of an up-to-date data set needs no write access) and again
        # under it (another prepare may have published while this one waited)
        up_to_date = None if overwrite else plan.up_to_date()
        if up_to_date is not None:
            return up_to_date
        with publish.prepare_lock(plan.fs, plan.root, out, lock_wait_s):
            up_to_date = None if overwrite else plan.up_to_date()
            if up_to_date is not None:
                return up_to_date
            current, previous = _versions(plan.fs, plan.root, out)
            # killed runs' leftovers
            publish.remove_unreferenced(plan.fs, plan.root, keep={current, previous})
            manifest, bad = plan.publish(current)
            try:
                publish.remove_unreferenced(plan.fs, plan.root,
                                            keep={manifest.version, current if keep_previous else None})
            except Exception as error:  # the new version is published: what is left goes next time
                logger.warning("published %s, but could not remove older versions (%s); the next prepare "
                               "removes them", out, error)
    if bad.found:
        logger.warning("%s: left out %d bad frames (listed in the manifest's bad_frames): %s", out,
                       len(bad.found), bad.summary())
    logger.info("wrote %s version %s: %s", out, manifest.version, manifest.counts)
    return manifest


@dataclass(frozen=True)
class _Plan:
    """What one write_shards call writes and where, settled before anything is written: the release, its
    keypoints (read once), the source it is fingerprinted as, the manifest's description and the settings."""

    release: Release
    out: str
    endpoint_url: str | None
    fs: Any
    root: str
    keypoints: tuple  # (frame name -> row, keypoint values) of shard_rows.read_keypoints, or Nones
    source: dict  # the manifest's source: release, keypoints URI, fingerprint
    dataset: dict  # the manifest's description (protocol.describe)
    target_file_bytes: int
    max_bad_fraction: float
    progress: bool

    @classmethod
    def of(cls, release: Release, out: str, *, keypoints: str | None, target_file_bytes: int,
           endpoint_url: str | None, progress: bool, max_bad_fraction: float,
           dataset: dict | None) -> "_Plan":
        """The settings checked, the keypoints read and the release fingerprinted."""
        if target_file_bytes < 1:
            raise ValueError(f"target_file_bytes must be >= 1, got {target_file_bytes}")
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        keypoints = keypoints or release.keypoints_path
        fs, root = storage.filesystem(out, endpoint_url=endpoint_url)
        lookup, keypoint_values, keypoints_digest = shard_rows.read_keypoints(keypoints, endpoint_url)
        source = {"release": release.root, "keypoints": keypoints,
                  "fingerprint": _fingerprint(release, keypoints_digest)}
        return cls(release, out, endpoint_url, fs, root, (lookup, keypoint_values), source,
                   dataset or protocol.describe(), target_file_bytes, max_bad_fraction, progress)

    def up_to_date(self) -> Manifest | None:
        return _up_to_date(self.out, self.endpoint_url, self.source, self.target_file_bytes, self.release,
                           self.dataset)

    def publish(self, current: str | None) -> tuple[Manifest, BadFrames]:
        """Write the shards and the manifest into a new version folder and swap the pointer to it (from
        `current`); returns the manifest and the bad frames left out. Interrupted before the swap, the
        version folder is removed."""
        release, fs = self.release, self.fs
        version = publish.new_version()
        base = publish.version_root(self.root, version)
        total = sum(len(t.frames) for t in (*release.train, *release.test))
        reader = shard_rows.FrameReader(release, BadFrames(total, self.max_bad_fraction),
                                        self.dataset.get("pollution"))
        try:
            join = shard_rows.KeypointJoin(*self.keypoints)
            train, skipped = shard_rows.train_rows(reader, join)
            bars = (_bar(self.progress, len(release.identities("train")), "train identities"),
                    _bar(self.progress, len(release.test), "test tracklets"))
            files = {
                # one identity per row group: an epoch's windows of identities (data.mixing: global) read
                # each stored byte once, not each row group once per identity in it (bench/sampler.py)
                "train": write_split(fs, base, "train", TRAIN_SCHEMA, train, self.target_file_bytes, bars[0],
                                     row_per_group=True),
                "test": write_split(fs, base, "test", TEST_SCHEMA, shard_rows.test_rows(reader, join),
                                    self.target_file_bytes, bars[1]),
            }
            manifest = Manifest(
                schema_version=SCHEMA_VERSION,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                source=self.source,
                target_file_bytes=self.target_file_bytes,
                counts=shard_rows.counts(release, join, skipped, reader.bad),
                files=files,
                bad_frames=reader.bad.found,
                dataset=self.dataset,
                uri=self.out,
                version=version,
                _root=base,
            )
            fs.makedirs(base, exist_ok=True)
            fs.pipe_file(manifest.manifest_path, manifest.to_json().encode())
            publish.swap_pointer(fs, self.root, version, previous=current)
        except BaseException:
            if not _is_current(fs, self.root, version):  # interrupted after the swap: it is published
                _remove_quietly(fs, base)
            raise
        return manifest, reader.bad


def _up_to_date(out: str, endpoint_url: str | None, source: dict, target_file_bytes: int,
                release: Release, dataset: dict) -> Manifest | None:
    """The complete data set at `out` when it is of this source and settings (reused), None when there is
    none; DatasetExistsError when there is another one."""
    existing = _complete_manifest(out, endpoint_url)
    if existing is None:
        return None
    differences = _differences(existing, source, target_file_bytes, release, dataset)
    if differences:
        raise DatasetExistsError(f"{out} already holds a complete data set with another "
                                 f"{', '.join(differences)}; pass --overwrite (overwrite=True) to rebuild it")
    logger.info("%s is up to date (same source, schema and file size); nothing written", out)
    existing.reused = True
    return existing


def _is_current(fs, root: str, version: str) -> bool:
    """Whether the pointer names `version`; True when that cannot be read (then nothing is removed: the next
    prepare removes the version if it is not current)."""
    try:
        return publish.current_version(fs, root)[0] == version
    except Exception:
        return True


def _versions(fs, root: str, out: str) -> tuple[str | None, str | None]:
    try:
        return publish.current_version(fs, root)
    except ValueError as error:  # a damaged pointer: nothing it names can be trusted to keep
        logger.warning("%s: %s; replacing it", out, error)
        return None, None


def _fingerprint(release: Release, keypoints_digest: str | None) -> str:
    """sha256 of the release index (every tracklet's split, identity, camera, query flag, frame names) and
    of the keypoint bytes; image bytes are not hashed (that would read MARS twice to find nothing to do)."""
    digest = hashlib.sha256(f"keypoints {keypoints_digest}\n".encode())
    for t in (*release.train, *release.test):
        digest.update(f"{t.split} {t.row} {t.identity} {t.camera} {int(t.is_query)} {' '.join(t.frames)}\n"
                      .encode())
    return digest.hexdigest()


def _complete_manifest(out: str, endpoint_url: str | None) -> Manifest | None:
    """The manifest of the complete data set at `out`, None when there is none (nothing to protect)."""
    try:
        return read_manifest(out, endpoint_url=endpoint_url)
    except IncompleteDatasetError:
        return None


def _differences(existing: Manifest, source: dict, target_file_bytes: int, release: Release,
                 dataset: dict) -> list[str]:
    differences = []
    if existing.dataset.get("pollution") != dataset.get("pollution"):
        differences.append(f"pollution ({pollution.summary(existing.dataset.get('pollution'))}, asked "
                           f"{pollution.summary(dataset.get('pollution'))})")
    fixed = [entry["path"] for entry in existing.bad_frames if _now_good(release, entry["path"])]
    if fixed:
        differences.append(f"set of good frames ({len(fixed)} left out as bad then are whole JPEGs now, "
                           f"first {fixed[0]})")
    if existing.schema_version != SCHEMA_VERSION:
        differences.append(f"schema version ({existing.schema_version}, this code writes {SCHEMA_VERSION})")
    if existing.source.get("fingerprint") != source["fingerprint"]:
        differences.append(f"source (release {existing.source.get('release')}, keypoints "
                           f"{existing.source.get('keypoints')})")
    if existing.target_file_bytes != target_file_bytes:
        differences.append(f"target file size ({existing.target_file_bytes} bytes, asked "
                           f"{target_file_bytes})")
    return differences


def _now_good(release: Release, path: str) -> bool:
    try:
        return jpeg_problem(release.read_frame(path)) is None
    except OSError:
        return False


def _bar(progress: bool, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="row", disable=not progress, mininterval=1.0, leave=False)


def _remove_quietly(fs, tmp: str) -> None:
    """Remove an unpublished version; a failure here must not hide the error that brought us here, and what
    is left is removed by the next run."""
    try:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
    except Exception as error:
        logger.warning("could not remove %s (%s); the next run removes it", tmp, error)
