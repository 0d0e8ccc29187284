"""The PRID-2011 reader on tiny releases in the shipped layout: the protocol's persons, splits, errors."""

import itertools
import json
import re
import shutil

import pytest
from release_layouts import make_prid, noise_png

from stal_ray.data.releases.prid import (
    MIN_FRAMES,
    SEQUENCES,
    SHARED_PERSONS,
    PridFormatError,
    make_splits,
    parse_splits,
    read_prid,
    seeded_splits,
)
from stal_ray.data.releases.registry import read_release
from stal_ray.data.synthetic.layouts import write_prid_release

# persons 1-7 in both cameras, 8-9 in A only, 10-12 in B only; 3 too short in B, 6 too short in A
LONG, SHORT = MIN_FRAMES, MIN_FRAMES - 1
LENGTHS_A = {1: LONG, 2: LONG + 2, 3: LONG, 4: LONG, 5: LONG, 6: SHORT, 7: LONG, 8: LONG, 9: LONG}
LENGTHS_B = {1: LONG, 2: LONG, 3: SHORT, 4: LONG + 1, 5: LONG, 6: LONG, 7: LONG, 10: LONG, 11: LONG, 12: 3}
ELIGIBLE = [1, 2, 4, 5, 7]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("prid")
    make_prid(path, LENGTHS_A, LENGTHS_B)
    return path


def test_seeded_splits_halve_the_persons_in_both_cameras_with_enough_frames(root):
    splits = seeded_splits(str(root))
    assert len(splits) == 10 and splits == seeded_splits(str(root))  # seeded: the same every time
    for split in splits:
        test = [int(n[-4:]) for n in split["test"]]
        train = [int(n[-4:]) for n in split["train"]]
        assert len(test) == len(ELIGIBLE) // 2 and sorted(test + train) == ELIGIBLE
    assert len({tuple(s["test"]) for s in splits}) > 1
    assert splits != make_splits(ELIGIBLE, seed=1)


def test_release_follows_the_split_and_camera_a_is_the_query(root):
    splits = [{"train": ["person_0001", "person_0004", "person_0005"],
               "test": ["person_0007", "person_0002"]}]
    release = read_prid(str(root), 0, splits)
    assert release.identities("train") == [1, 4, 5] and release.identities("test") == [2, 7]
    assert [(t.identity, t.camera, t.is_query) for t in release.test] == \
        [(2, 1, True), (2, 2, False), (7, 1, True), (7, 2, False)]
    assert [t.row for t in release.train] == list(range(6)) and not any(t.is_query for t in release.train)
    person_2a = release.test[0]
    assert person_2a.frames == tuple(f"{SEQUENCES}/cam_a/person_0002/{n:04d}.png" for n in range(1, LONG + 3))
    assert release.read_frame(person_2a.frames[0]).startswith(b"\xff\xd8\xff")


def test_split_file_in_torchreid_format_is_read_and_checked(root):
    text = json.dumps([{"train": ["person_0001"], "test": ["person_0002"]}] * 2)
    assert parse_splits(text, "s.json")[1]["test"] == ["person_0002"]
    for bad in ("{}", "[]", '[{"train": ["person_0001"]}]', "not json"):
        with pytest.raises(PridFormatError, match="split file s.json"):
            parse_splits(bad, "s.json")


@pytest.mark.parametrize(("split", "message"), [
    ({"train": ["person_0001"], "test": ["person_0008"]},
     f"person_0008 has no {SEQUENCES}/cam_b/person_0008; a split lists persons seen by both cameras"),
    ({"train": ["person_0001", "person_0001"], "test": ["person_0002"]}, "person_0001 is listed twice"),
    ({"train": ["person_0001"], "test": ["0002"]}, "'0002' is not a person folder name person_NNNN"),
    ({"train": ["person_0001", "person_0002"], "test": ["person_0002"]},
     "person_0002 is in both train and test"),
])
def test_split_inconsistent_with_the_release_is_named(root, split, message):
    with pytest.raises(PridFormatError, match=re.escape(message)) as caught:
        read_prid(str(root), 0, [split], splits_name="split file s.json")
    assert "split file s.json" in str(caught.value) and str(root) in str(caught.value)


def test_split_out_of_range_is_refused(root):
    message = "split 10 asked, but there are splits 0..9 in the seeded splits"
    with pytest.raises(PridFormatError, match=re.escape(message)):
        read_prid(str(root), 10)


@pytest.fixture
def own_root(tmp_path):
    make_prid(tmp_path, {1: 3, 2: 3}, {1: 3, 2: 3})
    return tmp_path


def test_gap_in_frame_numbers_is_named(own_root):
    (own_root / SEQUENCES / "cam_b" / "person_0002" / "0002.png").unlink()
    with pytest.raises(PridFormatError, match=re.escape(
            f"{SEQUENCES}/cam_b/person_0002: 1 frames missing between frames 1 and 3")):
        read_prid(str(own_root), 0, [{"train": ["person_0001"], "test": ["person_0002"]}])


def test_wrong_frame_name_is_named(own_root):
    folder = own_root / SEQUENCES / "cam_a" / "person_0001"
    (folder / "0003.png").rename(folder / "0003.jpg")
    with pytest.raises(PridFormatError, match=re.escape(
            f"{SEQUENCES}/cam_a/person_0001/0003.jpg: not a frame file named NNNN.png")):
        read_prid(str(own_root))


def test_missing_camera_folder_is_named(own_root):
    shutil.rmtree(own_root / SEQUENCES / "cam_b")
    with pytest.raises(PridFormatError, match=re.escape(f"missing {SEQUENCES}/cam_b")):
        read_prid(str(own_root))


# The release's real numbering: cam_a person_0001..0385, cam_b person_0001..0749, only 1..200 the same
# people. 22 of the shared 200 have a sequence shorter than MIN_FRAMES in one camera or both; every
# single-camera person has a long sequence, so a reader that paired folder numbers would keep 178 + 185.
REAL_A, REAL_B = 385, 749
REAL_SHORT = dict(zip(range(3, 200, 9), itertools.cycle(("a", "b", "ab")), strict=False))


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prid-real")
    frame = noise_png(0)  # the same bytes everywhere: this checks numbering, not pixels
    sequences = {}
    for letter, count in (("a", REAL_A), ("b", REAL_B)):
        for person in range(1, count + 1):
            short = letter in REAL_SHORT.get(person, "")
            sequences[letter, person] = [frame] * (SHORT if short else LONG)
    write_prid_release(root, sequences)
    return root


def test_real_numbering_keeps_the_178_shared_persons_and_halves_them(real_root):
    assert len(REAL_SHORT) == 22 and SHARED_PERSONS == 200
    splits = seeded_splits(str(real_root))
    kept = sorted(int(n[-4:]) for n in splits[0]["train"] + splits[0]["test"])
    assert kept == sorted(set(range(1, 201)) - set(REAL_SHORT))
    for index in (0, 9):
        release = read_prid(str(real_root), index, splits)
        queries = [t for t in release.test if t.is_query]
        gallery = [t for t in release.test if not t.is_query]
        assert len(release.identities("train")) == len(release.identities("test")) == 89
        assert len(queries) == len(gallery) == 89 and {t.camera for t in gallery} == {2}
        assert len(release.train) == 2 * 89  # both sequences of every training person
        assert max(release.identities("train") + release.identities("test")) <= SHARED_PERSONS


def test_split_file_naming_a_person_beyond_the_shared_range_is_refused(real_root, tmp_path):
    split_file = tmp_path / "splits_prid2011.json"
    split = {"train": [f"person_{p:04d}" for p in range(1, 10)], "test": ["person_0010", "person_0201"]}
    split_file.write_text(json.dumps([split]))
    message = f"split file {split_file}, split 0 test: person_0201 is not one person in both cameras"
    with pytest.raises(PridFormatError, match=re.escape(message)) as caught:
        read_release("prid2011", str(real_root), split_file=str(split_file))
    assert "cam_a/person_0201 and cam_b/person_0201 are two different people" in str(caught.value)
