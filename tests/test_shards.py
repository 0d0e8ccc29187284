"""Tests of data.shards, data.manifest and data.storage: contents, manifest, idempotence, atomicity, S3
(moto), errors."""

import dataclasses
import hashlib
import json
import os
import posixpath
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import free_port

from stal_ray.core.storage import StorageError, arrow_filesystem, filesystem
from stal_ray.data.prepared import shard_files
from stal_ray.data.prepared.manifest import (
    SCHEMA_VERSION,
    TEST_SCHEMA,
    TRAIN_SCHEMA,
    CorruptDatasetError,
    DatasetExistsError,
    IncompleteDatasetError,
    read_manifest,
    verify,
)
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars

# A few identities per file: the small release spreads over several files, as MARS does over 128 MB ones.
TARGET = 24_000


@pytest.fixture(scope="module")
def release(small_release_root):
    return read_mars(small_release_root)


@pytest.fixture(scope="module")
def written(release, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards") / "mars")
    return write_shards(release, out, target_file_bytes=TARGET, progress=False)


def read_split(manifest, split, endpoint_url=None) -> pa.Table:
    fs, _ = arrow_filesystem(manifest.uri, endpoint_url=endpoint_url)
    return pa.concat_tables(pq.read_table(path, filesystem=fs) for path in manifest.paths(split))


def source_keypoints(release) -> dict[str, list[float]]:
    table = pq.read_table(release.keypoints_path)
    return dict(zip(table.column("name").to_pylist(), table.column("keypoints").to_pylist(), strict=True))


def train_frames(release, identity: int) -> list[str]:
    """An identity's frame paths as a training row holds them: tracklet by tracklet, in table order."""
    tracklets = sorted((t for t in release.train if t.identity == identity), key=lambda t: t.row)
    return [p for t in tracklets for p in t.frames]


def jpeg_files(release, paths) -> list[bytes]:
    """The frames' bytes read straight from the release folder, not through the reader under test."""
    return [open(os.path.join(release.root, p), "rb").read() for p in paths]


def snapshot(root) -> dict[str, tuple[int, str]]:
    """mtime and sha256 of every file under a local folder."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns,
                                                  hashlib.sha256(open(path, "rb").read()).hexdigest())
    return found


def test_train_rows_hold_every_identity_with_its_frames_in_order(release, written):
    table = read_split(written, "train")
    assert table.schema.equals(TRAIN_SCHEMA, check_metadata=False)
    assert table.column("identity").to_pylist() == release.identities("train")
    for row in table.to_pylist():
        assert row["frames"] == jpeg_files(release, train_frames(release, row["identity"]))
        tracklets = sorted((t for t in release.train if t.identity == row["identity"]), key=lambda t: t.row)
        assert row["tracklet"] == [t.row for t in tracklets for _ in t.frames]
        assert row["camera"] == [t.camera for t in tracklets for _ in t.frames]
        assert row["frame_index"] == [i for t in tracklets for i in range(len(t.frames))]


def test_test_rows_are_the_tracklets_with_their_frames(release, written):
    table = read_split(written, "test")
    assert table.schema.equals(TEST_SCHEMA, check_metadata=False)
    rows = table.to_pylist()
    assert [r["tracklet"] for r in rows] == [t.row for t in release.test]
    for row, t in zip(rows, release.test, strict=True):
        assert (row["identity"], row["camera"], row["is_query"]) == (t.identity, t.camera, t.is_query)
        assert row["frames"] == jpeg_files(release, t.frames)
    assert {r["identity"] for r in rows} >= {-1, 0}  # junk and distractors are kept for the protocol


def test_keypoints_are_joined_by_frame_file_name(release, written):
    truth = source_keypoints(release)
    for split in ("train", "test"):
        table = read_split(written, split)
        for row in table.to_pylist():
            frames = train_frames(release, row["identity"]) if split == "train" \
                else release.test[row["tracklet"]].frames
            expected = [truth[posixpath.basename(p)] for p in frames]
            assert row["keypoints"] == expected  # float32 in, float32 out: exact


def test_frames_without_keypoints_get_null(release, tmp_path):
    truth = pq.read_table(release.keypoints_path)
    partial = str(tmp_path / "partial.parquet")
    pq.write_table(truth.slice(0, truth.num_rows // 2), partial)  # first half of the frames only
    known = set(truth.column("name").to_pylist()[: truth.num_rows // 2])
    manifest = write_shards(release, str(tmp_path / "partial"), keypoints=partial, progress=False)
    table = read_split(manifest, "test")
    for row in table.to_pylist():
        names = [posixpath.basename(p) for p in release.test[row["tracklet"]].frames]
        assert [k is not None for k in row["keypoints"]] == [n in known for n in names]
    assert sum(manifest.counts[split]["frames_with_keypoints"] for split in ("train", "test")) == len(known)

    bare = dataclasses.replace(release, keypoints_path=None)
    manifest = write_shards(bare, str(tmp_path / "bare"), progress=False)
    keypoints = read_split(manifest, "train").column("keypoints")
    assert keypoints.null_count == len(keypoints) == manifest.counts["train"]["identities"]
    assert manifest.source["keypoints"] is None


def test_manifest_counts_and_checksums(release, written):
    stored = read_manifest(written.uri)
    assert stored == written
    assert stored.schema_version == SCHEMA_VERSION
    train = [t for t in release.train if t.identity > 0]
    assert stored.counts["train"] == {
        "identities": len(release.identities("train")), "tracklets": len(train),
        "frames": sum(len(t.frames) for t in train),
        "frames_with_keypoints": sum(len(t.frames) for t in train), "skipped_tracklets": 0, "bad_frames": 0,
    }
    test = stored.counts["test"]
    assert test["tracklets"] == len(release.test) and test["queries"] == len(release.queries) > 0
    assert test["identities"] == len(release.identities("test"))
    assert test["frames"] == sum(len(t.frames) for t in release.test)
    assert (test["junk_tracklets"], test["distractor_tracklets"], test["bad_frames"]) == (2, 2, 0)
    assert stored.bad_frames == []
    for split in ("train", "test"):
        for entry, path in zip(stored.files[split], stored.paths(split), strict=True):
            raw = open(path, "rb").read()
            assert (len(raw), hashlib.sha256(raw).hexdigest()) == (entry.bytes, entry.sha256)
            assert pq.ParquetFile(path).metadata.num_rows == entry.rows
    verify(written.uri)


def test_train_identities_spread_over_files_of_bounded_size(written):
    files = written.files["train"]
    assert len(files) >= 2
    # a file closes once its frames reach the target, so all but the last hold at least that much
    assert all(f.bytes >= TARGET for f in files[:-1])
    assert sum(f.rows for f in files) == written.counts["train"]["identities"]


def test_each_training_row_group_holds_one_identity(written):
    """An epoch's windows of identities read only their identities' row groups (data.mixing: global): no
    row group of the training split mixes identities; the test split keeps its ~32 MiB row groups."""
    stored = read_manifest(written.uri)
    for entry, path in zip(stored.files["train"], stored.paths("train"), strict=True):
        metadata = pq.ParquetFile(path).metadata
        assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == [1] * entry.rows
    test = [pq.ParquetFile(path).metadata for path in stored.paths("test")]
    assert max(m.row_group(g).num_rows for m in test for g in range(m.num_row_groups)) > 1


def test_second_run_is_a_no_op(release, written):
    before = snapshot(written.uri)
    again = write_shards(release, written.uri, target_file_bytes=TARGET, progress=False)
    assert again.reused and again == written
    assert snapshot(written.uri) == before


def test_other_settings_need_overwrite_which_rebuilds_cleanly(release, tmp_path):
    out = str(tmp_path / "mars")
    first = write_shards(release, out, target_file_bytes=TARGET, progress=False)
    with pytest.raises(DatasetExistsError, match="target file size.*overwrite"):
        write_shards(release, out, target_file_bytes=10 * TARGET, progress=False)
    rebuilt = write_shards(release, out, target_file_bytes=10 * TARGET, overwrite=True, progress=False)
    assert not rebuilt.reused and len(rebuilt.files["train"]) < len(first.files["train"])
    assert sorted(os.listdir(os.path.dirname(rebuilt.paths("train")[0]))) == \
        [posixpath.basename(f.path) for f in rebuilt.files["train"]]
    assert read_manifest(out) == rebuilt and rebuilt.version > first.version
    verify(out)
    # the replaced version stays until the next prepare (jobs may still read it), then goes
    assert all(os.path.exists(path) for path in first.paths("train"))
    third = write_shards(release, out, target_file_bytes=TARGET, overwrite=True, progress=False)
    assert sorted(os.listdir(os.path.join(out, "versions"))) == [rebuilt.version, third.version]
    dropped = write_shards(release, out, target_file_bytes=10 * TARGET, overwrite=True, keep_previous=False,
                           progress=False)
    assert os.listdir(os.path.join(out, "versions")) == [dropped.version]


def fail_after_first_file(monkeypatch):
    closed = []
    close = shard_files.PartWriter.close

    def failing_close(self):
        if closed:
            raise OSError("injected: disk full")
        closed.append(self)
        return close(self)

    monkeypatch.setattr(shard_files.PartWriter, "close", failing_close)


def test_interrupted_write_leaves_no_complete_dataset(release, tmp_path, monkeypatch):
    out = str(tmp_path / "mars")
    with monkeypatch.context() as patch:
        fail_after_first_file(patch)
        with pytest.raises(OSError, match="injected"):
            write_shards(release, out, target_file_bytes=TARGET, progress=False)
    assert os.listdir(out) == ["versions"] and not os.listdir(os.path.join(out, "versions"))  # no lock either
    with pytest.raises(IncompleteDatasetError, match=f"{out}.*jobs/prepare_mars.py"):
        read_manifest(out)
    manifest = write_shards(release, out, target_file_bytes=TARGET, progress=False)
    assert read_manifest(out) == manifest


def test_interrupted_rebuild_keeps_the_old_dataset_readable(release, written, tmp_path, monkeypatch):
    out = str(tmp_path / "mars")
    old = write_shards(release, out, target_file_bytes=TARGET, progress=False)
    fail_after_first_file(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        write_shards(release, out, target_file_bytes=TARGET, overwrite=True, progress=False)
    assert read_manifest(out) == old
    verify(out)


def test_readers_refuse_missing_and_corrupt_shards(release, tmp_path):
    out = str(tmp_path / "mars")
    manifest = write_shards(release, out, target_file_bytes=TARGET, progress=False)
    first, second = manifest.paths("train")[:2]
    with open(first, "r+b") as fh:  # same size, other bytes: only the checksum sees it
        fh.seek(100)
        fh.write(b"\0" * 8)
    with pytest.raises(CorruptDatasetError, match="part-00000"):
        verify(out)
    os.remove(second)
    with pytest.raises(IncompleteDatasetError, match="part-00001.parquet is missing"):
        read_manifest(out)
    with open(manifest.manifest_path, "w") as fh:
        fh.write('{"schema_version": 1')  # cut short
    with pytest.raises(IncompleteDatasetError, match="unreadable"):
        read_manifest(out)
    with open(os.path.join(out, "current.json"), "w") as fh:
        fh.write('{"format": 1, "version": "../../etc"}')
    with pytest.raises(IncompleteDatasetError, match="current.json names no version this code reads"):
        read_manifest(out)
    with pytest.raises(IncompleteDatasetError, match="no current.json or manifest.json"):
        read_manifest(str(tmp_path / "nothing-here"))


def test_s3_round_trip_through_moto(release, written, moto_server, make_bucket):
    out = make_bucket() + "/prepared/mars"
    manifest = write_shards(release, out, target_file_bytes=TARGET, endpoint_url=moto_server, progress=False)
    assert read_manifest(out, endpoint_url=moto_server) == manifest
    for split in ("train", "test"):
        assert [(f.path, f.rows, f.sha256) for f in manifest.files[split]] == \
            [(f.path, f.rows, f.sha256) for f in written.files[split]]  # same bytes as the local shards
        assert read_split(manifest, split, moto_server).equals(read_split(written, split))
    verify(out, endpoint_url=moto_server)
    fs, root = filesystem(out, endpoint_url=moto_server)
    assert not [p for p in fs.ls(root) if ".tmp-" in p]
    assert write_shards(release, out, target_file_bytes=TARGET, endpoint_url=moto_server,
                        progress=False).reused


def test_s3_interrupted_write_is_incomplete(release, moto_server, make_bucket, monkeypatch):
    out = make_bucket() + "/mars"
    with monkeypatch.context() as patch:
        fail_after_first_file(patch)
        with pytest.raises(OSError, match="injected"):
            write_shards(release, out, target_file_bytes=TARGET, endpoint_url=moto_server, progress=False)
    with pytest.raises(IncompleteDatasetError, match=f"{out}: no current.json or manifest.json"):
        read_manifest(out, endpoint_url=moto_server)
    fs, root = filesystem(out, endpoint_url=moto_server)
    assert not fs.exists(root)  # the temporary prefix is gone too
    write_shards(release, out, target_file_bytes=TARGET, endpoint_url=moto_server, progress=False)
    verify(out, endpoint_url=moto_server)


def test_endpoint_from_environment(release, written, moto_server, make_bucket, monkeypatch):
    out = make_bucket() + "/mars"
    monkeypatch.setenv("STAL_S3_ENDPOINT", moto_server)
    write_shards(release, out, target_file_bytes=10 * TARGET, progress=False)
    assert read_manifest(out).counts == written.counts


def test_missing_bucket_fails_fast(release, moto_server):
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-here/mars: bucket 'no-such-bucket-here' "
                                           r"does not exist.*create it"):
        write_shards(release, "s3://no-such-bucket-here/mars", endpoint_url=moto_server, progress=False)
    with pytest.raises(StorageError, match="does not exist"):
        read_manifest("s3://no-such-bucket-here/mars", endpoint_url=moto_server)
    assert time.monotonic() - start < 15


def test_unreachable_endpoint_fails_fast(release, moto_server):
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach endpoint {dead}.*--endpoint-url"):
        write_shards(release, "s3://bucket/mars", endpoint_url=dead, progress=False)
    assert time.monotonic() - start < 15


def test_missing_credentials_are_named(moto_server, make_bucket, monkeypatch):
    out = make_bucket() + "/mars"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to find here
    with pytest.raises(StorageError, match="no usable AWS credentials.*AWS_ACCESS_KEY_ID"):
        filesystem(out, endpoint_url=moto_server)


def test_local_uris(tmp_path):
    for uri in (str(tmp_path / "a"), f"file://{tmp_path}/a"):
        fs, path = filesystem(uri)
        assert path == str(tmp_path / "a") and fs.protocol[0] == "file"
        arrow, path = arrow_filesystem(uri)
        assert arrow.type_name == "local" and path == str(tmp_path / "a")
    with pytest.raises(StorageError, match="empty"):
        filesystem(" ")


def test_manifest_is_plain_json(written):
    data = json.loads(open(written.manifest_path).read())
    assert set(data) == {"schema_version", "created", "source", "target_file_bytes", "counts", "files",
                         "bad_frames", "dataset"}
    assert data["dataset"]["name"] == "mars" and data["dataset"]["pollution"] is None
    assert set(data["files"]["train"][0]) == {"path", "bytes", "sha256", "rows"}


def test_unusable_local_folder_is_named(release, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    out = str(tmp_path / "a-file" / "mars")
    with pytest.raises(StorageError, match=f"{out}: cannot use this folder"):
        write_shards(release, out, progress=False)
