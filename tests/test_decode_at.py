"""data.decode_at: JPEG decoded in the stream's tasks or at the consumer (data.consumer) gives the model the
same input, to the bit, on the same seed: training batches (uint8 and float, with and without augmentation)
and evaluation chunks; corrupt frames found at the consumer are skipped and counted as the stream does."""

import gc
import io
import threading

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from PIL import Image

from stal_ray.config import Config
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.stream.augment import Augmentation
from stal_ray.data.stream.batches import training_batches
from stal_ray.data.stream.consumer import ConsumerDecoder, encoded_rows
from stal_ray.data.stream.pipeline import evaluation_dataset, training_dataset
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.evaluate.features import ChunkFeatures
from stal_ray.model.stal import STAL

P, K, T = 3, 2, 4


def make_config(height: int, width: int, decode_at: str, augment: bool = False) -> Config:
    config = Config()
    data = config.data
    data.seq_len, data.height, data.width = T, height, width
    data.identities_per_batch, data.clips_per_identity = P, K
    data.decode_concurrency, data.decode_at = 1, decode_at
    if augment:
        data.flip, data.crop_padding, data.color_jitter, data.random_erasing = True, 2, 0.2, 0.5
    return config


@pytest.fixture(scope="module")
def dataset_uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("decode_at")
    release = write_synthetic_release(str(root / "release"), identities=8, test_identities=3, cameras=3,
                                      tracklets_per_identity=(1, 3), frames_per_tracklet=(3, 10), height=32,
                                      width=16, junk_tracklets=1, distractor_tracklets=1)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False)
    return out


@pytest.fixture
def ordered(ray_cluster):
    """Blocks in order through every stage, as train.deterministic keeps them."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    yield
    options.preserve_order = before


def epoch_batches(uri: str, config: Config, normalize: bool) -> list[dict]:
    decoder = ConsumerDecoder.from_config(config, epoch=0, threads=2) \
        if config.data.decode_at == "consumer" else None
    batches = training_batches(training_dataset(uri, config, epoch=0), P, seed=0, drop_last=False,
                               normalize=normalize, decoder=decoder)
    # clone: uint8 batches are views of recycled buffers
    return [{name: None if value is None else value.clone() for name, value in batch.items()}
            for batch in batches]


# (stored 32x16) decoded at its own size (simplejpeg straight into the buffer) and resized (PIL's path)
@pytest.mark.parametrize("size", [(32, 16), (16, 8)])
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_consumer_decoding_gives_the_stream_training_batches(ordered, dataset_uri, size, augment, normalize):
    stream = epoch_batches(dataset_uri, make_config(*size, "stream", augment), normalize)
    consumer = epoch_batches(dataset_uri, make_config(*size, "consumer", augment), normalize)
    assert len(stream) == len(consumer) >= 2
    for a, b in zip(stream, consumer, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            if a[name] is None:
                assert b[name] is None, name
            else:
                assert torch.equal(a[name], b[name]), name


def test_consumer_rows_carry_jpeg_not_pixels(ray_cluster, dataset_uri):
    row = training_dataset(dataset_uri, make_config(32, 16, "consumer"), epoch=0).take(1)[0]
    assert "clips" not in row and len(row["frames"]) == K * T
    assert (int(row["height"]), int(row["width"])) == (32, 16)


def test_consumer_decoding_gives_the_stream_evaluation_input(ordered, dataset_uri):
    """ChunkFeatures decodes the consumer's chunks itself: the model sees the same tensors."""
    torch.manual_seed(0)
    model = STAL("tiny", seq_len=T, image_size=(16, 8), feature_dim=8, pose_source="keypoints").eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.register_forward_pre_hook(lambda _, args: seen.append((args[0].clone(), args[1].clone())))
    features = ChunkFeatures.of_model(model)
    outputs = {}
    for mode in ("stream", "consumer"):
        dataset = evaluation_dataset(dataset_uri, make_config(16, 8, mode))
        batches = dataset.iter_batches(batch_size=5, batch_format="numpy")
        outputs[mode] = [features(batch) for batch in batches]
    inputs = seen[:len(outputs["stream"])], seen[len(outputs["stream"]):]
    assert len(inputs[0]) == len(inputs[1]) >= 2
    for (clips_a, joints_a), (clips_b, joints_b) in zip(*inputs, strict=True):
        assert torch.equal(clips_a, clips_b) and torch.equal(joints_a, joints_b)
    for a, b in zip(outputs["stream"], outputs["consumer"], strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def jpeg(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 32), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


class Blocks:
    """A stand-in shard: iter_batches gives these pyarrow blocks."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, **_):
        yield from self.blocks


def encoded_block(identities: list[int], corrupt: set[int]) -> pa.Table:
    good = {i: jpeg((40 * i % 256, 200, 30)) for i in identities}  # a colour per identity
    frames = [good[i][: len(good[i]) // 2] if i in corrupt and f == 0 else good[i]
              for i in identities for f in range(K * T)]
    rows = len(identities)
    return pa.table({
        "label": np.array(identities), "identity": np.array(identities), "group": np.zeros(rows, np.int64),
        "tracklets": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(rows * K, np.int32)), K),
        "frames": pa.FixedSizeListArray.from_arrays(pa.array(frames, pa.binary()), K * T),
        "keypoints": pa.FixedSizeListArray.from_arrays(
            pa.array(np.full(rows * K * T * 42, np.nan, np.float32)), K * T * 42),
        "height": np.full(rows, 32, np.int32), "width": np.full(rows, 16, np.int32)})


def test_corrupt_groups_found_at_the_consumer_are_skipped_and_counted():
    block = encoded_block([0, 1, 2, 3, 4, 5, 6], corrupt={1, 4})
    batches = list(training_batches(Blocks([block]), P, seed=0, normalize=False,
                                    decoder=ConsumerDecoder(threads=2)))
    assert batches.__len__() == 1 and len(batches[0]["clips"]) == P * K
    assert not {1, 4} & set(batches[0]["identities"].tolist())
    # the one identity left over makes no full batch (drop_last); the corrupt ones are counted
    source = training_batches(Blocks([block]), P, seed=0, normalize=False, decoder=ConsumerDecoder())
    list(source)
    assert source.skipped_groups == 2 and source.corrupt_frames == 2
    assert source.first_skipped["identity"] in (1, 4)


def test_batches_decoded_ahead_are_the_same_batches_in_the_same_order():
    """The default with a decoder: the next batch assembled and decoded in a background thread while the
    caller holds this one (data.prefetch); the same batches as decoding in the caller's thread."""
    blocks = [encoded_block(list(range(start, start + 6)), corrupt={start + 2}) for start in range(0, 36, 6)]
    runs = {}
    for prefetch in (0, None, 2):
        batches = training_batches(Blocks(blocks), P, seed=0, normalize=False,
                                   decoder=ConsumerDecoder(threads=2), prefetch=prefetch)
        runs[prefetch] = [{name: value.clone() for name, value in batch.items() if value is not None}
                          for batch in batches]
        assert batches.skipped_groups == 6
    assert batches.prefetch == 2 and len(runs[0]) >= 5
    for prefetch in (None, 2):
        assert len(runs[prefetch]) == len(runs[0])
        for a, b in zip(runs[0], runs[prefetch], strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert not [thread for thread in threading.enumerate() if thread.name == "prefetch"]


def test_a_consumer_that_stops_early_stops_the_decoding_thread_and_closes_the_stream():
    closed = []

    def stream():
        try:
            for start in range(0, 600, 6):
                yield encoded_block(list(range(start, start + 6)), corrupt=set())
        finally:
            closed.append(threading.current_thread().name)

    class Stream:
        def iter_batches(self, **_):
            return stream()

    batches = training_batches(Stream(), P, seed=0, normalize=False, decoder=ConsumerDecoder(threads=2))
    for index, _ in enumerate(batches):
        if index == 2:
            break
    gc.collect()
    assert not [thread for thread in threading.enumerate() if thread.name == "prefetch"]
    assert closed == ["prefetch"]  # Ray Data's iterator is closed in the thread that ran it


def test_encoded_rows_of_either_batch_format_are_the_same():
    block = encoded_block([3, 4], corrupt=set())
    arrow = encoded_rows(block)
    numpy = encoded_rows({name: np.array(block.column(name).to_pylist(), dtype=object)
                          if name == "frames" else np.array(block.column(name).to_pylist())
                          for name in block.column_names})
    for a, b in zip(arrow, numpy, strict=True):
        assert [bytes(f) for f in a["frames"]] == b["frames"]
        np.testing.assert_array_equal(a["keypoints"], b["keypoints"])


def test_augmentation_of_a_torch_tensor_equals_numpys():
    """The nvJPEG path augments on the device with the same draws: on CPU tensors, the same pixels (the
    colour jitter's mean summed in another order could move a level by one; not at these sizes)."""
    config = make_config(32, 16, "consumer", augment=True)
    augment = Augmentation.from_config(config, epoch=3)
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (4, K, T, 32, 16, 3), dtype=np.uint8)
    keypoints = rng.uniform(0, 16, (4, K, T, 14, 3)).astype(np.float32)
    identities, groups = np.arange(4), np.array([0, 1, 0, 2])
    expected = augment(clips.copy(), keypoints, identities, groups)
    got = augment(torch.from_numpy(clips.copy()), keypoints, identities, groups)
    assert np.abs(got[0].numpy().astype(int) - expected[0].astype(int)).max() <= 1
    assert (got[0].numpy() != expected[0]).mean() < 1e-3
    np.testing.assert_array_equal(got[1], expected[1])
