"""The prepared data set's format: its layout, the Parquet schemas of its shards, its manifest, read checked.

Layout of one version of the data set, under <out>/versions/<ID>/ (stal_ray/data/prepared/publish.py: the
pointer <out>/current.json names the current version, swapped in one step once a version is complete; a data
set written before versions has this layout at <out> itself, and is read as it is):

    manifest.json              written last: a version without a valid one is incomplete and is refused
    train/part-00000.parquet   one row per training identity, ascending identity, one row group per row, files
                               of ~target size
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
out because they are not whole JPEG files (stal_ray/data/releases/frame_check.py), each with its split, path,
tracklet row and problem, and dataset: which data set and split it is, its test protocol and the pollution
drawn into its frames (stal_ray/data/prepared/protocol.py). Readers take the file list from the manifest,
never from a listing, so a stray or half-written file is never read.

stal_ray/data/prepared/shards.py writes a data set (stal_ray/data/prepared/shard_rows.py builds its rows,
shard_files.py its files); read_manifest and verify here are how every reader finds and checks one.
"""

import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from stal_ray.core import skeleton, storage
from stal_ray.core.storage import StorageError
from stal_ray.data.prepared import protocol, publish
from stal_ray.data.prepared.shard_files import ShardFile

SCHEMA_VERSION = 1
SPLITS = ("train", "test")
MANIFEST = "manifest.json"
JOINTS = skeleton.NUM_JOINTS  # the paper's 14 joints (§III-B, Eq. 7)
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

PREPARE_COMMAND = "python jobs/prepare_mars.py --root DIR --out {uri}"


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
    # what the data set is and how its test split is ranked (stal_ray.data.prepared.protocol.describe);
    # absent from older manifests, which are MARS's
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


def read_manifest(uri: str, *, endpoint_url: str | None = None) -> Manifest:
    """The manifest of a complete data set at `uri`, its shards checked present with the recorded sizes.

    Raises IncompleteDatasetError when there is none, it is unreadable or of another schema version, or a
    shard is missing or has another size.
    """
    fs, root = storage.filesystem(uri, endpoint_url=endpoint_url)
    rerun = f"run {PREPARE_COMMAND.format(uri=uri)}"
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
        problem = entries_problem(manifest) or _outside(fs, manifest)
        if problem:
            raise IncompleteDatasetError(f"{uri}: {MANIFEST} of version {version} {problem}; {rerun} "
                                         "--overwrite")
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


def entries_problem(manifest: Manifest) -> str | None:
    """Why the manifest's file list cannot be read as its data set, or None: every path is <split>/<name>
    inside the version folder (no absolute path, no '..', no other folder), named once, and the rows of a
    split's files add up to its counts (one training row per identity, one test row per tracklet)."""
    seen = set()
    for split in SPLITS:
        for entry in manifest.files[split]:
            path = entry.path
            parts = path.split("/") if isinstance(path, str) else []
            if (len(parts) != 2 or parts[0] != split or parts[1] in ("", ".", "..") or "\\" in path
                    or not parts[1].endswith(".parquet")):
                return (f"names shard {path!r} in files.{split}: a shard must be {split}/<name>.parquet "
                        "inside its version folder (a path out of the data set is never read)")
            if path in seen:
                return f"names shard {path} twice (its rows would be read twice)"
            if not (type(entry.rows) is int and type(entry.bytes) is int and isinstance(entry.sha256, str)):
                return f"records shard {path} with a row count, size or sha256 of the wrong type"
            seen.add(path)
        rows = sum(entry.rows for entry in manifest.files[split])
        key = "identities" if split == "train" else "tracklets"
        expected = manifest.counts.get(split, {}).get(key)
        if expected is not None and rows != expected:
            return (f"lists {rows} rows in its {split} shards, but its counts say {expected} {split} {key} "
                    "(one row each)")
    return None


def _outside(fs, manifest: Manifest) -> str | None:
    """On local disk, a shard that is a link (or under a linked folder) resolving out of the version
    folder: the bytes read would be another data set's. Object stores have no links."""
    if not isinstance(fs, LocalFileSystem):
        return None
    root = os.path.realpath(manifest._root)
    for split in SPLITS:
        for entry, path in zip(manifest.files[split], manifest.paths(split), strict=True):
            if os.path.commonpath([root, os.path.realpath(path)]) != root:
                return (f"names shard {entry.path}, which links to {os.path.realpath(path)}, outside its "
                        "version folder (a shard is read only inside its data set)")
    return None


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
                                  f"{bad[0]}; re-run {PREPARE_COMMAND.format(uri=uri)} --overwrite")
