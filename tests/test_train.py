"""Training under Ray Train + DeepSpeed on CPU: ZeRO stages, resumption, a killed worker, a NaN loss."""

import pyarrow.parquet as pq
import pytest
import torch

from stal_ray.config import ConfigError, load_config
from stal_ray.data.prepared.manifest import read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.prepared.validation import ensure_validation_split
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.model.export import load_model, load_model_config
from stal_ray.train.deepspeed import deepspeed_config
from stal_ray.train.loop import seed_everything
from stal_ray.train.tensorboard import read_scalars
from stal_ray.train.trainer import NoBatchError, NonFiniteLossError, build_trainer, train

# Tiny everything: each run is a few optimiser steps of the tiny CNN on 32×16 frames.
OVERRIDES = [
    "model.backbone=tiny", "model.feature_dim=32", "model.pose_source=keypoints",
    "data.seq_len=2", "data.height=32", "data.width=16", "data.identities_per_batch=2",
    "data.clips_per_identity=2", "data.decode_concurrency=1",
    "train.lr=0.01", "train.log_every=1", "train.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def shards_uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("train_data")
    release = write_synthetic_release(str(root / "release"), identities=6, test_identities=3, cameras=2,
                                      tracklets_per_identity=(2, 3), frames_per_tracklet=(4, 8),
                                      height=32, width=16, junk_tracklets=1, distractor_tracklets=1)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False)
    return out


def make_config(tmp_path, *overrides):
    return load_config(None, OVERRIDES + [f"train.storage_path={tmp_path}", *overrides])


def state_dict(path: str) -> dict[str, torch.Tensor]:
    model, _, _ = load_model(path)
    return model.state_dict()


# ZeRO stage 2 (optimiser states and gradients partitioned); two workers at stage 0 train in the killed-worker
# test below, and every ZeRO stage's checkpoint is loaded in test_checkpoints
@pytest.mark.parametrize("zero_stage", [2])
def test_two_workers_train_under_deepspeed(ray_cluster, shards_uri, tmp_path, zero_stage):
    config = make_config(tmp_path, "train.num_workers=2", "train.iterations=4",
                         f"train.zero_stage={zero_stage}")
    result = train(config, shards_uri, name=f"zero{zero_stage}")
    assert result.metrics["iteration"] == 4
    for term in ("triplet_global", "triplet_local", "softmax", "consistency", "total"):
        assert torch.isfinite(torch.tensor(result.metrics[f"loss_{term}"]))
    assert result.metrics["lr"] == pytest.approx(0.01)
    assert 0 <= result.metrics["data_wait_share"] <= 1 and result.metrics["clips_per_s"] > 0
    assert 0 < result.metrics["data_wait_share_run"] <= 1
    _, loaded_config, meta = load_model(result.model_path)
    assert loaded_config.train.zero_stage == zero_stage and meta["num_classes"] == 6
    # the run folder holds the resolved settings and TensorBoard events of every report, the last at 4
    assert load_config(f"{result.run_dir}/config.yaml").train.zero_stage == zero_stage
    scalars = read_scalars(result.run_dir)
    for tag in ("loss/total", "loss/triplet_local", "train/lr", "train/clips_per_s", "train/data_wait_share"):
        assert scalars[tag][-1][0] == 4, tag


def test_training_beyond_the_paper_with_bnneck_adam_warm_up_cosine_and_label_smoothing(ray_cluster,
                                                                                      shards_uri, tmp_path):
    config = make_config(tmp_path, "train.iterations=4", "train.optimizer=adam", "train.lr_schedule=cosine",
                         "train.warmup_iterations=8", "train.label_smoothing=0.1", "model.bnneck=true")
    result = train(config, shards_uri, name="beyond")
    assert result.metrics["iteration"] == 4
    assert result.metrics["lr"] == pytest.approx(0.01 * (0.1 + 0.9 * 4 / 8))  # half-way through the warm-up
    for term in ("triplet_global", "triplet_local", "softmax", "consistency", "total"):
        assert torch.isfinite(torch.tensor(result.metrics[f"loss_{term}"]))
    _, loaded_config, _ = load_model(result.model_path)
    assert (loaded_config.train.optimizer, loaded_config.train.label_smoothing) == ("adam", 0.1)
    assert loaded_config.model.bnneck


def test_resumed_run_equals_uninterrupted_run(ray_cluster, shards_uri, tmp_path):
    deterministic = ("train.deterministic=true", "train.checkpoint_every=100")
    whole = train(make_config(tmp_path, "train.iterations=6", *deterministic), shards_uri, name="whole")
    train(make_config(tmp_path, "train.iterations=3", *deterministic), shards_uri, name="split")
    resumed = train(make_config(tmp_path, "train.iterations=6", *deterministic), shards_uri, name="split",
                    allow_changed_config=True)  # trained on to 6 iterations: a change of the run, recorded
    assert resumed.metrics["iteration"] == 6
    expected, got = state_dict(whole.model_path), state_dict(resumed.model_path)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_killed_worker_is_replaced_and_training_finishes(ray_cluster, shards_uri, tmp_path):
    config = make_config(tmp_path, "train.num_workers=2", "train.iterations=6", "train.max_failures=1")
    marker = tmp_path / "crashed"
    result = train(config, shards_uri, name="crash",
                   faults={"crash_at_step": 3, "crash_rank": 1, "crash_marker": str(marker)})
    assert marker.exists(), "the fault was not injected"
    assert result.metrics["iteration"] == 6


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(ray_cluster, shards_uri,
                                                                           tmp_path):
    config = make_config(tmp_path, "train.iterations=8", "train.max_failures=3")
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, iteration 3 .*checkpoint_00000002"):
        train(config, shards_uri, name="nan", faults={"nan_at_step": 3})
    assert list((tmp_path / "nan").glob("checkpoint_00000002_*")), "the last good checkpoint was removed"


@pytest.fixture(scope="module")
def undecodable_shards(tmp_path_factory) -> str:
    """A data set whose every training frame has whole JPEG markers around bytes no decoder reads: it
    passes prepare's marker check and its shards' checksums, and no frame decodes."""
    root = tmp_path_factory.mktemp("train_data_undecodable")
    release = write_synthetic_release(str(root / "release"), identities=4, test_identities=2, cameras=2,
                                      tracklets_per_identity=(2, 2), frames_per_tracklet=(3, 4),
                                      height=32, width=16)
    for frame in (root / "release" / "bbox_train").rglob("*.jpg"):
        frame.write_bytes(frame.read_bytes()[:20] + bytes(200) + b"\xff\xd9")
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False)
    return out


def test_frames_that_never_decode_stop_the_run_once_naming_them(ray_cluster, undecodable_shards, tmp_path):
    config = make_config(tmp_path, "model.pose_source=prior", "train.iterations=4", "train.max_failures=2")
    # before: a RuntimeError in every worker group, retried max_failures times, then a WorkerGroupError
    with pytest.raises(NoBatchError, match=r"epoch 0 .*no batch: all \d+ clip groups had frames that do not "
                                           r"decode \(first: identity \d+, track-table rows \[.*\]; frames "
                                           r"that do not decode: track-table row \d+ \(camera \d\), "
                                           r"frame \d+"):
        train(config, undecodable_shards, name="undecodable")


def test_the_frames_that_do_not_decode_are_named_from_the_shards(undecodable_shards, shards_uri):
    from stal_ray.data.stream.pipeline import undecodable_frames

    table = pq.ParquetDataset(read_manifest(undecodable_shards).paths("train")).read()
    row = table.slice(0, 1).to_pylist()[0]
    first = row["tracklet"][0]
    named = undecodable_frames(undecodable_shards, row["identity"], [first], limit=2)
    assert named == [f"track-table row {first} (camera {row['camera'][0]}), frame {n}"
                     for n in row["frame_index"][:2]]
    intact = pq.ParquetDataset(read_manifest(shards_uri).paths("train")).read().slice(0, 1).to_pylist()[0]
    assert undecodable_frames(shards_uri, intact["identity"], set(intact["tracklet"])) == []


def test_deepspeed_config_follows_the_train_settings(tmp_path):
    config = make_config(tmp_path, "train.zero_stage=2", "train.grad_accumulation=4", "train.grad_clip=5",
                         "train.precision=bf16")
    on_gpu = deepspeed_config(config, on_gpu=True)
    assert on_gpu["zero_optimization"]["stage"] == 2 and on_gpu["gradient_accumulation_steps"] == 4
    assert on_gpu["gradient_clipping"] == 5 and on_gpu["bf16"] == {"enabled": True}
    assert on_gpu["train_micro_batch_size_per_gpu"] == 4  # P·K clips
    assert "bf16" not in deepspeed_config(config, on_gpu=False)  # CPU trains in fp32


def test_sync_batchnorm_on_cpu_is_refused_before_workers_start(ray_cluster, shards_uri, tmp_path):
    config = make_config(tmp_path, "train.sync_batchnorm=true")
    with pytest.raises(ConfigError, match="sync_batchnorm.*GPU"):
        build_trainer(config, shards_uri, name="syncbn")


@pytest.fixture(scope="module")
def shards_without_keypoints(tmp_path_factory) -> str:
    """A MARS-layout data set with no keypoint file, as the real release is."""
    root = tmp_path_factory.mktemp("train_data_no_keypoints")
    release = read_mars(write_synthetic_release(str(root / "release"), identities=6, test_identities=3,
                                                cameras=2, tracklets_per_identity=(2, 3),
                                                frames_per_tracklet=(4, 8), height=32, width=16))
    release.keypoints_path = None
    out = str(root / "shards")
    write_shards(release, out, target_file_bytes=20_000, progress=False)
    return out


def test_keypoint_pose_source_on_data_without_keypoints_is_refused_in_the_driver(shards_without_keypoints,
                                                                                 tmp_path):
    with pytest.raises(ConfigError, match="model.pose_source = keypoints.*no keypoints.*pose_source=learned"):
        build_trainer(make_config(tmp_path), shards_without_keypoints, name="no-keypoints")
    learned = make_config(tmp_path, "model.pose_source=learned")
    build_trainer(learned, shards_without_keypoints, name="learned")


def test_more_identities_per_batch_than_the_data_has_is_refused_in_the_driver(shards_uri, tmp_path):
    # 6 training identities; 2 workers each need batches of 4 distinct ones
    config = make_config(tmp_path, "data.identities_per_batch=4", "train.num_workers=2")
    with pytest.raises(ConfigError, match="identities_per_batch = 4 .* needs at least 8 .* leaves 6"):
        build_trainer(config, shards_uri, name="too-many")


def test_the_model_file_records_the_data_it_was_trained_on(shards_uri, tmp_path):
    trainer = build_trainer(make_config(tmp_path), shards_uri, name="records-data")
    assert trainer.train_loop_config["config"]["data"]["root"] == shards_uri


def test_a_validated_run_keeps_its_best_model_and_says_which(ray_cluster, shards_uri, tmp_path):
    split = ensure_validation_split(shards_uri, 0.3, 0)
    config = make_config(tmp_path, "train.iterations=6", "train.checkpoint_every=1",
                         "train.keep_checkpoints=1", "data.val_identities=0.3", "tune.fusion_rates=[0.3]")
    result = train(config, shards_uri, name="best", validation=split)
    best = result.metrics["best_iteration"]
    assert 1 <= best <= 6 and result.metrics["best_score"] >= result.metrics["val_mAP"]
    _, meta = load_model_config(result.model_path)
    assert meta["extra"] == {"iteration": best, "selected_by": "best val_mAP",
                             "score": result.metrics["best_score"],
                             "data": {"uri": shards_uri, "name": "mars", "split": None, "pollution": None}}
    # Ray Train kept the checkpoint of that same iteration (it scores checkpoints by the same metric), and
    # the latest one besides, which a resumed run starts from
    kept = sorted(path.name.split("_")[1] for path in (tmp_path / "best").glob("checkpoint_0*"))
    assert kept == sorted({f"{best:08d}", "00000006"})


def test_deterministic_runs_switch_on_deterministic_kernels(tmp_path):
    try:
        seed_everything(make_config(tmp_path, "train.deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)


def test_decoding_at_the_consumer_trains_and_validates_as_the_stream_does(ray_cluster, shards_uri, tmp_path):
    """data.decode_at=consumer end to end: the workers decode and augment the JPEG rows, rank 0's validation
    decodes its chunks, and the run (deterministic) ends with the stream run's weights and metrics."""
    split = ensure_validation_split(shards_uri, 0.3, 0)
    common = ("train.iterations=4", "train.deterministic=true", "data.val_identities=0.3",
              "tune.fusion_rates=[0.3]", "data.flip=true", "data.crop_padding=2", "data.color_jitter=0.2",
              "data.random_erasing=0.5")
    results = {mode: train(make_config(tmp_path, *common, f"data.decode_at={mode}"), shards_uri,
                           name=f"decode-{mode}", validation=split) for mode in ("stream", "consumer")}
    stream, consumer = results["stream"], results["consumer"]
    assert consumer.metrics["iteration"] == 4 and consumer.metrics["skipped_groups"] == 0
    for name in ("loss_total", "val_mAP", "best_iteration"):
        assert consumer.metrics[name] == stream.metrics[name], name
    expected, got = state_dict(stream.model_path), state_dict(consumer.model_path)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
