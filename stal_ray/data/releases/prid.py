"""The PRID-2011 release reader (multi-shot): sequence folders as shipped, checked, with a split.

Camera A holds 385 persons, camera B 749. By the release's own readme only persons 1-200 (SHARED_PERSONS) were
seen by both cameras; the folders from person_0201 up number each camera's own people, so cam_a/person_0201
and cam_b/person_0201 are two different people. The usual protocol (Wang et al. ECCV'14) keeps the shared
persons whose sequences have at least MIN_FRAMES frames in each camera (178) and splits them in half,
NUM_SPLITS times. The single-camera persons (185 in A, 549 in B; the readme's single-shot protocol adds them
to its galleries) take no part here: neither trained on nor gallery distractors, since this protocol's gallery
is the test persons' camera-B sequences alone. The splits come from a file in torchreid's splits_prid2011.json
format (a list of {"train": [...], "test": [...]} of person folder names; a person beyond SHARED_PERSONS is
refused), or from make_splits, seeded. Test protocol: the camera-A sequence of each test person is a query,
camera B the gallery.
"""

import json
import posixpath
import re

import fsspec
import numpy as np

from stal_ray.data.releases.base import ReleaseFormatError
from stal_ray.data.releases.png_release import PngRelease, entry_type, sequence_frames, two_camera_release

SEQUENCES = "prid_2011/multi_shot"
CAMERAS = {"a": 1, "b": 2}  # folder cam_<letter> -> camera number in the shards
SHARED_PERSONS = 200  # persons 1..200 appear in both cameras; higher numbers are different people per camera
MIN_FRAMES = 21
NUM_SPLITS = 10
SPLIT_SEED = 0
SPLITS_FILE = "splits_prid2011.json"  # torchreid's name, also the name of the file written next to shards
LAYOUT = f"a PRID-2011 release holds {SEQUENCES}/cam_a/person_NNNN/NNNN.png and the same under cam_b/"
_PERSON = re.compile(r"person_(\d{4})")
_FRAME = re.compile(r"(\d{4})\.png")


class PridFormatError(ReleaseFormatError):
    """A release or split file that cannot be read: the message names the file and what to fix."""


def read_prid(root: str, split: int = 0, splits: list[dict] | None = None,
              splits_name: str = "the seeded splits") -> PngRelease:
    """Read and check a PRID-2011 release (the folder holding prid_2011/) at a local path or fsspec URL,
    with split `split` of `splits` (load_splits; splits_name says where they came from, for messages), or of
    make_splits over the release when None."""
    fs, base = fsspec.core.url_to_fs(root)
    try:
        sequences = read_sequences(fs, base.rstrip("/"))
        if splits is None:
            splits = make_splits(eligible_persons(sequences))
        return _release(fs, base.rstrip("/"), root, sequences, splits, split, splits_name)
    except ReleaseFormatError as error:
        raise PridFormatError(f"PRID-2011 release {root}: {error}") from error.__cause__


def read_sequences(fs, base: str) -> dict[tuple[str, int], tuple[str, ...]]:
    """(camera letter, person number) -> frame paths, for every person folder of both cameras."""
    if missing := [f"{SEQUENCES}/cam_{c}" for c in CAMERAS if not fs.isdir(f"{base}/{SEQUENCES}/cam_{c}")]:
        raise ReleaseFormatError(f"missing {', '.join(missing)}; {LAYOUT}")
    sequences = {}
    for letter in CAMERAS:
        folder = f"{SEQUENCES}/cam_{letter}"
        for entry in fs.ls(f"{base}/{folder}", detail=True):
            name = posixpath.basename(entry["name"].rstrip("/"))
            match = _PERSON.fullmatch(name)
            if entry_type(fs, entry) != "directory" or match is None:
                raise ReleaseFormatError(f"{folder}/{name}: not a person folder named person_NNNN (4-digit "
                                      "person number); remove or rename it")
            sequences[letter, int(match.group(1))] = sequence_frames(
                fs, base, f"{folder}/{name}", _FRAME, "NNNN.png (4-digit frame number)", ReleaseFormatError)
    if not any(letter == "a" for letter, _ in sequences):
        raise ReleaseFormatError(f"{SEQUENCES}/cam_a has no person folders; {LAYOUT}")
    return sequences


def eligible_persons(sequences: dict[tuple[str, int], tuple[str, ...]]) -> list[int]:
    """The shared persons (1..SHARED_PERSONS) with at least MIN_FRAMES frames in each camera, ascending
    (178 in the release); a folder number above SHARED_PERSONS is a single-camera person, never paired."""
    return sorted(person for letter, person in sequences if letter == "a" and person <= SHARED_PERSONS
                  and ("b", person) in sequences
                  and min(len(sequences[c, person]) for c in CAMERAS) >= MIN_FRAMES)


def make_splits(persons: list[int], count: int = NUM_SPLITS, seed: int = SPLIT_SEED) -> list[dict]:
    """`count` random halvings of `persons`, in the split file's format; the same for the same seed."""
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(count):
        order = [persons[i] for i in rng.permutation(len(persons))]
        half = len(persons) // 2
        splits.append({"train": sorted(f"person_{p:04d}" for p in order[half:]),
                       "test": sorted(f"person_{p:04d}" for p in order[:half])})
    return splits


def seeded_splits(root: str) -> list[dict]:
    """make_splits over the eligible persons of the release at `root`."""
    fs, base = fsspec.core.url_to_fs(root)
    try:
        return make_splits(eligible_persons(read_sequences(fs, base.rstrip("/"))))
    except ReleaseFormatError as error:
        raise PridFormatError(f"PRID-2011 release {root}: {error}") from error.__cause__


def parse_splits(text: str, name: str) -> list[dict]:
    """The splits of a split file's text (torchreid's splits_prid2011.json format), checked for shape."""
    try:
        splits = json.loads(text)
    except ValueError as error:
        raise PridFormatError(f"split file {name}: not JSON ({error})") from None
    shape = 'a list of {"train": ["person_NNNN", ...], "test": [...]}, one per split'
    if not isinstance(splits, list) or not splits:
        raise PridFormatError(f"split file {name}: expected {shape}")
    for index, entry in enumerate(splits):
        if not (isinstance(entry, dict) and all(isinstance(entry.get(k), list) and entry[k]
                                                for k in ("train", "test"))):
            raise PridFormatError(f"split file {name} split {index}: expected {shape}")
    return splits


def dump_splits(splits: list[dict]) -> str:
    return json.dumps(splits, indent=1) + "\n"


def _release(fs, base: str, root: str, sequences: dict, splits: list[dict], split: int,
             splits_name: str) -> PngRelease:
    if not 0 <= split < len(splits):
        raise ReleaseFormatError(
            f"split {split} asked, but there are splits 0..{len(splits) - 1} in {splits_name}")
    persons = {}
    for part in ("train", "test"):
        where = f"{splits_name}, split {split} {part}"
        numbers = []
        for name in splits[split][part]:
            match = _PERSON.fullmatch(str(name))
            if match is None:
                raise ReleaseFormatError(f"{where}: {name!r} is not a person folder name person_NNNN")
            number = int(match.group(1))
            if number > SHARED_PERSONS:
                raise ReleaseFormatError(
                    f"{where}: {name} is not one person in both cameras: only person_0001..person_"
                    f"{SHARED_PERSONS:04d} were seen by both, and cam_a/{name} and cam_b/{name} are two "
                    "different people (the release's readme); list shared persons only, e.g. torchreid's "
                    "splits_prid2011.json")
            if number in numbers:
                raise ReleaseFormatError(f"{where}: {name} is listed twice; list each person once")
            absent = [f"{SEQUENCES}/cam_{c}/{name}" for c in CAMERAS if (c, number) not in sequences]
            if absent:
                raise ReleaseFormatError(f"{where}: {name} has no {', '.join(absent)}; a split lists persons "
                                      "seen by both cameras (is the split file from another release?)")
            numbers.append(number)
        persons[part] = sorted(numbers)
    if both := set(persons["train"]) & set(persons["test"]):
        raise ReleaseFormatError(f"{splits_name}, split {split}: person_{min(both):04d} is in both train and "
                              "test; the halves must be disjoint")
    letter_of = {camera: letter for letter, camera in CAMERAS.items()}
    return two_camera_release(root, fs, base, persons,
                              lambda person, camera: sequences[letter_of[camera], person])
