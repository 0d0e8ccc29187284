"""The rows of a prepare: a release's frames read and checked, keypoints joined by frame name, grouped into
rows of TRAIN_SCHEMA and TEST_SCHEMA (stal_ray/data/prepared/manifest.py), and the counts its manifest
records.

Frames are checked as they are copied: a frame that resolves outside the release root (a symlink) refuses
the run, naming it; a zero-byte, truncated or non-JPEG frame is dropped from its tracklet, listed and
counted; more than max_bad_fraction of all frames bad, or a tracklet with no good frame left, refuses the run
(stal_ray/data/releases/frame_check.py). stal_ray/data/prepared/shards.py writes the rows into shard files.
"""

import concurrent.futures
import hashlib
import logging
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from stal_ray.core import storage
from stal_ray.data.prepared import pollution
from stal_ray.data.prepared.manifest import KEYPOINT_TYPE
from stal_ray.data.releases.base import Release, ReleaseFormatError, Tracklet
from stal_ray.data.releases.frame_check import BadFrames, BadFramesError, LinkGuard, jpeg_problem

logger = logging.getLogger(__name__)

_READ_THREADS = 8  # frame reads overlap: cheap on local disk, a large win on network filesystems


class FrameReader:
    """Reads a release's frames for the shards: symlinks leaving the root refused, bad JPEGs set aside."""

    def __init__(self, release: Release, bad: BadFrames, polluted: dict | None = None):
        self.release, self.bad, self.polluted = release, bad, polluted
        fs, base = release._filesystem()
        self.guard = LinkGuard(base if isinstance(fs, LocalFileSystem) else None)

    def _read(self, path: str) -> bytes:
        self.guard.check(path)  # before the read: a link out of the release is never opened
        frame = self.release.read_frame(path)
        return frame if self.polluted is None else pollution.pollute(frame, path, self.polluted)

    def tracklets(self, tracklets: list[Tracklet], pool: concurrent.futures.Executor,
                  ) -> list[tuple[list[str], list[bytes]]]:
        """(paths, bytes) of each tracklet's good frames, in order; bad ones recorded in self.bad."""
        data = list(pool.map(self._read, [p for t in tracklets for p in t.frames]))
        kept, start = [], 0
        for t in tracklets:
            paths, frames = [], []
            for path, frame in zip(t.frames, data[start:start + len(t.frames)], strict=True):
                problem = jpeg_problem(frame)
                if problem is None:
                    paths.append(path)
                    frames.append(frame)
                else:
                    self.bad.add(t.split, path, t.row, problem)
            start += len(t.frames)
            if not frames:
                raise BadFramesError(message=(
                    f"{t.split} tracklet in row {t.row + 1} of its track table has no whole JPEG frame "
                    f"left (all {len(t.frames)} are bad; first {t.frames[0]}: "
                    f"{jpeg_problem(data[start - len(t.frames)])}); replace its image files with good "
                    "copies from the release"))
            kept.append((paths, frames))
        return kept


@dataclass
class KeypointJoin:
    """Keypoints of frames by file name; counts how many frames it found."""
    lookup: dict[str, int] | None
    values: pa.Array | None
    found: dict[str, int] = field(default_factory=lambda: {"train": 0, "test": 0})

    def __call__(self, split: str, frames: Iterable[str]) -> pa.Array | None:
        if self.lookup is None:
            return None
        rows = [self.lookup.get(posixpath.basename(path)) for path in frames]
        self.found[split] += sum(row is not None for row in rows)
        return self.values.take(pa.array(rows, pa.int32()))  # a null row index gives a null element


def read_keypoints(uri: str | None,
                    endpoint_url: str | None) -> tuple[dict | None, pa.Array | None, str | None]:
    """(frame name -> row, keypoint values, sha256 of the file) of a keypoints side file, or Nones."""
    if uri is None:
        return None, None, None
    fs, path = storage.filesystem(uri, endpoint_url=endpoint_url)
    with storage.errors(uri, endpoint_url):
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            raise ReleaseFormatError(f"keypoints file {uri} does not exist") from None
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except pa.ArrowException as error:
        raise ReleaseFormatError(f"keypoints file {uri}: not a readable Parquet file ({error})") from None
    expected = "columns name: string (frame file name), keypoints: fixed_size_list<float32>[42]"
    if not {"name", "keypoints"} <= set(table.column_names):
        raise ReleaseFormatError(
            f"keypoints file {uri}: has columns {table.column_names}; expected {expected}")
    try:
        names = table.column("name").cast(pa.string()).to_pylist()
        values = table.column("keypoints").cast(KEYPOINT_TYPE).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise ReleaseFormatError(f"keypoints file {uri}: {error}; expected {expected}") from None
    lookup = {name: row for row, name in enumerate(names)}
    if len(lookup) != len(names):
        seen = set()
        duplicate = next(n for n in names if n in seen or seen.add(n))
        raise ReleaseFormatError(f"keypoints file {uri}: frame {duplicate!r} listed more than once")
    return lookup, values, hashlib.sha256(raw).hexdigest()


def train_rows(reader: FrameReader, join: KeypointJoin) -> tuple[Iterator[tuple[dict, int]], list[int]]:
    """Rows of TRAIN_SCHEMA with their frame bytes, lazily, and (filled as it goes) skipped tracklet rows."""
    release = reader.release
    by_identity: dict[int, list[Tracklet]] = {}
    skipped: list[int] = []
    for t in release.train:
        if t.identity > 0:
            by_identity.setdefault(t.identity, []).append(t)
        else:
            skipped.append(t.row)
    if skipped:
        logger.warning("skipping %d training tracklets of junk (-1) or distractor (0) identities",
                       len(skipped))

    def rows():
        with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
            for identity in sorted(by_identity):
                tracklets = sorted(by_identity[identity], key=lambda t: t.row)
                kept = reader.tracklets(tracklets, pool)
                paths = [p for tracklet_paths, _ in kept for p in tracklet_paths]
                frames = [f for _, tracklet_frames in kept for f in tracklet_frames]
                lengths = [len(tracklet_paths) for tracklet_paths, _ in kept]
                yield {
                    "identity": identity,
                    "frames": frames,
                    "tracklet": np.repeat([t.row for t in tracklets], lengths).astype(np.int32),
                    "camera": np.repeat([t.camera for t in tracklets], lengths).astype(np.int8),
                    "frame_index": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
                    "keypoints": join("train", paths),
                }, sum(map(len, frames))

    return rows(), skipped


def test_rows(reader: FrameReader, join: KeypointJoin) -> Iterator[tuple[dict, int]]:
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        for t in reader.release.test:
            [(paths, frames)] = reader.tracklets([t], pool)
            yield {
                "tracklet": t.row,
                "identity": t.identity,
                "camera": t.camera,
                "is_query": t.is_query,
                "frames": frames,
                "keypoints": join("test", paths),
            }, sum(map(len, frames))


def counts(release: Release, join: KeypointJoin, skipped: list[int],
            bad: BadFrames) -> dict[str, dict[str, int]]:
    train = [t for t in release.train if t.identity > 0]
    test = release.test
    return {
        "train": {
            "identities": len({t.identity for t in train}),
            "tracklets": len(train),
            "frames": sum(len(t.frames) for t in train) - bad.count("train"),
            "frames_with_keypoints": join.found["train"],
            "bad_frames": bad.count("train"),
            "skipped_tracklets": len(skipped),
        },
        "test": {
            "identities": len({t.identity for t in test if t.identity > 0}),
            "tracklets": len(test),
            "frames": sum(len(t.frames) for t in test) - bad.count("test"),
            "frames_with_keypoints": join.found["test"],
            "bad_frames": bad.count("test"),
            "queries": sum(t.is_query for t in test),
            "junk_tracklets": sum(t.identity == -1 for t in test),
            "distractor_tracklets": sum(t.identity == 0 for t in test),
        },
    }
