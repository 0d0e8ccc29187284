"""JPEG frames to fixed-size RGB arrays with PIL; a corrupt frame is reported, never raised."""

import io

import numpy as np
from PIL import Image


def decode_frame(jpeg: bytes, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(uint8 (H, W, 3), original (height, width)) of one JPEG, or None when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            size = image.size
            # draft lets libjpeg decode at 1/2, 1/4 or 1/8 scale, still at least the target size: much less
            # work for large frames, and the bilinear resize below gives the exact size
            image.draft("RGB", (width, height))
            image = image.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8), (size[1], size[0])
    except Exception:  # noqa: BLE001 - any failure (truncated, not a JPEG, bomb) means one unusable frame
        return None


def decode_frames_with_sizes(jpeg_bytes: list[bytes], height: int,
                             width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 (N, H, W, 3), ok (N,) bool, original sizes (N, 2) as (height, width)); failed: zeros."""
    frames = np.zeros((len(jpeg_bytes), height, width, 3), dtype=np.uint8)
    ok = np.zeros(len(jpeg_bytes), dtype=bool)
    sizes = np.zeros((len(jpeg_bytes), 2), dtype=np.int64)
    for index, jpeg in enumerate(jpeg_bytes):
        decoded = decode_frame(jpeg, height, width)
        if decoded is not None:
            frames[index], sizes[index] = decoded
            ok[index] = True
    return frames, ok, sizes


def decode_frames(jpeg_bytes: list[bytes], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, H, W, 3), ok (N,) bool): the caller skips and counts frames with ok False."""
    frames, ok, _ = decode_frames_with_sizes(jpeg_bytes, height, width)
    return frames, ok
