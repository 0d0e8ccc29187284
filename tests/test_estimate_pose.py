"""jobs/estimate_pose.py end to end on a small synthetic release: joints of a real model added to a prepared
data set in place (a new version), an interrupted run resumed, a rerun a no-op, an undecodable frame counted,
then training with pose_source=keypoints on the result and the learned head supervised by default."""

import os

import pyarrow.parquet as pq
import pytest

pytest.importorskip("ai_edge_litert", reason="the pose extra is not installed (pip install -e .[pose])")

from conftest import SMALL_RELEASE  # noqa: E402
from test_jobs import job  # noqa: E402

from stal_ray.config import KEYPOINT_SUPERVISION, load_config  # noqa: E402
from stal_ray.data.prepared import protocol, publish  # noqa: E402
from stal_ray.data.prepared.manifest import read_manifest, verify  # noqa: E402
from stal_ray.data.prepared.shards import write_shards  # noqa: E402
from stal_ray.data.releases.mars import read_mars  # noqa: E402
from stal_ray.data.synthetic.generator import write_synthetic_release  # noqa: E402
from stal_ray.pose import annotate  # noqa: E402
from stal_ray.pose.models import load_model  # noqa: E402
from stal_ray.train.trainer import build_trainer, train  # noqa: E402

OVERRIDES = [
    "model.backbone=tiny", "model.feature_dim=32", "data.seq_len=2", "data.height=32", "data.width=16",
    "data.identities_per_batch=2", "data.clips_per_identity=2", "data.decode_concurrency=1",
    "train.log_every=1", "train.checkpoint_every=100",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pose_data")
    release = write_synthetic_release(str(root / "release"), **{**SMALL_RELEASE, "height": 64, "width": 32})
    first = sorted((root / "release" / "bbox_train").rglob("*.jpg"))[0]
    # a JPEG's first segment and end marker (prepare's check keeps it) around bytes no decoder reads
    first.write_bytes(first.read_bytes()[:20] + bytes(200) + b"\xff\xd9")
    out = str(root / "shards")
    # a recorded split (not MARS's default entry), which the joints' version must keep
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False,
                 dataset=protocol.describe("mars", split=1))
    return out


def _keypoints(manifest) -> list:
    """Every frame's keypoints (a list of 42 floats, or None) of every shard, in manifest order."""
    return [frame for split in ("train", "test") for path in manifest.paths(split)
            for row in pq.read_table(path, columns=["keypoints"]).column("keypoints").to_pylist()
            for frame in row]


def test_joints_are_added_in_place_resumed_after_an_interruption_and_a_rerun_is_a_no_op(
        ray_cluster, prepared, monkeypatch, capsys):
    before = read_manifest(prepared)
    shard_count = sum(len(files) for files in before.files.values())
    assert shard_count >= 4, "the test needs several shards to interrupt a run between them"
    model = load_model()
    write_shard, written = annotate._write_shard, []

    def dies_after_two(*args, **kwargs):
        if len(written) == 2:
            raise RuntimeError("injected: the job dies")
        written.append(args[2]["file"])
        return write_shard(*args, **kwargs)

    monkeypatch.setattr(annotate, "_write_shard", dies_after_two)
    with pytest.raises(RuntimeError, match="injected"):
        annotate.estimate_pose(prepared, model, workers=2)
    during = read_manifest(prepared)  # readers still see the data set as it was, whole
    assert (during.version, during.pose) == (before.version, None)
    monkeypatch.setattr(annotate, "_write_shard", write_shard)

    capsys.readouterr()
    result = annotate.estimate_pose(prepared, model, workers=2)
    assert not result.reused and result.resumed_shards == 2
    # a line per shard, as a job's log shows them under `ray job submit`
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pose: shard ")]
    left = shard_count - 2
    assert [line.split(" (")[0] for line in progress] == [f"pose: shard {k} of {left}"
                                                          for k in range(1, left + 1)]
    assert "(100%)" in progress[-1] and progress[-1].endswith("ETA 0s")
    frames = {split: before.counts[split]["frames"] for split in ("train", "test")}
    assert sum(result.frames.values()) < sum(frames.values())  # the two finished shards were not redone
    after = read_manifest(prepared)
    assert after.version == result.manifest.version != before.version
    assert after.pose["model"]["sha256"] == model.sha256 and after.pose["model"]["name"] == "blazepose-full"
    assert after.pose["unreadable_frames"] == {"train": 1, "test": 0}
    assert after.dataset == before.dataset and after.dataset["split"] == 1
    for split in ("train", "test"):
        counts = after.counts[split]
        assert counts["frames"] == frames[split]
        assert counts["frames_with_keypoints"] == frames[split] - (split == "train")
        assert counts["pose_unreadable_frames"] == (split == "train")
    verify(prepared)  # every shard as its manifest says
    old, new = _keypoints(before), _keypoints(after)
    assert len(new) == sum(frames.values()) and sum(k is None for k in new) == 1
    assert all(o is not None for o in old)  # the synthetic release's own (ground-truth) joints ...
    assert sum(o != n for o, n in zip(old, new, strict=True)) == len(new)  # ... all replaced by the model's
    assert not os.path.exists(os.path.join(prepared, annotate.RESUME))
    assert not os.path.exists(os.path.join(prepared, publish.LOCK))

    again = annotate.estimate_pose(prepared, model, workers=2)
    assert again.reused and read_manifest(prepared).version == after.version
    assert job("estimate_pose").main(["--data", prepared]) == 0
    assert "nothing written" in capsys.readouterr().out


def test_training_runs_on_the_estimated_joints_and_the_learned_head_is_supervised_by_default(
        ray_cluster, prepared, tmp_path, capsys):
    if read_manifest(prepared).pose is None:
        annotate.estimate_pose(prepared, load_model(), workers=2)
    config = load_config(None, [*OVERRIDES, "model.pose_source=keypoints", "train.iterations=2",
                                f"train.storage_path={tmp_path}"])
    result = train(config, prepared, name="pose-keypoints")
    assert result.metrics["iteration"] == 2
    learned = load_config(None, [*OVERRIDES, "model.pose_source=learned", f"train.storage_path={tmp_path}"])
    trainer = build_trainer(learned, prepared, name="learned")
    assert trainer.train_loop_config["config"]["model"]["keypoint_supervision"] == KEYPOINT_SUPERVISION
    assert f"model.keypoint_supervision = {KEYPOINT_SUPERVISION:g}: the learned pose head trains" in \
        capsys.readouterr().out
    off = load_config(None, [*OVERRIDES, "model.pose_source=learned", "model.keypoint_supervision=0",
                             f"train.storage_path={tmp_path}"])
    assert build_trainer(off, prepared, name="off").train_loop_config["config"]["model"][
        "keypoint_supervision"] == 0
