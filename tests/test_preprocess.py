"""One preprocessing definition: training and feature extraction feed every backbone the same tensors, the
backbone's own statistics and channel order apply, and model.pt carries them."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from stal_ray.config import Config
from stal_ray.core.preprocess import CAFFE_BGR, IMAGENET, Preprocess
from stal_ray.data.stream.batches import training_batches
from stal_ray.data.stream.images import decode_frames
from stal_ray.evaluate.features import ChunkFeatures
from stal_ray.model.export import load_model, save_model
from stal_ray.model.stal import STAL

T, K = 2, 2
SIZES = {"tiny": (64, 32), "resnet50": (256, 128), "bninception": (224, 224)}


def noise_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """JPEG frames of 128x64 random pixels (decoding and resizing them is not the identity)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        out.append(buffer.getvalue())
    return out


class OneBatch:
    """Stands for the training stream's decoded groups: one batch of groups, as iter_batches gives them."""

    def __init__(self, clips: np.ndarray):
        n = len(clips)
        self.batch = {"label": np.arange(n), "identity": np.arange(n) + 1,
                      "tracklets": np.zeros((n, K), np.int32), "clips": clips,
                      "keypoints": np.zeros((n, K, T, 14, 3), np.float32), "has_keypoints": np.zeros(n, bool),
                      "corrupt_frames": np.zeros(n, np.int64)}

    def iter_batches(self, **kwargs):
        yield self.batch


class Captured(Exception):
    pass


def extraction_input(model: STAL, clips: np.ndarray) -> torch.Tensor:
    """The tensor ChunkFeatures hands the model for evaluation chunks `clips` uint8 (B, T, H, W, 3)."""
    seen = []

    def capture(module, args):
        seen.append(args[0].clone())
        raise Captured  # the forward itself is not what is tested

    n = len(clips)
    batch = {"clips": clips, "keypoints": np.zeros((n, T, 14, 3), np.float32), "valid": np.full(n, T),
             "tracklet": np.arange(n), "identity": np.ones(n, np.int64), "camera": np.ones(n, np.int64),
             "is_query": np.zeros(n, bool), "chunk": np.zeros(n, np.int64), "corrupt_frames": np.zeros(n)}
    handle = model.register_forward_pre_hook(capture)
    try:
        with pytest.raises(Captured):
            ChunkFeatures.of_model(model.eval())(batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("backbone", ["tiny", "resnet50", "bninception"])
def test_training_and_extraction_feed_bit_identical_frames(backbone):
    height, width = SIZES[backbone]
    groups = 2
    frames, ok = decode_frames(noise_jpegs(groups * K * T), height, width)
    assert ok.all()
    clips = frames.reshape(groups, K, T, height, width, 3)
    model = STAL(backbone, num_classes=0, seq_len=T, image_size=(height, width), feature_dim=16)

    (batch,) = training_batches(OneBatch(clips), groups, preprocess=model.preprocess, shuffle_buffer=0)
    trained_on = batch["clips"].to(dtype=next(model.parameters()).dtype)  # as train.loop hands it over
    extracted = extraction_input(model, clips.reshape(groups * K, T, height, width, 3))

    assert trained_on.shape == extracted.shape == (groups * K, T, 3, height, width)
    assert torch.equal(trained_on, extracted)
    # and it is the backbone's own preprocessing: BN-Inception's Caffe BGR mean pixel, else ImageNet's
    assert model.preprocess == (CAFFE_BGR if backbone == "bninception" else IMAGENET)


def test_bgr_preprocessing_reverses_the_channels_and_subtracts_the_mean_pixel():
    red = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red[:, 0] = 255  # decoded frames are RGB
    x = CAFFE_BGR(red)
    assert x[0, :, 0, 0].tolist() == [-104.0, -117.0, 255.0 - 128.0]  # B, G, R
    y = IMAGENET(red)
    expected = [(255 - 123.675) / 58.395, -116.28 / 57.12, -103.53 / 57.375]
    assert y[0, :, 0, 0].tolist() == pytest.approx(expected)


def test_uint8_training_clips_preprocessed_on_the_device_equal_the_float_ones():
    clips = np.random.default_rng(1).integers(0, 256, (2, K, T, 8, 4, 3), dtype=np.uint8)
    floats = training_batches(OneBatch(clips), 2, preprocess=CAFFE_BGR, shuffle_buffer=0)
    raw = training_batches(OneBatch(clips), 2, preprocess=CAFFE_BGR, shuffle_buffer=0, normalize=False)
    (as_float,), (as_uint8,) = floats, raw
    assert torch.equal(raw.normalized(as_uint8["clips"]), as_float["clips"])


def test_model_file_carries_the_preprocessing_it_was_trained_with(tmp_path):
    config = Config()
    config.data.seq_len, config.data.height, config.data.width = T, 64, 32
    model = STAL.from_config(config, num_classes=3)
    model.preprocess = Preprocess(mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), channel_order="BGR")
    save_model(str(tmp_path / "model.pt"), model, config, num_classes=3)
    loaded, _, _ = load_model(str(tmp_path / "model.pt"))
    assert loaded.preprocess == model.preprocess


def test_invalid_preprocessing_is_refused():
    with pytest.raises(ValueError, match="channel_order"):
        Preprocess(mean=(0, 0, 0), std=(1, 1, 1), channel_order="RBG")
    with pytest.raises(ValueError, match="positive"):
        Preprocess(mean=(0, 0, 0), std=(1, 0, 1))
