"""The iLIDS-VID reader on tiny releases in the shipped layout: structure, splits, strict errors."""

import io
import re

import numpy as np
import pytest
import scipy.io
from PIL import Image
from release_layouts import FRAME_SIZE, make_ilidsvid

from stal_ray.data.releases.ilidsvid import SEQUENCES, SPLIT_FILE, IlidsVidFormatError, read_ilidsvid
from stal_ray.data.stream.images import decode_frame

PERSONS = (1, 2, 4, 7, 9, 12)


@pytest.fixture
def release(tmp_path):
    ls_set = make_ilidsvid(tmp_path)
    return tmp_path, ls_set


def test_test_persons_are_the_first_half_of_the_split_row(release):
    root, ls_set = release
    for split in (0, 3):
        read = read_ilidsvid(str(root), split)
        test_persons = sorted(PERSONS[int(i) - 1] for i in ls_set[split, :3])
        assert read.identities("test") == test_persons
        assert read.identities("train") == sorted(set(PERSONS) - set(test_persons))


def test_each_person_has_one_sequence_per_camera_and_camera_1_is_the_query(release):
    root, _ = release
    read = read_ilidsvid(str(root), 0)
    for split in ("train", "test"):
        tracklets = read._split(split)
        assert [t.row for t in tracklets] == list(range(len(tracklets)))
        assert len(tracklets) == 2 * 3
        assert sorted((t.identity, t.camera) for t in tracklets) == \
            sorted((p, c) for p in read.identities(split) for c in (1, 2))
    assert [(t.identity, t.camera) for t in read.queries] == [(p, 1) for p in read.identities("test")]
    assert not any(t.is_query for t in read.train)
    person_7 = next(t for t in read.test + read.train if t.identity == 7 and t.camera == 2)
    assert person_7.frames == tuple(f"{SEQUENCES}/cam2/person007/cam2_person007_{n:05d}.png"
                                    for n in (101, 102, 103, 104))


def test_frames_are_read_as_jpeg_close_to_the_png(release):
    root, _ = release
    read = read_ilidsvid(str(root), 0)
    path = read.train[0].frames[0]
    jpeg = read.read_frame(path)
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    decoded, size = decode_frame(jpeg, FRAME_SIZE[1], FRAME_SIZE[0])
    original = np.asarray(Image.open(root / path).convert("RGB"), dtype=np.float64)
    assert size == (FRAME_SIZE[1], FRAME_SIZE[0])
    assert np.abs(decoded - original).mean() < 12  # quality 95 on random noise, the hardest content


def expect(root, pattern: str, split: int = 0):
    with pytest.raises(IlidsVidFormatError, match=pattern) as caught:
        read_ilidsvid(str(root), split)
    assert str(root) in str(caught.value)


def test_missing_split_file_is_named(release):
    root, _ = release
    (root / SPLIT_FILE).unlink()
    expect(root, re.escape(f"missing {SPLIT_FILE}"))


def test_person_in_one_camera_only_is_named(release):
    root, _ = release
    folder = root / SEQUENCES / "cam2" / "person004"
    for frame in folder.iterdir():
        frame.unlink()
    folder.rmdir()
    expect(root, re.escape(f"{SEQUENCES}/cam1/person004 has no {SEQUENCES}/cam2/person004"))


def test_wrong_frame_name_is_named(release):
    root, _ = release
    folder = root / SEQUENCES / "cam1" / "person002"
    (folder / "cam1_person002_00102.png").rename(folder / "cam1_person003_00102.png")
    expect(root, re.escape(f"{SEQUENCES}/cam1/person002/cam1_person003_00102.png: not a frame file named "
                           "cam1_person002_FFFFF.png"))


def test_stray_folder_is_named(release):
    root, _ = release
    (root / SEQUENCES / "cam1" / "person_5").mkdir()
    expect(root, re.escape(f"{SEQUENCES}/cam1/person_5: not a person folder named personNNN"))


def test_gap_in_frame_numbers_is_named(release):
    root, _ = release
    (root / SEQUENCES / "cam2" / "person009" / "cam2_person009_00102.png").unlink()
    expect(root, re.escape(f"{SEQUENCES}/cam2/person009: 1 frames missing between frames 101 and 104 "
                           "(first missing numbers [102])"))


def test_empty_sequence_is_named(release):
    root, _ = release
    folder = root / SEQUENCES / "cam1" / "person001"
    for frame in folder.iterdir():
        frame.unlink()
    expect(root, re.escape(f"{SEQUENCES}/cam1/person001: no frames"))


def test_split_row_that_is_not_a_permutation_is_refused(release):
    root, ls_set = release
    ls_set[2, 0] = ls_set[2, 1]
    scipy.io.savemat(root / SPLIT_FILE, {"ls_set": ls_set})
    read_ilidsvid(str(root), 1)  # other rows are fine
    expect(root, r"ls_set row 3 is not a permutation of 1\.\.6 \(index \d appears twice\)", split=2)


def test_split_file_for_another_number_of_persons_is_refused(release):
    root, ls_set = release
    scipy.io.savemat(root / SPLIT_FILE, {"ls_set": ls_set[:, :4]})
    expect(root, re.escape("ls_set has shape (10, 4); expected (splits, 6)"))


def test_split_out_of_range_is_refused(release):
    root, _ = release
    expect(root, re.escape("split 10 asked, the file has splits 0..9"), split=10)
