"""The iLIDS-VID release reader: sequence folders and the official split file as shipped, checked.

One sequence per person and camera; the split file's row `split` is a permutation of 1-based indices into
the sorted person folders, its first half the test persons (Wang et al. ECCV'14, as torchreid reads it).
Test protocol: the camera-1 sequence of each test person is a query, camera 2 the gallery.
"""

import posixpath
import re

import fsspec
import numpy as np

from stal_ray.data.releases.base import ReleaseFormatError, load_mat
from stal_ray.data.releases.png_release import PngRelease, entry_type, sequence_frames, two_camera_release

SEQUENCES = "i-LIDS-VID/sequences"
SPLIT_FILE, SPLIT_VARIABLE = "train-test people splits/train_test_splits_ilidsvid.mat", "ls_set"
CAMERAS = (1, 2)
LAYOUT = (f"an iLIDS-VID release holds {SEQUENCES}/cam1/personNNN/cam1_personNNN_FFFFF.png, the same under "
          f"cam2/, and '{SPLIT_FILE}'")
_PERSON = re.compile(r"person(\d{3})")


class IlidsVidFormatError(ReleaseFormatError):
    """A release that cannot be read: the message names the file and what to fix."""


def read_ilidsvid(root: str, split: int = 0) -> PngRelease:
    """Read and check an iLIDS-VID release (the folder holding i-LIDS-VID/ and 'train-test people
    splits/') at a local path or fsspec URL, with split `split` (0..9) of the official split file."""
    fs, base = fsspec.core.url_to_fs(root)
    try:
        return _read(fs, base.rstrip("/"), root, split)
    except ReleaseFormatError as error:
        raise IlidsVidFormatError(f"iLIDS-VID release {root}: {error}") from error.__cause__


def _read(fs, base: str, root: str, split: int) -> PngRelease:
    missing = [f"{SEQUENCES}/cam{c}" for c in CAMERAS if not fs.isdir(f"{base}/{SEQUENCES}/cam{c}")]
    missing += [SPLIT_FILE] if not fs.isfile(f"{base}/{SPLIT_FILE}") else []
    if missing:
        raise ReleaseFormatError(f"missing {', '.join(missing)}; {LAYOUT}")
    persons = _persons(fs, base)
    test_positions = _test_positions(fs, base, split, len(persons))
    sequences = {
        (person, camera): sequence_frames(
            fs, base, f"{SEQUENCES}/cam{camera}/person{person:03d}",
            re.compile(rf"cam{camera}_person{person:03d}_(\d{{5}})\.png"),
            f"cam{camera}_person{person:03d}_FFFFF.png (5-digit frame number)", ReleaseFormatError)
        for person in persons for camera in CAMERAS
    }
    is_test = np.zeros(len(persons), bool)
    is_test[test_positions] = True
    split_persons = {"train": [p for p, test in zip(persons, is_test, strict=True) if not test],
                     "test": [p for p, test in zip(persons, is_test, strict=True) if test]}
    return two_camera_release(root, fs, base, split_persons, lambda person, camera: sequences[person, camera])


def _persons(fs, base: str) -> list[int]:
    """Sorted person numbers, the same in both cameras."""
    by_camera = {}
    for camera in CAMERAS:
        folder = f"{SEQUENCES}/cam{camera}"
        numbers = {}
        for entry in fs.ls(f"{base}/{folder}", detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            match = _PERSON.fullmatch(name)
            if entry_type(fs, entry) != "directory" or match is None:
                raise ReleaseFormatError(f"{folder}/{name}: not a person folder named personNNN "
                                         "(3-digit person number); remove or rename it")
            numbers[int(match.group(1))] = name
        by_camera[camera] = numbers
    one, two = (set(by_camera[c]) for c in CAMERAS)
    for camera, other, only in ((1, 2, one - two), (2, 1, two - one)):
        if only:
            person = min(only)
            raise ReleaseFormatError(
                f"{SEQUENCES}/cam{camera}/person{person:03d} has no "
                f"{SEQUENCES}/cam{other}/person{person:03d} ({len(only)} persons of cam{camera} only); every "
                "person has one sequence per camera: copy the missing folders from the release")
    if not one:
        raise ReleaseFormatError(f"{SEQUENCES}/cam1 has no person folders; {LAYOUT}")
    return sorted(one)


def _test_positions(fs, base: str, split: int, num_persons: int) -> np.ndarray:
    """0-based positions, in the sorted person folders, of the test persons of row `split` of ls_set."""
    table = load_mat(fs, base, SPLIT_FILE, SPLIT_VARIABLE)
    if table.ndim != 2 or table.shape[0] == 0 or table.shape[1] != num_persons:
        raise ReleaseFormatError(
            f"{SPLIT_FILE}: {SPLIT_VARIABLE} has shape {table.shape}; expected (splits, {num_persons}), "
            f"one row per split permuting the {num_persons} person folders (is the file from "
            "another release, or are person folders missing?)")
    if not 0 <= split < table.shape[0]:
        raise ReleaseFormatError(
            f"{SPLIT_FILE}: split {split} asked, the file has splits 0..{table.shape[0] - 1}")
    row = table[split]
    if not np.issubdtype(row.dtype, np.number) or (row != np.round(row)).any():
        raise ReleaseFormatError(f"{SPLIT_FILE}: {SPLIT_VARIABLE} row {split + 1} must hold integer indices")
    row = row.astype(np.int64)
    expected = np.arange(1, num_persons + 1)
    if not np.array_equal(np.sort(row), expected):
        wrong = sorted(set(expected) ^ set(row.tolist()))
        duplicated = [int(v) for v, n in zip(*np.unique(row, return_counts=True), strict=True) if n > 1]
        detail = (f"index {duplicated[0]} appears twice" if duplicated
                  else f"index {wrong[0]} is {'missing' if wrong[0] in expected else 'out of range'}")
        raise ReleaseFormatError(
            f"{SPLIT_FILE}: {SPLIT_VARIABLE} row {split + 1} is not a permutation of 1..{num_persons} "
            f"({detail}); indices are 1-based into the sorted person folders: use the release's file")
    return row[: num_persons // 2] - 1
