"""The paper's "polluted" data (§IV-E2, Fig. 13, Table VII): a random black box in every frame.

The paper draws a 25x25-pixel black box at a random place in each frame of iLIDS-VID (128x64 frames), in
the training and the test split alike. Here the box keeps that share of the frame on other frame sizes
(25/128 of the height, 25/64 of the width), lies wholly inside the frame, and its place is drawn from a
generator seeded by the seed and the frame's path: the same seed gives the same boxes, whatever order the
frames are read in. The frame is written back as JPEG (quality 95, no chroma subsampling, as the PNG
releases are re-encoded). A frame that does not decode is passed on as it is (the frame check lists it).
"""

import hashlib
import io

import numpy as np
from PIL import Image

BOX = 25  # pixels, on a frame of REFERENCE_SIZE (Fig. 13)
REFERENCE_SIZE = (128, 64)  # height, width of iLIDS-VID's frames
JPEG_QUALITY = 95


def settings(seed: int, box: int = BOX) -> dict:
    """The manifest's record of a pollution (protocol.describe(pollution=...))."""
    if box < 1:
        raise ValueError(f"the box side must be >= 1 pixel, got {box}")
    return {"box": int(box), "reference_size": list(REFERENCE_SIZE), "seed": int(seed),
            "splits": ["train", "test"],
            "what": f"a black box of {box}x{box} pixels per {REFERENCE_SIZE[0]}x{REFERENCE_SIZE[1]} frame "
                    "(scaled to the frame size) at a random place in every frame, seeded by seed and the "
                    "frame's path"}


def summary(polluted: dict | None) -> str:
    """A few words for messages: "none", or the box, frame size and seed."""
    if not polluted:
        return "none"
    height, width = polluted["reference_size"]
    return f"{polluted['box']}x{polluted['box']} box per {height}x{width} frame, seed {polluted['seed']}"


def box_of(path: str, height: int, width: int, polluted: dict) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of the black box in the frame at `path` of this size."""
    reference_height, reference_width = polluted["reference_size"]
    box_height = min(height, max(1, round(polluted["box"] * height / reference_height)))
    box_width = min(width, max(1, round(polluted["box"] * width / reference_width)))
    digest = hashlib.sha256(f"{polluted['seed']}\0{path}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    top = int(rng.integers(0, height - box_height + 1))
    left = int(rng.integers(0, width - box_width + 1))
    return top, left, box_height, box_width


def pollute(frame: bytes, path: str, polluted: dict) -> bytes:
    """JPEG bytes of `frame` with its black box drawn in; `frame` unchanged when it does not decode."""
    try:
        with Image.open(io.BytesIO(frame)) as image:
            pixels = np.array(image.convert("RGB"))
    except Exception:  # noqa: BLE001 - a frame that does not decode is the frame check's to report
        return frame
    top, left, box_height, box_width = box_of(path, *pixels.shape[:2], polluted)
    pixels[top:top + box_height, left:left + box_width] = 0
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()
