"""data.images: libjpeg-turbo (simplejpeg) first, PIL for the rest, and the output PIL's to the byte."""

import io

import numpy as np
import pytest
from PIL import Image

from stal_ray.data.stream.images import decode_frame, decode_frames_with_sizes, decode_turbo


def pil_reference(data: bytes, height: int, width: int) -> np.ndarray:
    """What the decoder returned before libjpeg-turbo: PIL alone, draft, convert, bilinear resize."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (width, height))
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image)


def encode(pixels: np.ndarray, mode: str = "RGB", fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# stored size, target size: MARS as stored and both paper inputs; frames large enough for 1/2..1/8 drafts
SIZES = [((256, 128), (256, 128)), ((256, 128), (224, 224)), ((256, 128), (64, 32)),
         ((1000, 517), (224, 224)), ((777, 333), (256, 128)), ((2048, 1024), (256, 128)),
         ((130, 70), (300, 150))]


@pytest.mark.parametrize("stored, target", SIZES)
def test_libjpeg_turbo_decodes_jpegs_exactly_as_pil(stored, target):
    jpeg = encode(noise(*stored), quality=90)
    assert decode_turbo(jpeg, np.zeros((*target, 3), np.uint8)) is not None  # the fast path took it
    image, size = decode_frame(jpeg, *target)
    assert size == stored and image.shape == (*target, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, pil_reference(jpeg, *target))


@pytest.mark.parametrize("kind", ["progressive", "grayscale", "subsampled 4:2:0"])
def test_other_jpeg_kinds_decode_exactly_as_pil(kind):
    pixels = noise(256, 128, seed=1)
    jpeg = {"progressive": lambda: encode(pixels, progressive=True),
            "grayscale": lambda: encode(pixels, "L"),
            "subsampled 4:2:0": lambda: encode(pixels, subsampling=2)}[kind]()
    np.testing.assert_array_equal(decode_frame(jpeg, 224, 224)[0], pil_reference(jpeg, 224, 224))


@pytest.mark.parametrize("kind", ["png", "cmyk jpeg"])
def test_pil_decodes_what_libjpeg_turbo_does_not(kind):
    pixels = noise(256, 128, seed=2)
    data = encode(pixels, fmt="PNG") if kind == "png" else encode(pixels, "CMYK")
    # refused (PNG) or left to PIL (CMYK: PIL's own conversion)
    assert decode_turbo(data, np.zeros((256, 128, 3), np.uint8)) is None
    image, size = decode_frame(data, 256, 128)
    assert size == (256, 128)
    np.testing.assert_array_equal(image, pil_reference(data, 256, 128))


def test_a_frame_neither_decoder_reads_is_flagged_not_raised():
    good = encode(noise(64, 32), quality=90)
    frames, ok, sizes = decode_frames_with_sizes([good[: len(good) // 2], b"", b"not an image", good], 32, 16)
    assert ok.tolist() == [False, False, False, True]
    assert (frames[:3] == 0).all() and (sizes[:3] == 0).all() and sizes[3].tolist() == [64, 32]


def test_decoding_into_a_used_array_leaves_nothing_of_its_contents():
    good = encode(noise(64, 32), quality=90)
    out = np.full((3, 32, 16, 3), 255, np.uint8)  # an array reused from an earlier call
    frames, ok, _ = decode_frames_with_sizes([good, b"not an image", good[: len(good) // 2]], 32, 16, out=out)
    assert frames is out and ok.tolist() == [True, False, False]
    np.testing.assert_array_equal(frames[0], pil_reference(good, 32, 16))
    assert (frames[1:] == 0).all()
    with pytest.raises(ValueError, match="not uint8"):
        decode_frames_with_sizes([good], 32, 16, out=np.zeros((1, 16, 32, 3), np.uint8))
