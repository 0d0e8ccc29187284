"""Releases shipped as PNG frames (iLIDS-VID, PRID-2011), read for the shards as JPEG.

The shards, the frame check (stal_ray/data/releases/frame_check.py) and the decoder
(stal_ray/data/stream/images.py, which lets libjpeg decode at reduced scale) all take JPEG, so a PNG release
is re-encoded once, at prepare time: quality 95 without chroma subsampling, visually lossless for these 64x128
frames (the cost is measured in README.md, section "iLIDS-VID and PRID-2011"). A PNG that cannot be decoded
(truncated, damaged) is passed on as it is, so the shard writer leaves it out and lists it as a bad frame.
"""

import io
import re
from collections.abc import Callable, Iterable, Mapping

from PIL import Image

from stal_ray.data.releases.base import Release, ReleaseFormatError, Tracklet

JPEG_QUALITY = 95
_MISSING_SHOWN = 5


class PngRelease(Release):
    """A release whose frames are PNG files: read_frame gives them as JPEG bytes."""

    def read_frame(self, path: str) -> bytes:
        return png_to_jpeg(super().read_frame(path))


def two_camera_release(root: str, fs, base: str, persons: Mapping[str, Iterable[int]],
                       sequence_of: Callable[[int, int], tuple[str, ...]]) -> PngRelease:
    """The release of a two-camera data set (iLIDS-VID, PRID-2011): for every person of each split
    ({"train": [...], "test": [...]}), one tracklet per camera 1 and 2 (sequence_of(person, camera): its
    frame paths); a test person's camera-1 sequence is its query, as both data sets' protocol says."""
    tracklets = {"train": [], "test": []}
    for split, numbers in persons.items():
        rows = tracklets[split]
        for person in numbers:
            for camera in (1, 2):
                rows.append(Tracklet(split, len(rows), person, camera, sequence_of(person, camera),
                                     is_query=split == "test" and camera == 1))
    release = PngRelease(root, tracklets["train"], tracklets["test"], None)
    release._fs = (fs, base)
    return release


def png_to_jpeg(data: bytes) -> bytes:
    """JPEG bytes of a PNG frame; `data` unchanged when it is not a PNG that decodes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "PNG":
                return data
            rgb = image.convert("RGB")  # decodes the whole file: a truncated one raises here
    except Exception:  # noqa: BLE001 - any failure means a bad frame, which the shard writer reports
        return data
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def entry_type(fs, entry: dict) -> str:
    """A listing entry's type with links followed ("file", "directory", else what fsspec says: a dangling
    link, a pipe), so linked frames and person folders are read as MARS's are: followed, and a frame that
    resolves out of the release, or is not a regular file, refused where it is read (data/frame_check.py:
    LinkGuard). fsspec's local listing types a link "other" (or "link"), whatever it points at."""
    if entry["type"] in ("file", "directory"):
        return entry["type"]
    if fs.isdir(entry["name"]):
        return "directory"
    return "file" if fs.isfile(entry["name"]) else entry["type"]


def sequence_frames(fs, base: str, folder: str, pattern: re.Pattern, expected: str,
                    error: type[ReleaseFormatError]) -> tuple[str, ...]:
    """Frame paths of one sequence folder (relative to the release root), in frame-number order.

    Every file must match `pattern` (one group: the frame number), and the numbers must be consecutive: a
    gap means frames lost in a copy, which would silently shorten the sequence's temporal order."""
    try:
        listed = fs.ls(f"{base}/{folder}", detail=True)
    except FileNotFoundError:
        listed = []
    numbered = []
    for entry in listed:
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        match = pattern.fullmatch(name)
        kind = entry_type(fs, entry)
        if match is None:
            raise error(f"{folder}/{name}: not a frame file named {expected}; remove or rename it")
        if kind != "file":
            raise error(f"{folder}/{name}: not a regular file (fsspec type {kind!r}: a link to nothing, a "
                        "pipe or a device); replace it with the frame's image file")
        numbered.append((int(match.group(1)), f"{folder}/{name}"))
    if not numbered:
        raise error(f"{folder}: no frames (expected files named {expected}); copy the folder again from "
                    "the release")
    numbered.sort()
    numbers = [number for number, _ in numbered]
    if len(set(numbers)) != len(numbers):
        first = next(n for n, m in zip(numbers, numbers[1:], strict=False) if n == m)
        raise error(f"{folder}: frame number {first} appears twice (names differing in zero padding); keep "
                    "one of the two files")
    if numbers[-1] - numbers[0] + 1 != len(numbers):
        present = set(numbers)
        missing = [n for n in range(numbers[0], numbers[-1] + 1) if n not in present]
        raise error(f"{folder}: {len(missing)} frames missing between frames {numbers[0]} and {numbers[-1]} "
                    f"(first missing numbers {missing[:_MISSING_SHOWN]}); the sequence was copied "
                    "incompletely: copy the folder again from the release")
    return tuple(path for _, path in numbered)
