"""The prepared MARS data set: Parquet shards of JPEG bytes and a manifest, written atomically, read checked.

Layout under <out> (a local directory or s3://bucket/prefix):

    manifest.json              written last: a data set without a valid one is incomplete and is refused
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
its path relative to <out>, byte size, sha256 and row count. Readers take the file list from the manifest,
never from a listing, so a stray or half-written file is never read.
"""

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import posixpath
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractBufferedFile
from tqdm import tqdm

from stal_ray.data import storage
from stal_ray.data.mars import MarsFormatError, MarsRelease, Tracklet
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

# JPEG does not compress further: storing frames plain saves the reader's CPU; the small columns get zstd.
_COMPRESSION = {"frames": "none", "tracklet": "zstd", "camera": "zstd", "frame_index": "zstd",
                "keypoints": "zstd", "identity": "zstd", "is_query": "zstd"}
# Row groups bound the memory of one read step (Ray Data reads a file row group by row group).
_ROW_GROUP_BYTES = 32 << 20
_PART = re.compile(r"part-\d{5}\.parquet")
_READ_THREADS = 8  # frame reads overlap: cheap on local disk, a large win on network filesystems
_PREPARE = "python jobs/prepare_mars.py --mars-root DIR --out {uri}"


class IncompleteDatasetError(StorageError):
    """No complete prepared data set at a URI (no or bad manifest, missing shard): re-run the prepare job."""


class DatasetExistsError(StorageError):
    """The output already holds a complete data set of another source or layout; pass overwrite=True."""


class CorruptDatasetError(StorageError):
    """A shard whose bytes differ from its manifest entry."""


@dataclass(frozen=True)
class ShardFile:
    path: str  # relative to the data set root, '/'-separated
    bytes: int
    sha256: str
    rows: int


@dataclass
class Manifest:
    schema_version: int
    created: str
    source: dict[str, Any]
    target_file_bytes: int
    counts: dict[str, dict[str, int]]
    files: dict[str, list[ShardFile]]
    uri: str = field(default="", compare=False)  # where it lives; not stored
    reused: bool = field(default=False, compare=False)  # write_shards found it up to date; not stored
    _root: str = field(default="", repr=False, compare=False)  # uri as a path of its filesystem

    def paths(self, split: str) -> list[str]:
        """The split's shard paths inside the filesystem of storage.filesystem/arrow_filesystem(uri)."""
        return [posixpath.join(self._root, f.path) for f in self.files[split]]

    def uris(self, split: str) -> list[str]:
        return [storage.join(self.uri, *f.path.split("/")) for f in self.files[split]]

    def to_json(self) -> str:
        stored = {k: v for k, v in asdict(self).items() if k not in ("uri", "reused", "_root")}
        return json.dumps(stored, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        files = {split: [ShardFile(**entry) for entry in data["files"][split]] for split in SPLITS}
        return cls(data["schema_version"], data["created"], data["source"], data["target_file_bytes"],
                   data["counts"], files)


# ---------------------------------------------------------------------------------------------- writing


def write_shards(release: MarsRelease, out: str, *, keypoints: str | None = None,
                 target_file_bytes: int = 128 << 20, overwrite: bool = False,
                 endpoint_url: str | None = None, progress: bool = True) -> Manifest:
    """Write `release` as Parquet shards and a manifest under `out`; returns the manifest.

    Keypoints come from `keypoints` (a Parquet file of KEYPOINTS_SCHEMA) or else release.keypoints_path,
    joined by frame file name. Everything is written under <out>/.tmp-<uuid>/ and moved into place, the
    manifest last, so an interrupted run never leaves a data set that looks complete (a complete one
    already there stays readable until the final swap). Over a complete data set of the same source and
    settings this is a no-op (manifest.reused is True); of another one it raises DatasetExistsError unless
    overwrite=True.
    """
    if target_file_bytes < 1:
        raise ValueError(f"target_file_bytes must be >= 1, got {target_file_bytes}")
    keypoints = keypoints or release.keypoints_path
    fs, root = storage.filesystem(out, endpoint_url=endpoint_url)
    lookup, keypoint_values, keypoints_digest = _read_keypoints(keypoints, endpoint_url)
    source = {"release": release.root, "keypoints": keypoints,
              "fingerprint": _fingerprint(release, keypoints_digest)}
    with storage.errors(out, endpoint_url):
        existing = _complete_manifest(out, endpoint_url)
        if existing is not None and not overwrite:
            differences = _differences(existing, source, target_file_bytes)
            if not differences:
                logger.info("%s is up to date (same source, schema and file size); nothing written", out)
                existing.reused = True
                return existing
            raise DatasetExistsError(f"{out} already holds a complete data set with another "
                                     f"{', '.join(differences)}; pass --overwrite (overwrite=True) to "
                                     "rebuild it")
        for stale in _temporaries(fs, root):  # left by a run that was killed
            logger.info("removing %s, left by an interrupted run", stale)
            fs.rm(stale, recursive=True)
        tmp = posixpath.join(root, f".tmp-{uuid.uuid4().hex}")
        try:
            join = _KeypointJoin(lookup, keypoint_values)
            train, skipped = _train_rows(release, join)
            files = {
                "train": _write_split(fs, tmp, "train", train, target_file_bytes,
                                      _bar(progress, len(release.identities("train")), "train identities")),
                "test": _write_split(fs, tmp, "test", _test_rows(release, join), target_file_bytes,
                                     _bar(progress, len(release.test), "test tracklets")),
            }
            manifest = Manifest(
                schema_version=SCHEMA_VERSION,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                source=source,
                target_file_bytes=target_file_bytes,
                counts=_counts(release, join, skipped),
                files=files,
                uri=out,
                _root=root,
            )
            fs.makedirs(tmp, exist_ok=True)
            fs.pipe_file(posixpath.join(tmp, MANIFEST), manifest.to_json().encode())
            _publish(fs, root, tmp, files)
        finally:
            _remove_quietly(fs, tmp)
    logger.info("wrote %s: %s", out, manifest.counts)
    return manifest


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


def _differences(existing: Manifest, source: dict, target_file_bytes: int) -> list[str]:
    differences = []
    if existing.schema_version != SCHEMA_VERSION:
        differences.append(f"schema version ({existing.schema_version}, this code writes {SCHEMA_VERSION})")
    if existing.source.get("fingerprint") != source["fingerprint"]:
        differences.append(f"source (release {existing.source.get('release')}, keypoints "
                           f"{existing.source.get('keypoints')})")
    if existing.target_file_bytes != target_file_bytes:
        differences.append(f"target file size ({existing.target_file_bytes} bytes, asked "
                           f"{target_file_bytes})")
    return differences


def _bar(progress: bool, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="row", disable=not progress, mininterval=1.0, leave=False)


def _read_frames(release: MarsRelease, paths: list[str], pool: concurrent.futures.Executor) -> list[bytes]:
    return list(pool.map(release.read_frame, paths))


def _train_rows(release: MarsRelease, join: _KeypointJoin) -> tuple[Iterator[tuple[dict, int]], list[int]]:
    """Rows of TRAIN_SCHEMA with their frame bytes, lazily, and (filled as it goes) skipped tracklet rows."""
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
                paths = [p for t in tracklets for p in t.frames]
                frames = _read_frames(release, paths, pool)
                lengths = [len(t.frames) for t in tracklets]
                yield {
                    "identity": identity,
                    "frames": frames,
                    "tracklet": np.repeat([t.row for t in tracklets], lengths).astype(np.int32),
                    "camera": np.repeat([t.camera for t in tracklets], lengths).astype(np.int8),
                    "frame_index": np.concatenate([np.arange(n, dtype=np.int32) for n in lengths]),
                    "keypoints": join("train", paths),
                }, sum(map(len, frames))

    return rows(), skipped


def _test_rows(release: MarsRelease, join: _KeypointJoin) -> Iterator[tuple[dict, int]]:
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        for t in release.test:
            frames = _read_frames(release, list(t.frames), pool)
            yield {
                "tracklet": t.row,
                "identity": t.identity,
                "camera": t.camera,
                "is_query": t.is_query,
                "frames": frames,
                "keypoints": join("test", t.frames),
            }, sum(map(len, frames))


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (scalars, per-frame lists, per-frame numpy arrays, keypoint arrays or None) as one table."""
    lengths = np.array([len(row["frames"]) for row in rows])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns = []
    for f in schema:
        values = [row[f.name] for row in rows]
        if f.name == "frames":
            column = pa.ListArray.from_arrays(offsets, pa.array([b for v in values for b in v], pa.binary()))
        elif f.name == "keypoints":  # all rows have them (nulls for frames without) or none has
            if values[0] is None:
                column = pa.nulls(len(rows), f.type)
            else:
                column = pa.ListArray.from_arrays(offsets, pa.concat_arrays(values))
        elif pa.types.is_list(f.type):
            column = pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(values), f.type.value_type))
        else:
            column = pa.array(values, f.type)
        columns.append(column.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


class _HashingFile:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, raw):
        self.raw, self.sha256, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = memoryview(data)
        self.sha256.update(data)
        self.size += data.nbytes
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True  # the owner closes self.raw: that is where an upload completes or fails


class _PartWriter:
    """One shard file under construction, written row group by row group."""

    def __init__(self, fs, path: str, relative: str, schema: pa.Schema):
        self.fs, self.relative, self.schema, self.rows = fs, relative, schema, 0
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.raw = fs.open(path, "wb")
        self.file = _HashingFile(self.raw)
        self.writer = pq.ParquetWriter(self.file, schema, compression=_COMPRESSION,
                                       use_dictionary=["identity", "camera", "tracklet", "is_query"])

    def add(self, rows: list[dict]) -> None:
        self.writer.write_table(_table(rows, self.schema), row_group_size=len(rows))
        self.rows += len(rows)

    def close(self) -> ShardFile:
        self.writer.close()
        self.raw.close()
        return ShardFile(self.relative, self.file.size, self.file.sha256.hexdigest(), self.rows)

    def abort(self) -> None:
        # cleaning up after an error that is already on its way up: a second one would only hide it
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(Exception):
            if isinstance(self.raw, AbstractBufferedFile):
                # an object store: abort the upload rather than complete a truncated object
                self.raw.discard()
                self.raw.closed = True  # or its __del__ would try to finish the upload
            else:
                self.raw.close()


def _write_split(fs, tmp: str, split: str, rows: Iterator[tuple[dict, int]], target_file_bytes: int,
                 bar: tqdm) -> list[ShardFile]:
    """Stream rows into files of about target_file_bytes of frames (a file closes once it reaches it)."""
    row_group_bytes = min(_ROW_GROUP_BYTES, target_file_bytes)
    files: list[ShardFile] = []
    part, buffer, buffered, file_bytes = None, [], 0, 0
    try:
        with bar:
            for row, nbytes in rows:
                if part is None:
                    relative = f"{split}/part-{len(files):05d}.parquet"
                    part = _PartWriter(fs, posixpath.join(tmp, relative), relative, SCHEMAS[split])
                buffer.append(row)
                buffered += nbytes
                file_bytes += nbytes
                bar.update()
                if buffered >= row_group_bytes or file_bytes >= target_file_bytes:
                    part.add(buffer)
                    buffer, buffered = [], 0
                if file_bytes >= target_file_bytes:
                    files.append(part.close())
                    part, file_bytes = None, 0
            if buffer:
                part.add(buffer)
            if part is not None:
                files.append(part.close())
                part = None
    finally:
        if part is not None:
            part.abort()
    return files


def _counts(release: MarsRelease, join: _KeypointJoin, skipped: list[int]) -> dict[str, dict[str, int]]:
    train = [t for t in release.train if t.identity > 0]
    test = release.test
    return {
        "train": {
            "identities": len({t.identity for t in train}),
            "tracklets": len(train),
            "frames": sum(len(t.frames) for t in train),
            "frames_with_keypoints": join.found["train"],
            "skipped_tracklets": len(skipped),
        },
        "test": {
            "identities": len({t.identity for t in test if t.identity > 0}),
            "tracklets": len(test),
            "frames": sum(len(t.frames) for t in test),
            "frames_with_keypoints": join.found["test"],
            "queries": sum(t.is_query for t in test),
            "junk_tracklets": sum(t.identity == -1 for t in test),
            "distractor_tracklets": sum(t.identity == 0 for t in test),
        },
    }


def _publish(fs, root: str, tmp: str, files: dict[str, list[ShardFile]]) -> None:
    """Swap the finished files in: old manifest out first (so nothing half-swapped looks complete), old
    shards out (a smaller rebuild must not leave extra ones), new shards in, manifest last."""
    manifest = posixpath.join(root, MANIFEST)
    if fs.exists(manifest):
        fs.rm(manifest)
    for split in SPLITS:
        folder = posixpath.join(root, split)
        if fs.exists(folder):
            for path in fs.ls(folder, detail=False):
                if _PART.fullmatch(posixpath.basename(path)):  # only ours: never a user's other files
                    fs.rm(path)
        fs.makedirs(folder, exist_ok=True)
        for entry in files[split]:
            fs.mv(posixpath.join(tmp, entry.path), posixpath.join(root, entry.path))
    fs.mv(posixpath.join(tmp, MANIFEST), manifest)


def _remove_quietly(fs, tmp: str) -> None:
    """Remove the temporary prefix; a failure here must not hide the error that brought us here, and what
    is left is removed by the next run."""
    try:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
    except Exception as error:
        logger.warning("could not remove %s (%s); the next run removes it", tmp, error)


def _temporaries(fs, root: str) -> list[str]:
    if not fs.exists(root):
        return []
    return [p for p in fs.ls(root, detail=False) if posixpath.basename(p.rstrip("/")).startswith(".tmp-")]


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
            text = fs.cat_file(posixpath.join(root, MANIFEST)).decode()
        except FileNotFoundError:
            raise IncompleteDatasetError(
                f"{uri}: no {MANIFEST}, so not a complete prepared data set (never prepared, or the "
                f"prepare run was interrupted); {rerun}") from None
        try:
            manifest = Manifest.from_json(text)
        except (ValueError, KeyError, TypeError) as error:
            raise IncompleteDatasetError(
                f"{uri}: {MANIFEST} is unreadable ({error!r}); {rerun} --overwrite") from None
        if manifest.schema_version != SCHEMA_VERSION:
            raise IncompleteDatasetError(
                f"{uri}: written with schema version {manifest.schema_version}, this code reads "
                f"{SCHEMA_VERSION}; {rerun} --overwrite")
        manifest.uri, manifest._root = uri, root
        for split in SPLITS:
            folder = posixpath.join(root, split)
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
    fs, root = storage.filesystem(uri, endpoint_url=endpoint_url, check=False)
    bad = []
    with storage.errors(uri, endpoint_url):
        for split in SPLITS:
            for entry in manifest.files[split]:
                digest = hashlib.sha256()
                with fs.open(posixpath.join(root, entry.path), "rb") as fh:
                    while chunk := fh.read(8 << 20):
                        digest.update(chunk)
                if digest.hexdigest() != entry.sha256:
                    bad.append(entry.path)
    if bad:
        raise CorruptDatasetError(f"{uri}: {len(bad)} shard(s) differ from their manifest checksum, first "
                                  f"{bad[0]}; re-run {_PREPARE.format(uri=uri)} --overwrite")
