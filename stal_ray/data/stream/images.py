"""JPEG frames to fixed-size RGB arrays; a corrupt frame is reported, never raised.

libjpeg-turbo through simplejpeg decodes first (2.2x PIL's frames per core on MARS's 256x128 frames:
bench/decode.py); PIL decodes what it refuses (PNG, CMYK and YCCK JPEGs, anything it cannot parse) and
resizes. The output is PIL's to the byte: the same reduced-scale decode as PIL's `draft` (1/2, 1/4 or 1/8,
still at least the target size), the same bilinear resize (tests/test_images.py compares them).
"""

import io

import numpy as np
import simplejpeg
from PIL import Image

# colour spaces libjpeg-turbo converts to RGB other than PIL does (CMYK: off by one): PIL's, always
_PIL_COLORSPACES = frozenset({"CMYK", "YCCK"})


def _draft_scale(height: int, width: int, target_height: int, target_width: int) -> int:
    """PIL's JpegImageFile.draft: the largest of 8, 4, 2, 1 that still leaves at least the target size."""
    scale = min(width // target_width, height // target_height)
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def decode_turbo(jpeg: bytes, out: np.ndarray) -> tuple[int, int] | None:
    """decode_frame's fast path: decode into `out` (H, W, 3) with simplejpeg (strict: a truncated frame
    raises) and return the stored (height, width); None, `out` untouched, for what PIL must decode."""
    height, width = out.shape[:2]
    try:
        rows, cols, colorspace, _ = simplejpeg.decode_jpeg_header(jpeg)
        if colorspace in _PIL_COLORSPACES:
            return None
        scale = _draft_scale(rows, cols, height, width)
        shape = (-(-rows // scale), -(-cols // scale))
        if shape == (height, width):  # no resize (MARS at 256x128): straight into the output, no copy
            simplejpeg.decode_jpeg(jpeg, "RGB", min_height=shape[0], min_width=shape[1], buffer=out)
            return rows, cols
        image = simplejpeg.decode_jpeg(jpeg, "RGB", min_height=shape[0], min_width=shape[1])
    except Exception:  # noqa: BLE001 - not a JPEG libjpeg-turbo reads: PIL decides
        out[...] = 0  # what a truncated frame left decoded so far
        return None
    out[...] = _resize(image, height, width)
    return rows, cols


def _decode_pil(data: bytes, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            # draft lets libjpeg decode at 1/2, 1/4 or 1/8 scale, still at least the target size: much less
            # work for large frames, and the bilinear resize below gives the exact size
            image.draft("RGB", (width, height))
            image = image.convert("RGB")
            return _resize(np.asarray(image, dtype=np.uint8), height, width), (size[1], size[0])
    except Exception:  # noqa: BLE001 - any failure (truncated, not a JPEG, bomb) means one unusable frame
        return None


def _decode_into(jpeg: bytes, out: np.ndarray) -> tuple[int, int] | None:
    """Decode into `out` (H, W, 3); the stored (height, width), or None (`out` zeros) when it cannot be."""
    size = decode_turbo(jpeg, out)
    if size is None:
        decoded = _decode_pil(jpeg, *out.shape[:2])
        if decoded is not None:
            out[...], size = decoded
    return size


def decode_frame(jpeg: bytes, height: int, width: int) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(uint8 (H, W, 3), original (height, width)) of one JPEG, or None when it cannot be decoded."""
    out = np.zeros((height, width, 3), dtype=np.uint8)
    size = _decode_into(jpeg, out)
    return None if size is None else (out, size)


def decode_frames_with_sizes(jpeg_bytes: list[bytes], height: int, width: int, *,
                             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 (N, H, W, 3), ok (N,) bool, original sizes (N, 2) as (height, width)); failed: zeros.

    out: a uint8 (N, H, W, 3) array to decode into (any contents), e.g. one reused from an earlier call:
    writing into fresh memory costs the page faults of its every page, about a tenth of decoding at 256x128
    (bench/data.py)."""
    shape = (len(jpeg_bytes), height, width, 3)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out is {out.dtype} {out.shape}, not uint8 {shape}")
    ok = np.zeros(len(jpeg_bytes), dtype=bool)
    sizes = np.zeros((len(jpeg_bytes), 2), dtype=np.int64)
    for index, jpeg in enumerate(jpeg_bytes):
        size = _decode_into(jpeg, out[index])
        if size is None:
            out[index] = 0
        else:
            sizes[index], ok[index] = size, True
    return out, ok, sizes


def decode_frames(jpeg_bytes: list[bytes], height: int, width: int, *,
                  out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, H, W, 3), ok (N,) bool): the caller skips and counts frames with ok False. out: as in
    decode_frames_with_sizes."""
    frames, ok, _ = decode_frames_with_sizes(jpeg_bytes, height, width, out=out)
    return frames, ok
