"""Work lost more often than Ray retries it (stal_ray/data/stream/retries.py): a stage whose worker process
dies on every call is run again a bounded number of times, then fails with a message that says what was
lost and what to do, instead of looping for ever. On a real local Ray cluster; the processes die by
os._exit, as a node's do when it is reclaimed. Each dying call appends a line to a file on this host, so the
tests count the attempts."""

import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import torch

from stal_ray.config import load_config
from stal_ray.data.prepared.manifest import read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.stream import pipeline
from stal_ray.data.stream.batches import training_batches
from stal_ray.data.stream.retries import ACTOR_RESTARTS, TASK_RETRIES, WorkLostError
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.evaluate.features import ChunkFeatures, extract_features
from stal_ray.model.export import save_model
from stal_ray.model.stal import STAL

OVERRIDES = ["model.backbone=tiny", "model.feature_dim=8", "model.pose_source=keypoints", "data.seq_len=2",
             "data.height=32", "data.width=16", "data.identities_per_batch=2", "data.clips_per_identity=2",
             "data.decode_concurrency=1"]

# the workers cannot import this test file: its dying calls travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def die(attempts: str) -> None:
    """Note an attempt in the file `attempts`, then end this worker process at once."""
    with open(attempts, "a") as out:
        out.write(f"{os.getpid()}\n")
    os._exit(1)


def attempts(path: Path) -> list[str]:
    """The process ids of the attempts noted in `path`."""
    return path.read_text().split() if path.exists() else []


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("retries")
    release = write_synthetic_release(str(root / "release"), identities=6, test_identities=4, cameras=2,
                                      tracklets_per_identity=(2, 2), frames_per_tracklet=(6, 8), height=32,
                                      width=16, junk_tracklets=0, distractor_tracklets=0)
    write_shards(read_mars(release), str(root / "shards"), progress=False)
    return str(root / "shards")


def test_a_decoding_task_that_always_dies_fails_the_training_stream_after_its_retries(
        ray_cluster, shards, monkeypatch, tmp_path):
    noted = tmp_path / "attempts"
    monkeypatch.setattr(pipeline, "_decode_clips", lambda batch, *args, **kwargs: die(str(noted)))
    config = load_config(None, OVERRIDES)
    batches = training_batches(pipeline.training_dataset(shards, config, epoch=0), 2, prefetch=0)
    with pytest.raises(WorkLostError) as error:
        next(iter(batches))
    message = str(error.value)
    print(f"\n{message}")
    assert message.startswith("training stream: Ray's retries ran out")
    assert "WorkerCrashedError" in message and "checkpoint" in message
    # the first task's attempts: one and its reruns, then the stream failed (other tasks may have begun)
    assert TASK_RETRIES + 1 <= len(attempts(noted)) <= 2 * (TASK_RETRIES + 1) * config.data.decode_concurrency


class DyingFeatures(ChunkFeatures):
    noted: str  # set by the test before the actors are made (the class travels by value)

    def __call__(self, batch):
        die(self.noted)


def test_a_feature_actor_that_always_dies_fails_extraction_after_its_restarts(ray_cluster, shards, tmp_path):
    config = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    model = str(tmp_path / "model.pt")
    save_model(model, STAL.from_config(config, num_classes=6), config, num_classes=6)
    DyingFeatures.noted = str(tmp_path / "attempts")
    test = pq.read_table(read_manifest(shards).paths("test"), columns=["frames"])
    total = sum(len(frames) for frames in test.column("frames").to_pylist())
    dataset = pipeline.evaluation_dataset(shards, config)
    with pytest.raises(WorkLostError) as error:
        extract_features(dataset, model, total_frames=total, udf=DyingFeatures, concurrency=1, batch_size=2,
                         use_gpu=False)
    message = str(error.value)
    print(f"\n{message}")
    assert message.startswith("feature extraction: Ray's retries ran out")
    assert f"0 of {total:,} frames of 0 tracklets were extracted" in message
    assert "nothing was saved: evaluate again" in message
    # the actor and its restarts, one process each; no process tried twice
    tried = attempts(Path(DyingFeatures.noted))
    assert len(tried) == len(set(tried)) == ACTOR_RESTARTS + 1


def test_a_pose_actor_that_always_dies_fails_estimation_and_keeps_the_data_set(ray_cluster, shards,
                                                                                tmp_path, monkeypatch):
    pytest.importorskip("ai_edge_litert", reason="the pose extra is not installed (pip install -e .[pose])")
    from stal_ray.pose import annotate
    from stal_ray.pose.models import load_model

    noted = str(tmp_path / "attempts")

    class DyingPoseEstimator(annotate.PoseEstimator):
        def __call__(self, batch):
            die(noted)

    monkeypatch.setattr(annotate, "PoseEstimator", DyingPoseEstimator)
    before = read_manifest(shards)
    with pytest.raises(WorkLostError) as error:
        annotate.estimate_pose(shards, load_model(), workers=1)
    message = str(error.value)
    print(f"\n{message}")
    assert message.startswith("pose estimation: Ray's retries ran out")
    assert "shards not written: " in message and "run again to do the rest" in message
    tried = attempts(Path(noted))
    assert len(tried) == len(set(tried)) == ACTOR_RESTARTS + 1
    after = read_manifest(shards)
    assert after.version == before.version, "a failed run published a version"
