"""The prepared MARS data set: Parquet shards of JPEG bytes and a manifest, written atomically, read checked.

Layout of one version of the data set, under <out>/versions/<ID>/ (stal_ray/data/publish.py: the pointer
<out>/current.json names the current version, swapped in one step once a version is complete; a data set
written before versions has this layout at <out> itself, and is read as it is):

    manifest.json              written last: a version without a valid one is incomplete and is refused
    train/part-00000.parquet   one row per training identity, ascending identity, files of ~target size
    test/part-00000.parquet    one row per test tracklet, in track-table order, files of ~target size

TRAIN_SCHEMA, one row per person: every frame of every tracklet of that identity, grouped by tracklet
(ascending track-table row), each tracklet's frames in name-list (temporal) order, so an epoch reads each
stored byte once and the pipeline cuts clips out of a row.

    identity     int32                               person id (> 0; junk and distractors are not trained on)
    frames       list<binary>                        JPEG bytes exactly as shipped (never decoded here)
    tracklet     list<int32>                         per frame: its tracklet's tracks_train_info row (0-based)
    camera       list<int8>                          per frame: camera 1..6
    frame_index  list<int32>                         per frame: position in its tracklet (0-based)
    keypoints    list<fixed_size_list<float32>[42]>  per frame: 14 MPII joints x (x, y, confidence), in the
                                                     frame's pixels; an element is null for a frame without
                                                     keypoints, the whole list null when the data set has none

TEST_SCHEMA, one row per test tracklet (queries, gallery, junk -1 and distractors 0 alike):

    tracklet int32 (row in tracks_test_info, 0-based), identity int32, camera int8, is_query bool,
    frames list<binary>, keypoints list<fixed_size_list<float32>[42]> (as above)

The manifest (JSON) holds schema_version, created (UTC, ISO 8601), source (release root, keypoints file,
fingerprint of the release index and keypoint bytes), target_file_bytes, counts per split and, per file,
its path relative to the version folder, byte size, sha256 and row count, and bad_frames: the frames left
out because they are not whole JPEG files (stal_ray/data/frame_check.py), each with its split, path,
tracklet row and problem, and dataset: which data set and split it is, its test protocol and the pollution
drawn into its frames (stal_ray/data/protocol.py). Readers take the file list from the manifest, never from
a listing, so a stray or half-written file is never read.

Frames are checked as they are copied: a frame that resolves outside the release root (a symlink) refuses
the run, naming it; a zero-byte, truncated or non-JPEG frame is dropped from its tracklet, listed and
counted; more than max_bad_fraction of all frames bad, or a tracklet with no good frame left, refuses the run.
"""

import concurrent.futures
import hashlib
import json
import logging
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from stal_ray.data import pollution, protocol, publish, storage
from stal_ray.data.frame_check import MAX_BAD_FRACTION, BadFrames, BadFramesError, LinkGuard, jpeg_problem
from stal_ray.data.mars import MarsFormatError, MarsRelease, Tracklet
from stal_ray.data.shard_files import ShardFile, write_split
from stal_ray.data.storage import StorageError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPLITS = ("train", "test")
MANIFEST = "manifest.json"
JOINTS = 14  # MPII joints (paper §III-C, Eq. 7)
KEYPOINT_TYPE = pa.list_(pa.float32(), JOINTS * 3)  # (x, y, confidence) per joint
KEYPOINTS_SCHEMA = pa.schema([("name", pa.string()), ("keypoints", KEYPOINT_TYPE)])  # the side file

TRAIN_SCHEMA = pa.schema([
    pa.field("identity", pa.int32(), nullable=False),
    pa.field("frames", pa.list_(pa.binary()), nullable=False),
    pa.field("tracklet", pa.list_(pa.int32()), nullable=False),
    pa.field("camera", pa.list_(pa.int8()), nullable=False),
    pa.field("frame_index", pa.list_(pa.int32()), nullable=False),
    pa.field("keypoints", pa.list_(KEYPOINT_TYPE)),
])
TEST_SCHEMA = pa.schema([
    pa.field("tracklet", pa.int32(), nullable=False),
    pa.field("identity", pa.int32(), nullable=False),
    pa.field("camera", pa.int8(), nullable=False),
    pa.field("is_query", pa.bool_(), nullable=False),
    pa.field("frames", pa.list_(pa.binary()), nullable=False),
    pa.field("keypoints", pa.list_(KEYPOINT_TYPE)),
])
SCHEMAS = {"train": TRAIN_SCHEMA, "test": TEST_SCHEMA}

_READ_THREADS = 8  # frame reads overlap: cheap on local disk, a large win on network filesystems
_PREPARE = "python jobs/prepare_mars.py --mars-root DIR --out {uri}"


class IncompleteDatasetError(StorageError):
    """No complete prepared data set at a URI (no or bad manifest, missing shard): re-run the prepare job."""


class DatasetExistsError(StorageError):
    """The output already holds a complete data set of another source or layout; pass overwrite=True."""


class CorruptDatasetError(StorageError):
    """A shard whose bytes differ from its manifest entry."""


@dataclass
class Manifest:
    schema_version: int
    created: str
    source: dict[str, Any]
    target_file_bytes: int
    counts: dict[str, dict[str, int]]
    files: dict[str, list[ShardFile]]
    bad_frames: list[dict] = field(default_factory=list)  # frames left out; absent from older manifests
    # the model whose joints the keypoints column holds (stal_ray/pose/annotate.py); absent when none did
    pose: dict | None = None
    # what the data set is and how its test split is ranked (stal_ray.data.protocol.describe); absent from
    # older manifests, which are MARS's
    dataset: dict = field(default_factory=protocol.describe)
    uri: str = field(default="", compare=False)  # the data set's URI; not stored
    version: str = field(default="", compare=False)  # version ID (publish.LEGACY: none); not stored
    reused: bool = field(default=False, compare=False)  # write_shards found it up to date; not stored
    _root: str = field(default="", repr=False, compare=False)  # the version folder in its filesystem

    _NOT_STORED = ("uri", "version", "reused", "_root")

    def paths(self, split: str) -> list[str]:
        """The split's shard paths inside the filesystem of storage.filesystem/arrow_filesystem(uri)."""
        return [posixpath.join(self._root, f.path) for f in self.files[split]]

    def uris(self, split: str) -> list[str]:
        return [storage.join(self.uri, *publish.version_parts(self.version), *f.path.split("/"))
                for f in self.files[split]]

    @property
    def manifest_path(self) -> str:
        """Where this manifest lives, in the filesystem of `paths`."""
        return posixpath.join(self._root, MANIFEST)

    def to_json(self) -> str:
        stored = {k: v for k, v in asdict(self).items() if k not in self._NOT_STORED}
        if stored["pose"] is None:
            del stored["pose"]
        return json.dumps(stored, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        files = {split: [ShardFile(**entry) for entry in data["files"][split]] for split in SPLITS}
        return cls(data["schema_version"], data["created"], data["source"], data["target_file_bytes"],
                   data["counts"], files, list(data.get("bad_frames", [])), pose=data.get("pose"),
                   dataset=protocol.of_manifest(data.get("dataset")))


# ---------------------------------------------------------------------------------------------- writing


def write_shards(release: MarsRelease, out: str, *, keypoints: str | None = None,
                 target_file_bytes: int = 128 << 20, overwrite: bool = False,
                 endpoint_url: str | None = None, progress: bool = True,
                 max_bad_fraction: float = MAX_BAD_FRACTION, keep_previous: bool = True,
                 lock_wait_s: float = 0.0, dataset: dict | None = None) -> Manifest:
    """Write `release` as Parquet shards and a manifest under `out`; returns the manifest.

    Keypoints come from `keypoints` (a Parquet file of KEYPOINTS_SCHEMA) or else release.keypoints_path,
    joined by frame file name. The shards and the manifest go into a new version folder, published by one
    swap of the pointer (stal_ray/data/publish.py), so readers see the previous data set whole until that
    moment and the new one whole after it, wherever the run is interrupted. Over a complete data set of the
    same source and settings this is a no-op (manifest.reused is True); of another one it raises
    DatasetExistsError unless overwrite=True. keep_previous keeps the version it replaces until the next
    prepare (for jobs still reading it); otherwise that is removed right after the swap. Another prepare
    writing to `out` raises publish.PrepareLockedError, unless it finishes within lock_wait_s seconds (then
    its data set is checked as above). `dataset` (stal_ray.data.protocol.describe; default MARS's) goes into
    the manifest; its `pollution` settings, when set, black out a box of every frame
    (stal_ray.data.pollution).
    """
    if target_file_bytes < 1:
        raise ValueError(f"target_file_bytes must be >= 1, got {target_file_bytes}")
    if not 0 <= max_bad_fraction <= 1:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    keypoints = keypoints or release.keypoints_path
    dataset = dataset or protocol.describe()
    fs, root = storage.filesystem(out, endpoint_url=endpoint_url)
    lookup, keypoint_values, keypoints_digest = _read_keypoints(keypoints, endpoint_url)
    source = {"release": release.root, "keypoints": keypoints,
              "fingerprint": _fingerprint(release, keypoints_digest)}
    with storage.errors(out, endpoint_url):
        # checked before the lock (a reader of an up-to-date data set needs no write access) and again
        # under it (another prepare may have published while this one waited)
        up_to_date = None if overwrite else _up_to_date(out, endpoint_url, source, target_file_bytes, release,
                                                        dataset)
        if up_to_date is not None:
            return up_to_date
        with publish.prepare_lock(fs, root, out, lock_wait_s):
            up_to_date = None if overwrite else _up_to_date(out, endpoint_url, source, target_file_bytes,
                                                            release, dataset)
            if up_to_date is not None:
                return up_to_date
            current, previous = _versions(fs, root, out)
            publish.remove_unreferenced(fs, root, keep={current, previous})  # killed runs' leftovers
            version = publish.new_version()
            base = publish.version_root(root, version)
            total = sum(len(t.frames) for t in (*release.train, *release.test))
            reader = _FrameReader(release, BadFrames(total, max_bad_fraction), dataset.get("pollution"))
            try:
                join = _KeypointJoin(lookup, keypoint_values)
                train, skipped = _train_rows(reader, join)
                bars = (_bar(progress, len(release.identities("train")), "train identities"),
                        _bar(progress, len(release.test), "test tracklets"))
                files = {
                    "train": write_split(fs, base, "train", TRAIN_SCHEMA, train, target_file_bytes, bars[0]),
                    "test": write_split(fs, base, "test", TEST_SCHEMA, _test_rows(reader, join),
                                        target_file_bytes, bars[1]),
                }
                manifest = Manifest(
                    schema_version=SCHEMA_VERSION,
                    created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    source=source,
                    target_file_bytes=target_file_bytes,
                    counts=_counts(release, join, skipped, reader.bad),
                    files=files,
                    bad_frames=reader.bad.found,
                    dataset=dataset,
                    uri=out,
                    version=version,
                    _root=base,
                )
                fs.makedirs(base, exist_ok=True)
                fs.pipe_file(manifest.manifest_path, manifest.to_json().encode())
                publish.swap_pointer(fs, root, version, previous=current)
            except BaseException:
                if not _is_current(fs, root, version):  # interrupted after the swap: it is published
                    _remove_quietly(fs, base)
                raise
            try:
                publish.remove_unreferenced(fs, root, keep={version, current if keep_previous else None})
            except Exception as error:  # the new version is published: what is left goes next time
                logger.warning("published %s, but could not remove older versions (%s); the next prepare "
                               "removes them", out, error)
    if reader.bad.found:
        logger.warning("%s: left out %d bad frames (listed in the manifest's bad_frames): %s", out,
                       len(reader.bad.found), reader.bad.summary())
    logger.info("wrote %s version %s: %s", out, version, manifest.counts)
    return manifest


def _up_to_date(out: str, endpoint_url: str | None, source: dict, target_file_bytes: int,
                release: MarsRelease, dataset: dict) -> Manifest | None:
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


class _FrameReader:
    """Reads a release's frames for the shards: symlinks leaving the root refused, bad JPEGs set aside."""

    def __init__(self, release: MarsRelease, bad: BadFrames, polluted: dict | None = None):
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
class _KeypointJoin:
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


def _read_keypoints(uri: str | None,
                    endpoint_url: str | None) -> tuple[dict | None, pa.Array | None, str | None]:
    """(frame name -> row, keypoint values, sha256 of the file) of a keypoints side file, or Nones."""
    if uri is None:
        return None, None, None
    fs, path = storage.filesystem(uri, endpoint_url=endpoint_url)
    with storage.errors(uri, endpoint_url):
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            raise MarsFormatError(f"keypoints file {uri} does not exist") from None
    try:
        table = pq.read_table(pa.BufferReader(raw))
    except pa.ArrowException as error:
        raise MarsFormatError(f"keypoints file {uri}: not a readable Parquet file ({error})") from None
    expected = "columns name: string (frame file name), keypoints: fixed_size_list<float32>[42]"
    if not {"name", "keypoints"} <= set(table.column_names):
        raise MarsFormatError(f"keypoints file {uri}: has columns {table.column_names}; expected {expected}")
    try:
        names = table.column("name").cast(pa.string()).to_pylist()
        values = table.column("keypoints").cast(KEYPOINT_TYPE).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise MarsFormatError(f"keypoints file {uri}: {error}; expected {expected}") from None
    lookup = {name: row for row, name in enumerate(names)}
    if len(lookup) != len(names):
        seen = set()
        duplicate = next(n for n in names if n in seen or seen.add(n))
        raise MarsFormatError(f"keypoints file {uri}: frame {duplicate!r} listed more than once")
    return lookup, values, hashlib.sha256(raw).hexdigest()


def _fingerprint(release: MarsRelease, keypoints_digest: str | None) -> str:
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


def _differences(existing: Manifest, source: dict, target_file_bytes: int, release: MarsRelease,
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


def _now_good(release: MarsRelease, path: str) -> bool:
    try:
        return jpeg_problem(release.read_frame(path)) is None
    except OSError:
        return False


def _bar(progress: bool, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="row", disable=not progress, mininterval=1.0, leave=False)


def _train_rows(reader: _FrameReader, join: _KeypointJoin) -> tuple[Iterator[tuple[dict, int]], list[int]]:
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


def _test_rows(reader: _FrameReader, join: _KeypointJoin) -> Iterator[tuple[dict, int]]:
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


def _counts(release: MarsRelease, join: _KeypointJoin, skipped: list[int],
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


def _remove_quietly(fs, tmp: str) -> None:
    """Remove an unpublished version; a failure here must not hide the error that brought us here, and what
    is left is removed by the next run."""
    try:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
    except Exception as error:
        logger.warning("could not remove %s (%s); the next run removes it", tmp, error)


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(uri: str, *, endpoint_url: str | None = None) -> Manifest:
    """The manifest of a complete data set at `uri`, its shards checked present with the recorded sizes.

    Raises IncompleteDatasetError when there is none, it is unreadable or of another schema version, or a
    shard is missing or has another size.
    """
    fs, root = storage.filesystem(uri, endpoint_url=endpoint_url)
    rerun = f"run {_PREPARE.format(uri=uri)}"
    with storage.errors(uri, endpoint_url):
        try:
            version, _ = publish.current_version(fs, root)
        except ValueError as error:
            raise IncompleteDatasetError(f"{uri}: {error}; {rerun} --overwrite") from None
        if version is None:
            raise IncompleteDatasetError(
                f"{uri}: no {publish.POINTER} or {MANIFEST}, so not a complete prepared data set (never "
                f"prepared, or the prepare run was interrupted); {rerun}")
        base = publish.version_root(root, version)
        try:
            text = fs.cat_file(posixpath.join(base, MANIFEST)).decode()
        except FileNotFoundError:
            raise IncompleteDatasetError(
                f"{uri}: {publish.POINTER} names version {version}, which has no {MANIFEST} (removed by "
                f"hand, or replaced by a prepare with --drop-previous just now: retry); {rerun} --overwrite"
            ) from None
        try:
            manifest = Manifest.from_json(text)
        except (ValueError, KeyError, TypeError) as error:
            raise IncompleteDatasetError(
                f"{uri}: {MANIFEST} is unreadable ({error!r}); {rerun} --overwrite") from None
        if manifest.schema_version != SCHEMA_VERSION:
            raise IncompleteDatasetError(
                f"{uri}: written with schema version {manifest.schema_version}, this code reads "
                f"{SCHEMA_VERSION}; {rerun} --overwrite")
        manifest.uri, manifest.version, manifest._root = uri, version, base
        for split in SPLITS:
            folder = posixpath.join(base, split)
            listed = {posixpath.basename(e["name"]): e["size"] for e in fs.ls(folder, detail=True)} \
                if fs.exists(folder) else {}
            for entry in manifest.files[split]:
                size = listed.get(posixpath.basename(entry.path))
                if size != entry.bytes:
                    state = "missing" if size is None else f"{size} bytes, the manifest says {entry.bytes}"
                    raise IncompleteDatasetError(f"{uri}: shard {entry.path} is {state}; {rerun} --overwrite")
    return manifest


def verify(uri: str, *, endpoint_url: str | None = None) -> None:
    """Read every shard and check its sha256 against the manifest; CorruptDatasetError on a mismatch."""
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    fs, _ = storage.filesystem(uri, endpoint_url=endpoint_url, check=False)
    bad = []
    with storage.errors(uri, endpoint_url):
        for split in SPLITS:
            for entry, path in zip(manifest.files[split], manifest.paths(split), strict=True):
                digest = hashlib.sha256()
                with fs.open(path, "rb") as fh:
                    while chunk := fh.read(8 << 20):
                        digest.update(chunk)
                if digest.hexdigest() != entry.sha256:
                    bad.append(entry.path)
    if bad:
        raise CorruptDatasetError(f"{uri}: {len(bad)} shard(s) differ from their manifest checksum, first "
                                  f"{bad[0]}; re-run {_PREPARE.format(uri=uri)} --overwrite")
