"""Data integrity under fault injection (stal_ray/data/prepared/integrity.py, manifest.py, storage.py,
frame_check.py, tune.py): damaged shards, manifests naming files out of their data set, outputs that cannot be
written, frames that are not regular files, a search folder others can write. No Ray: every refusal comes
before it."""

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import SMALL_RELEASE
from release_layouts import make_ilidsvid

from stal_ray.config import ConfigError, load_config
from stal_ray.core import storage
from stal_ray.core.storage import StorageError
from stal_ray.data.prepared import integrity
from stal_ray.data.prepared.handle import PreparedData
from stal_ray.data.prepared.manifest import CorruptDatasetError, IncompleteDatasetError, read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.frame_check import LinkGuard, UnsafeFrameError, jpeg_problem
from stal_ray.data.releases.ilidsvid import SEQUENCES, read_ilidsvid
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.synthetic.generator import write_synthetic_release

TARGET = 20_000  # bytes per shard file: several files per split


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("integrity")
    release = write_synthetic_release(str(root / "release"), **SMALL_RELEASE)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=TARGET, progress=False)
    return out


@pytest.fixture
def copy(prepared, tmp_path) -> str:
    """A copy of the prepared data set for a test to damage."""
    out = str(tmp_path / "shards")
    shutil.copytree(prepared, out, symlinks=True)
    return out


def zero_bytes(path: str, offset: int = 100, count: int = 8) -> None:
    """Same size, other bytes: only a checksum sees it."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * count)


def edit_manifest(uri: str, change) -> None:
    (path,) = Path(uri).glob("versions/*/manifest.json")
    with open(path) as fh:
        data = json.load(fh)
    change(data)
    with open(path, "w") as fh:
        json.dump(data, fh)


# ---------------------------------------------------------------------------------------------- checksums


def test_same_size_damage_to_a_shard_is_refused_naming_it_and_the_fix(copy):
    integrity.check_shards(copy)  # intact: passes
    manifest = read_manifest(copy)
    zero_bytes(manifest.paths("test")[1])
    integrity.check_shards(copy, ("train",))  # the training split is intact
    with pytest.raises(CorruptDatasetError, match=r"test/part-00001\.parquet differs .*prepare_mars\.py"):
        integrity.check_shards(copy, ("test",))
    assert issubclass(CorruptDatasetError, StorageError)  # every job prints a StorageError in one line


def test_a_shard_is_hashed_once_until_it_changes(copy, monkeypatch, tmp_path):
    monkeypatch.setenv(integrity.CACHE_VARIABLE, str(tmp_path / "cache.json"))
    hashed = []
    real = integrity._sha256
    monkeypatch.setattr(integrity, "_sha256", lambda fs, path: hashed.append(path) or real(fs, path))
    integrity.check_shards(copy, ("train",))
    files = len(read_manifest(copy).files["train"])
    assert len(hashed) == files
    integrity.check_shards(copy, ("train",))
    assert len(hashed) == files  # the cache: nothing read again
    first = read_manifest(copy).paths("train")[0]
    zero_bytes(first)
    with pytest.raises(CorruptDatasetError, match="train/part-00000"):
        integrity.check_shards(copy, ("train",))
    assert hashed[files:] == [first]  # only the changed file hashed again
    with pytest.raises(CorruptDatasetError, match="train/part-00000"):
        integrity.check_shards(copy, ("train",))  # and still refused from the cache
    monkeypatch.setenv(integrity.CACHE_VARIABLE, "off")
    with pytest.raises(CorruptDatasetError):
        integrity.check_shards(copy, ("train",))
    assert len(hashed) == 2 * files + 1  # off: every file hashed every time


def test_training_refuses_a_damaged_shard_before_any_work(copy, tmp_path):
    from stal_ray.train.trainer import build_trainer

    zero_bytes(read_manifest(copy).paths("train")[0])
    config = load_config(None, ["model.backbone=tiny", "data.identities_per_batch=2",
                                f"train.storage_path={tmp_path / 'runs'}"])
    # before: the trainer was built and its workers read the damaged bytes (a raw pyarrow OSError at best)
    with pytest.raises(CorruptDatasetError, match="train/part-00000.parquet"):
        build_trainer(config, copy, name="damaged")


def test_the_training_job_refuses_a_damaged_test_split_in_one_line_before_training(copy, tmp_path,
                                                                                   monkeypatch, capsys):
    from test_jobs import job

    train_mars = job("train_mars")
    monkeypatch.setattr(train_mars, "init_ray", lambda address: None)  # refused before Ray is needed
    zero_bytes(read_manifest(copy).paths("test")[0])
    code = train_mars.main(["--config", str(train_mars.DEFAULT_CONFIG), "--data", copy,
                            "--storage-path", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("train_mars: error:") and "test/part-00000.parquet differs" in err
    assert not (tmp_path / "runs").exists()  # nothing trained


def tiny_model(path: str, data: str) -> str:
    from stal_ray.model.export import save_model
    from stal_ray.model.stal import STAL

    config = load_config(None, ["model.backbone=tiny", "model.feature_dim=8", "data.seq_len=4",
                                "data.height=32", "data.width=16"])
    config.data.root = data
    torch.manual_seed(0)
    save_model(path, STAL.from_config(config, num_classes=4), config, num_classes=4)
    return path


def test_evaluation_refuses_a_damaged_test_shard_instead_of_a_wrong_map(copy, tmp_path):
    from stal_ray.evaluate.evaluate import evaluate

    model = tiny_model(str(tmp_path / "model.pt"), copy)
    zero_bytes(read_manifest(copy).paths("test")[0], offset=200)
    # before: extraction ran, and a damaged JPEG table gave a lower mAP with exit code 0
    with pytest.raises(CorruptDatasetError, match="test/part-00000.parquet"):
        evaluate(model, copy, str(tmp_path / "eval"))


def test_pose_refuses_damaged_input_instead_of_rehashing_it(copy):
    from stal_ray.pose.annotate import estimate_pose
    from stal_ray.pose.models import PoseModel

    before = read_manifest(copy)
    zero_bytes(before.paths("train")[0])
    model = PoseModel("onnx", "never-run.onnx", b"", hashlib.sha256(b"").hexdigest(), "test")
    with pytest.raises(CorruptDatasetError, match="train/part-00000"):
        estimate_pose(copy, model)
    assert read_manifest(copy).version == before.version  # nothing published over the damage


# ---------------------------------------------------------------------------------------------- manifest


@pytest.mark.parametrize("path", ["../other/train/part-00000.parquet", "/tmp/elsewhere/part-00000.parquet",
                                  "train/../../../other/train/part-00000.parquet", "test/part-00000.parquet",
                                  "train/sub/part-00000.parquet", "train/..", "train\\..\\x.parquet"])
def test_a_manifest_path_out_of_its_folder_is_refused(copy, path):
    edit_manifest(copy, lambda data: data["files"]["train"][0].update(path=path))
    with pytest.raises(IncompleteDatasetError, match="a shard must be train/<name>.parquet"):
        read_manifest(copy)


def test_a_shard_linked_to_another_data_set_is_refused_and_pose_leaves_it_alone(prepared, copy):
    from stal_ray.pose.annotate import estimate_pose
    from stal_ray.pose.models import PoseModel

    # the other data set's shard, linked in place of this one's (same name, same size)
    mine, theirs = read_manifest(copy).paths("train")[0], read_manifest(prepared).paths("train")[0]
    os.remove(mine)
    os.symlink(theirs, mine)
    theirs_before = open(theirs, "rb").read()
    with pytest.raises(IncompleteDatasetError, match="links to .* outside its version folder"):
        read_manifest(copy)
    model = PoseModel("onnx", "never-run.onnx", b"", hashlib.sha256(b"").hexdigest(), "test")
    with pytest.raises(IncompleteDatasetError, match="outside its version folder"):
        estimate_pose(copy, model)
    assert open(theirs, "rb").read() == theirs_before


def test_a_duplicated_entry_and_wrong_counts_are_refused(copy):
    edit_manifest(copy, lambda data: data["files"]["train"].append(data["files"]["train"][0]))
    with pytest.raises(IncompleteDatasetError, match="names shard train/part-00000.parquet twice"):
        read_manifest(copy)
    edit_manifest(copy, lambda data: data["files"]["train"].pop())
    read_manifest(copy)
    edit_manifest(copy, lambda data: data["counts"]["test"].update(
        tracklets=data["counts"]["test"]["tracklets"] + 1))
    with pytest.raises(IncompleteDatasetError, match="rows in its test shards, but its counts say"):
        read_manifest(copy)
    edit_manifest(copy, lambda data: data["counts"]["test"].update(
        tracklets=data["counts"]["test"]["tracklets"] - 1))
    edit_manifest(copy, lambda data: data["files"]["test"][0].update(rows="3"))
    with pytest.raises(IncompleteDatasetError, match="row count, size or sha256 of the wrong type"):
        read_manifest(copy)


# ---------------------------------------------------------------------------------------------- outputs


def test_outputs_that_cannot_be_written_are_refused_before_work(copy, tmp_path):
    from stal_ray.evaluate.evaluate import evaluate
    from stal_ray.train.trainer import build_trainer

    a_file = tmp_path / "metrics.json"
    a_file.write_text("{}")
    for out in (a_file, a_file / "below"):
        with pytest.raises(StorageError, match="--out .* not a folder"):
            storage.check_output_folder(str(out), "--out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere
            with pytest.raises(StorageError, match="not writable by this user"):
                storage.check_output_folder(str(locked / "eval"), "--out")
    finally:
        locked.chmod(stat.S_IRWXU)
    storage.check_output_folder(str(tmp_path / "new" / "eval"), "--out")  # to be created: fine
    model = tiny_model(str(tmp_path / "model.pt"), copy)
    # before: features were extracted first, then FileExistsError at the report
    with pytest.raises(StorageError, match="--out .* is a file, not a folder"):
        evaluate(model, copy, str(a_file))
    config = load_config(None, ["model.backbone=tiny", f"train.storage_path={a_file}"])
    with pytest.raises(StorageError, match="storage_path.* is a file, not a folder"):
        build_trainer(config, copy, name="run")


def test_study_and_splits_refuse_an_out_that_is_a_file_before_training(tmp_path):
    from stal_ray.study.run import run_study
    from stal_ray.study.splits import SplitData, run_splits

    a_file = tmp_path / "report.md"
    a_file.write_text("")
    config = load_config(None, ["model.backbone=tiny"])
    with pytest.raises(StorageError, match="--out .* is a file, not a folder"):
        run_study(config, str(tmp_path / "no-data-needed"), str(a_file), command="test")
    data = SplitData("ilidsvid", str(tmp_path / "no-release-needed"), str(tmp_path / "data"))
    with pytest.raises(StorageError, match="--out .* is a file, not a folder"):
        run_splits(config, data, str(a_file), [0], command="test")


# ---------------------------------------------------------------------------------------------- frames


def test_a_frame_that_is_not_a_regular_file_is_refused_before_it_is_opened(tmp_path):
    release = write_synthetic_release(str(tmp_path / "release"), **SMALL_RELEASE)
    frame = read_mars(release).train[0].frames[0]
    path = os.path.join(release, frame)
    os.remove(path)
    os.mkfifo(path)  # opening it would block the prepare (holding its lock) until someone writes
    with pytest.raises(UnsafeFrameError, match="is a named pipe, not a regular file"):
        LinkGuard(release).check(frame)
    os.remove(path)
    os.symlink("/dev/zero", path)
    with pytest.raises(UnsafeFrameError, match="outside the release root"):
        LinkGuard(release).check(frame)


def test_a_bad_frame_is_recorded_without_its_bytes():
    secret = b"aws_secret_access_key = abcd1234\n"
    problem = jpeg_problem(secret)
    assert "not a JPEG" in problem and "aws" not in problem and "abcd" not in problem


def test_two_camera_readers_follow_links_inside_the_release_as_mars_does(tmp_path):
    make_ilidsvid(tmp_path)
    cam = tmp_path / SEQUENCES / "cam1"
    # a correctly named frame that is a link to a copy inside the release
    frame = sorted((cam / "person001").iterdir())[0]
    (tmp_path / "copies").mkdir()
    moved = tmp_path / "copies" / frame.name
    frame.rename(moved)
    frame.symlink_to(moved)
    # a person folder that is a link to a folder elsewhere on disk (another disk, as MARS's bbox_* may be)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-disk2"
    shutil.move(str(cam / "person002"), elsewhere)
    (cam / "person002").symlink_to(elsewhere, target_is_directory=True)
    read = read_ilidsvid(str(tmp_path), 0)
    assert {t.identity for t in read.train + read.test} >= {1, 2}


# ---------------------------------------------------------------------------------------------- tune


def test_resume_refuses_a_search_folder_others_can_write(tmp_path):
    from stal_ray.tune import check_resume_folder

    search = tmp_path / "search"
    search.mkdir()
    planted = search / "tuner.pkl"
    planted.write_bytes(b"not read")
    planted.chmod(0o644)
    search.chmod(0o755)
    check_resume_folder(str(search))  # the user's own, written by no one else: resumed
    planted.chmod(0o646)
    with pytest.raises(ConfigError, match="tuner.pkl can be written by other users"):
        check_resume_folder(str(search))
    planted.chmod(0o644)
    search.chmod(0o777)
    with pytest.raises(ConfigError, match="search can be written by other users"):
        check_resume_folder(str(search))
    search.chmod(0o755)
    check_resume_folder("s3://bucket/search")  # no owner to check: the bucket's writers are trusted


def test_a_damaged_shard_on_s3_is_refused_and_the_etag_keys_the_cache(prepared, moto_server, make_bucket,
                                                                      monkeypatch, tmp_path):
    monkeypatch.setenv(integrity.CACHE_VARIABLE, str(tmp_path / "cache.json"))
    out = make_bucket() + "/prepared"
    release = read_manifest(prepared).source["release"]
    write_shards(read_mars(release), out, target_file_bytes=TARGET, endpoint_url=moto_server, progress=False)
    integrity.check_shards(PreparedData.read(out, endpoint_url=moto_server))
    manifest = read_manifest(out, endpoint_url=moto_server)
    fs, _ = storage.filesystem(out, endpoint_url=moto_server)
    path = manifest.paths("train")[0]
    data = bytearray(fs.cat_file(path))
    data[100:108] = bytes(8)
    fs.pipe_file(path, bytes(data))  # same size, a new object: a new ETag
    with pytest.raises(CorruptDatasetError, match="train/part-00000.parquet"):
        integrity.check_shards(PreparedData.read(out, endpoint_url=moto_server))
