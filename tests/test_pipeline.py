"""Tests of data.images and data.pipeline on a local Ray cluster: batches, coverage, corrupt frames, the
validation split's streams."""

import copy
import dataclasses
import io
import json
import os
import shutil
import threading
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stal_ray.config import Config
from stal_ray.core.preprocess import IMAGENET
from stal_ray.data.prepared.manifest import read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.prepared.validation import ensure_validation_split
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.stream.augment import Augmentation
from stal_ray.data.stream.batches import training_batches
from stal_ray.data.stream.images import decode_frames
from stal_ray.data.stream.pipeline import (
    _decode_clips,
    evaluation_dataset,
    identity_labels,
    training_dataset,
    validation_dataset,
)
from stal_ray.data.stream.sampling import epoch_plan
from stal_ray.data.synthetic.generator import write_synthetic_release

P, K, T, H, W = 3, 2, 4, 16, 8
# what evaluation_dataset's rows hold, and validation_dataset's the same
EVALUATION_COLUMNS = {"tracklet", "identity", "camera", "is_query", "chunk", "valid", "clips", "keypoints",
                      "has_keypoints", "corrupt_frames"}


def jpeg(height=32, width=16, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_decode_frames_resizes_and_flags_a_truncated_jpeg():
    good = jpeg()
    frames, ok = decode_frames([good, good[: len(good) // 2], b"not a jpeg"], 16, 8)
    assert frames.shape == (3, 16, 8, 3) and frames.dtype == np.uint8
    assert ok.tolist() == [True, False, False]
    assert abs(int(frames[0, ..., 0].mean()) - 200) < 10 and (frames[1:] == 0).all()


@pytest.fixture(scope="module")
def config() -> Config:
    config = Config()
    config.data.seq_len, config.data.height, config.data.width = T, H, W
    config.data.identities_per_batch, config.data.clips_per_identity = P, K
    config.data.decode_concurrency = 1  # one actor starts faster; the tests measure no speed
    return config


@pytest.fixture(scope="module")
def dataset_uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pipeline")
    release = write_synthetic_release(str(root / "release"), identities=8, test_identities=3, cameras=3,
                                      tracklets_per_identity=(1, 3), frames_per_tracklet=(3, 10), height=32,
                                      width=16, junk_tracklets=1, distractor_tracklets=1)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False)
    return out


def train_table(uri: str) -> pa.Table:
    return pa.concat_tables(pq.read_table(path) for path in read_manifest(uri).paths("train"))


@pytest.fixture(scope="module")
def epoch(ray_cluster, dataset_uri, config):
    """Every batch of one training epoch, the last one partial (drop_last=False), read once for the tests."""
    return list(training_batches(training_dataset(dataset_uri, config), P, seed=0, drop_last=False))


def test_batches_hold_p_distinct_identities_of_k_clips(epoch, dataset_uri):
    labels = identity_labels(dataset_uri)
    assert len(epoch) >= 2
    for index, batch in enumerate(epoch):
        counts = Counter(batch["identities"].tolist())
        assert set(counts.values()) == {K}  # K clips of each identity, identities all different
        assert len(counts) == P or index == len(epoch) - 1
        assert batch["clips"].shape == (len(counts) * K, T, 3, H, W)
        assert [labels[label] for label in batch["labels"].tolist()] == batch["identities"].tolist()


def test_augmentation_in_the_stream_is_each_plain_groups_augmentation(ray_cluster, dataset_uri, config):
    """The decoding tasks augment each group as data.augment does on its own (whatever batch it is
    decoded in), and with the switches off leave it as decoded."""
    augmented = copy.deepcopy(config)
    augmented.data.flip, augmented.data.crop_padding, augmented.data.random_erasing = True, 2, 0.5
    augmented.data.color_jitter = 0.2
    plain = {(row["identity"], row["group"]): row for row in training_dataset(dataset_uri, config).take_all()}
    rows = training_dataset(dataset_uri, augmented).take_all()
    assert len(rows) == len(plain)
    augmentation = Augmentation.from_config(augmented, epoch=0)
    for row in rows:
        base = plain[(row["identity"], row["group"])]
        clips, keypoints = augmentation(base["clips"][None].copy(), base["keypoints"][None].copy(),
                                        np.array([row["identity"]]), np.array([row["group"]]))
        np.testing.assert_array_equal(row["clips"], clips[0])
        np.testing.assert_array_equal(row["keypoints"], keypoints[0])
    assert sum(not np.array_equal(row["clips"], plain[(row["identity"], row["group"])]["clips"])
               for row in rows) > len(rows) // 2


def test_keypoints_are_scaled_to_the_resized_frame(epoch):
    keypoints = torch_cat([batch["keypoints"] for batch in epoch])
    assert keypoints.shape[1:] == (T, 14, 3)
    seen = keypoints[keypoints[..., 2] > 0]
    assert len(seen) and (seen[:, 0] <= W).all() and (seen[:, 1] <= H).all() and (seen[:, :2] >= 0).all()


def test_every_tracklet_used_over_an_epoch(epoch, dataset_uri):
    table = train_table(dataset_uri)
    expected = {t for row in table.column("tracklet").to_pylist() for t in row}
    assert {t for batch in epoch for t in batch["tracklets"].tolist()} == expected


def test_streaming_split_shards_give_balanced_batches(epoch, dataset_uri, config):
    shards = training_dataset(dataset_uri, config, epoch=2).streaming_split(2, equal=False)
    results = [None, None]

    def consume(rank):  # the shards of a streaming split are read at the same time, as train workers do
        results[rank] = list(training_batches(shards[rank], P, seed=rank, drop_last=False))

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    groups = 0
    for batches in results:
        for batch in batches:
            assert set(Counter(batch["identities"].tolist()).values()) == {K}
            groups += len(batch["identities"]) // K
    # every group went to exactly one worker (the number of groups does not depend on the epoch)
    assert groups == sum(len(batch["identities"]) // K for batch in epoch)


@pytest.mark.parametrize("train_seed, data_seed, plan_seed", [(0, None, 0), (7, 2, 2)])
def test_the_stream_emits_the_epochs_plan_in_its_order(ray_cluster, dataset_uri, config, train_seed,
                                                       data_seed, plan_seed):
    """Groups leave the read tasks in the plan's order (identities mixed over the whole training set, not
    in the shards' order), each with the plan's frames; the plan is data.seed's when set, else train.seed's
    (the initialisation's seed then changes nothing in the stream)."""
    import copy

    import ray.data

    config = copy.deepcopy(config)
    config.train.seed, config.data.seed = train_seed, data_seed
    config.data.mixing = "global"  # the plan below is the global mix (the default, shards, follows files)
    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        rows = training_dataset(dataset_uri, config, epoch=3).take_all()
    finally:
        context.execution_options.preserve_order = before
    table = train_table(dataset_uri)
    tracklets = {identity: np.array(row) for identity, row in
                 zip(table.column("identity").to_pylist(), table.column("tracklet").to_pylist(), strict=True)}
    plan = epoch_plan(tracklets, clips_per_identity=K, seq_len=T, identities_per_batch=P,
                      seed=plan_seed, epoch=3, max_groups=config.data.max_groups_per_identity)
    assert [int(row["identity"]) for row in rows] == plan.identity.tolist()
    assert [int(row["group"]) for row in rows] == plan.group.tolist()
    for row, identity, positions in zip(rows, plan.identity, plan.positions, strict=True):
        np.testing.assert_array_equal(row["tracklets"], tracklets[int(identity)][positions[:, 0]])
    assert plan.identity.tolist() != sorted(plan.identity.tolist())


def torch_cat(tensors):
    import torch

    return torch.cat(tensors)


def test_corrupt_jpeg_is_skipped_and_counted(ray_cluster, dataset_uri, config, tmp_path):
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(dataset_uri, corrupt)
    # truncate every frame of the first identity: whatever frames are sampled, its groups are corrupt
    stored = read_manifest(corrupt)
    path = stored.paths("train")[0]
    table = pq.read_table(path)
    field = table.schema.field("frames")
    frames = table.column("frames").to_pylist()
    frames[0] = [frame[: len(frame) // 3] for frame in frames[0]]
    table = table.set_column(table.schema.get_field_index("frames"), field, pa.array(frames, field.type))
    pq.write_table(table, path)
    # the manifest records shard sizes: record the edited one's so read_manifest accepts it
    manifest_path = stored.manifest_path
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    manifest["files"]["train"][0]["bytes"] = os.path.getsize(path)
    with open(manifest_path, "w") as fh:
        json.dump(manifest, fh)

    bad_identity = table.column("identity")[0].as_py()
    batches = training_batches(training_dataset(corrupt, config), P, seed=0, drop_last=False)
    seen = {i for batch in batches for i in batch["identities"].tolist()}
    assert bad_identity not in seen and len(seen) == len(identity_labels(corrupt)) - 1
    assert batches.skipped_groups >= 1 and batches.corrupt_frames >= K * T


def test_evaluation_chunks_cover_every_test_frame_once(ray_cluster, dataset_uri, config):
    tables = [pq.read_table(path) for path in read_manifest(dataset_uri).paths("test")]
    lengths = {row["tracklet"]: len(row["frames"]) for t in tables for row in t.to_pylist()}
    covered = Counter()
    for row in evaluation_dataset(dataset_uri, config).iter_rows():
        assert set(row) == EVALUATION_COLUMNS
        assert row["clips"].shape == (T, H, W, 3) and 1 <= row["valid"] <= T
        for frame in range(row["chunk"] * T, row["chunk"] * T + row["valid"]):
            covered[(row["tracklet"], frame)] += 1
    assert covered == Counter({(t, f): 1 for t, n in lengths.items() for f in range(n)})


def test_a_fixed_sequence_length_takes_that_many_frames_of_every_tracklet(ray_cluster, dataset_uri, config):
    tables = [pq.read_table(path) for path in read_manifest(dataset_uri).paths("test")]
    lengths = {row["tracklet"]: len(row["frames"]) for t in tables for row in t.to_pylist()}
    length = T + 1  # two chunks, the second with one real frame

    def frames_used(seed):
        used = Counter()
        for row in evaluation_dataset(dataset_uri, config, sequence_length=length, seed=seed).iter_rows():
            used[row["tracklet"]] += row["valid"]
            if row["chunk"] == 1:
                assert row["valid"] == 1 and (row["clips"] == row["clips"][:1]).all()  # padded by its frame
        return used

    assert frames_used(0) == {t: length for t in lengths}


@pytest.fixture(scope="module")
def split(dataset_uri):
    return ensure_validation_split(dataset_uri, 0.25, seed=0)


def test_held_out_identities_are_left_out_of_training(ray_cluster, dataset_uri, config, split):
    assert len(split.identities) == 2
    labels = identity_labels(dataset_uri, exclude_identities=split.identities)
    assert labels == sorted(set(identity_labels(dataset_uri)) - set(split.identities))
    dataset = training_dataset(dataset_uri, config, epoch=1, exclude_identities=split.identities)
    batches = list(training_batches(dataset, P, seed=0, drop_last=False))
    assert {i for batch in batches for i in batch["identities"].tolist()} == set(labels)
    for batch in batches:
        assert [labels[label] for label in batch["labels"].tolist()] == batch["identities"].tolist()
    # and every tracklet of the identities still trained on is used
    table = train_table(dataset_uri)
    expected = {t for row in table.to_pylist() if row["identity"] in labels for t in row["tracklet"]}
    assert {t for batch in batches for t in batch["tracklets"].tolist()} == expected


def test_validation_chunks_cover_every_held_out_frame_once(ray_cluster, dataset_uri, config, split):
    tracklets, lengths = {}, Counter()
    for row in train_table(dataset_uri).to_pylist():
        if row["identity"] in split.identities:
            for tracklet, camera in zip(row["tracklet"], row["camera"], strict=True):
                tracklets[tracklet] = (row["identity"], camera)
                lengths[tracklet] += 1
    assert sorted(tracklets) == split.tracklets
    covered = Counter()
    for row in validation_dataset(dataset_uri, config, split).iter_rows():
        assert set(row) == EVALUATION_COLUMNS
        assert row["clips"].shape == (T, H, W, 3) and 1 <= row["valid"] <= T
        assert (row["identity"], row["camera"]) == tracklets[row["tracklet"]]
        assert row["is_query"] == (row["tracklet"] in split.query_tracklets)
        for frame in range(row["chunk"] * T, row["chunk"] * T + row["valid"]):
            covered[(row["tracklet"], frame)] += 1
    assert covered == Counter({(t, f): 1 for t, n in lengths.items() for f in range(n)})


def test_validation_split_of_another_data_set_is_refused(dataset_uri, config, split):
    stale = dataclasses.replace(split, dataset="fingerprint of an earlier build")
    with pytest.raises(ValueError, match="ensure_validation_split again"):
        validation_dataset(dataset_uri, config, stale)


class FakeSource:
    """Stands for a dataset: iter_batches of groups as the decoding stage emits them, in a fixed order."""

    def __init__(self, identities, corrupt=()):
        n = len(identities)
        self.batch = {
            "label": np.arange(n), "identity": np.asarray(identities),
            "tracklets": np.zeros((n, K), np.int32), "clips": np.zeros((n, K, T, H, W, 3), np.uint8),
            "keypoints": np.zeros((n, K, T, 14, 3), np.float32),
            "has_keypoints": np.zeros(n, bool),
            "corrupt_frames": np.asarray([3 if i in corrupt else 0 for i in range(n)]),
        }

    def iter_batches(self, **kwargs):
        yield self.batch


def test_groups_of_one_identity_wait_for_a_later_batch():
    # all groups of identity 1 arrive together, as one row's expansion does
    batches = training_batches(FakeSource([1, 1, 1, 2, 3, 4, 5, 6]), P, shuffle_buffer=0, drop_last=False)
    identities = [sorted(set(batch["identities"].tolist())) for batch in batches]
    assert identities[:2] == [[1, 2, 3], [1, 4, 5]]
    assert sum(len(ids) for ids in identities) == 8 and all(len(set(ids)) == len(ids) for ids in identities)
    assert batches.skipped_groups == 0


def test_corrupt_groups_are_skipped_without_ray():
    batches = training_batches(FakeSource([1, 2, 3, 4], corrupt={1}), P, shuffle_buffer=0)
    assert [sorted(set(b["identities"].tolist())) for b in batches] == [[1, 3, 4]]
    assert (batches.skipped_groups, batches.corrupt_frames) == (1, 3)


def test_uint8_clips_normalised_later_equal_the_normalised_ones():
    source = FakeSource([1, 2, 3])
    source.batch["clips"] = np.random.default_rng(0).integers(0, 256, (3, K, T, H, W, 3), dtype=np.uint8)
    (normalised,) = training_batches(source, P, shuffle_buffer=0)
    raw_batches = training_batches(source, P, shuffle_buffer=0, normalize=False)
    (raw,) = raw_batches
    assert raw["clips"].dtype == torch_uint8() and raw["clips"].shape == (P * K, T, 3, H, W)
    assert normalised["clips"].dtype == normalised["clips"].float().dtype
    assert (raw_batches.normalized(raw["clips"]) - normalised["clips"]).abs().max() < 1e-5
    # channel c of the normalised clip is (pixel - mean_c) / std_c of the stored frame's channel c
    pixel = source.batch["clips"][0, 0, 0, 0, 0]
    expected = (pixel - np.array(IMAGENET.mean)) / np.array(IMAGENET.std)
    assert np.allclose(normalised["clips"][0, 0, :, 0, 0].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_training_loop_feeds_uint8_and_float_batches_alike(dtype):
    # on a GPU the loop takes uint8 batches and normalises on the device; on a CPU, float batches as they are
    import torch

    from stal_ray.train.loop import model_input

    source = FakeSource([1, 2, 3])
    source.batch["clips"] = np.random.default_rng(1).integers(0, 256, (3, K, T, H, W, 3), dtype=np.uint8)
    as_float, as_uint8 = (training_batches(source, P, shuffle_buffer=0, normalize=n) for n in (True, False))
    dtype = getattr(torch, dtype)
    (a,), (b,) = as_float, as_uint8
    inputs = [model_input(a["clips"], as_float, torch.device("cpu"), dtype),
              model_input(b["clips"], as_uint8, torch.device("cpu"), dtype)]
    assert all(x.dtype == dtype and x.is_contiguous() and x.shape == (P * K, T, 3, H, W) for x in inputs)
    assert torch.equal(inputs[0], inputs[1])


def torch_uint8():
    import torch

    return torch.uint8


@pytest.mark.parametrize("normalize", [False, True])
def test_batch_memory_is_reused_only_once_the_batch_is_dropped(normalize):
    # six identities, P = 3: two batches per pass; every group's clips hold its identity
    identities = [1, 2, 3, 4, 5, 6]
    source = FakeSource(identities)
    source.batch["clips"] = np.asarray(identities, np.uint8).reshape(-1, 1, 1, 1, 1, 1) * np.ones(
        (1, K, T, H, W, 3), np.uint8)
    batches = training_batches(source, P, shuffle_buffer=0, normalize=normalize)

    def first_pixel(batch):
        return batch["clips"][:, 0, 0, 0, 0] if normalize else batch["clips"][:, 0, 0, 0, 0].float()

    kept = [batch for batch in batches] + [batch for batch in batches]  # nothing dropped: nothing reused
    assert len({batch["clips"].data_ptr() for batch in kept}) == 4
    expected = [first_pixel(batch).clone() for batch in kept]
    for _ in batches:  # a third pass may only take memory that no batch in `kept` uses
        pass
    assert all(torch_equal(first_pixel(batch), value) for batch, value in zip(kept, expected, strict=True))

    pointers = set()
    for batch in batches:  # each batch dropped before the one after the next: two arrays are enough
        pointers.add(batch["clips"].data_ptr())
    for batch in batches:
        pointers.add(batch["clips"].data_ptr())
    assert len(pointers) <= 2


def torch_equal(a, b):
    return bool((a == b).all())


def jpeg_group(value: int, frames: int = 4) -> pa.Table:
    """One row as the decoding tasks get it: `frames` JPEGs of one grey level, no keypoints."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((H, W, 3), value, np.uint8)).save(buffer, "JPEG", quality=95)
    return pa.table({"label": [0], "frames": pa.FixedSizeListArray.from_arrays(
        pa.array([buffer.getvalue()] * frames, pa.binary()), frames),
        "keypoints": pa.FixedSizeListArray.from_arrays(pa.array(np.full(frames * 42, np.nan, np.float32)),
                                                       frames * 42)})


def test_a_decoded_output_is_decoded_over_only_once_nothing_holds_it():
    # a decoding task's arrays are reused, as Ray lets go of an output once it is in the object store
    def decode(value):
        return _decode_clips(jpeg_group(value), height=H, width=W, clip_shape=(4,))["clips"]

    held = decode(40)
    again = decode(200)
    assert abs(int(held.mean()) - 40) <= 2 and abs(int(again.mean()) - 200) <= 2  # held: not overwritten
    pointer = again.__array_interface__["data"][0]
    del again
    assert decode(120).__array_interface__["data"][0] == pointer  # dropped: its memory is decoded into again


def test_each_decoded_block_is_one_array(ray_cluster, config, tmp_path):
    # one file per split: every group (or chunk) of the data set reaches a single decoding task, which must
    # still hand each block over as one array, not several outputs joined (the consumer would copy to join)
    release = write_synthetic_release(str(tmp_path / "release"), identities=6, test_identities=3, cameras=2,
                                      tracklets_per_identity=(2, 3), frames_per_tracklet=(8, 16), height=32,
                                      width=16, junk_tracklets=0, distractor_tracklets=0)
    uri = str(tmp_path / "shards")
    write_shards(read_mars(release), uri, progress=False)
    assert len(read_manifest(uri).paths("train")) == 1
    for dataset in (training_dataset(uri, config), evaluation_dataset(uri, config)):
        blocks = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        assert sum(block.num_rows for block in blocks) > 8  # more rows than any fixed small decoding batch
        assert all(block.column("clips").num_chunks == 1 for block in blocks)
