"""The MARS release reader: counts on a small synthetic release and on the real index, and bad input."""

import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import scipy.io

from stal_ray.data.releases.base import Release, ReleaseFormatError, Tracklet
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.synthetic.generator import write_synthetic_release

# 4 training identities, 3 test identities, fixed ranges: every count below follows from these
SMALL = dict(
    identities=4,
    test_identities=3,
    cameras=3,
    tracklets_per_identity=(3, 3),
    frames_per_tracklet=(4, 4),
    junk_tracklets=2,
    distractor_tracklets=2,
    height=32,
    width=16,
)
TRAIN_TRACKLETS = 3 * 3 + 1  # identities 1..3 with 3 tracklets, identity 4 with one
TEST_TRACKLETS = 3 * 3 + 2 + 2  # identities 5..7, junk, distractors


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return Path(write_synthetic_release(str(tmp_path_factory.mktemp("small") / "release"), **SMALL))


@pytest.fixture
def broken(small, tmp_path) -> Path:
    """A copy of the small release for a test to damage."""
    return Path(shutil.copytree(small, tmp_path / "release"))


def test_small_release_counts(small):
    release = read_mars(str(small))
    assert isinstance(release, Release) and release.root == str(small)
    assert len(release.train) == TRAIN_TRACKLETS and len(release.test) == TEST_TRACKLETS
    assert sum(len(t.frames) for t in release.train) == TRAIN_TRACKLETS * 4
    assert sum(len(t.frames) for t in release.test) == TEST_TRACKLETS * 4
    assert release.identities("train") == [1, 2, 3, 4]
    assert release.identities("test") == [5, 6, 7]  # junk and distractors are not persons
    assert [t.identity for t in release.test].count(-1) == 2 and [t.identity for t in release.test].count(
        0
    ) == 2
    assert sorted(q.identity for q in release.queries) == [5, 6, 7]
    assert all(q.is_query and q.split == "test" for q in release.queries)
    assert not any(t.is_query for t in release.train)
    assert release.keypoints_path == f"{small}/info/keypoints.parquet"
    with pytest.raises(ValueError, match="split"):
        release.identities("val")


def test_tracklets_point_at_their_frames(small):
    release = read_mars(str(small))
    assert [t.row for t in release.train] == list(range(TRAIN_TRACKLETS))
    first = release.train[0]
    assert first == Tracklet("train", 0, 1, first.camera, first.frames)
    assert first.frames[0] == f"bbox_train/0001/0001C{first.camera}T0001F001.jpg"
    for tracklet in release.train + release.test:
        folder = "00-1" if tracklet.identity == -1 else f"{tracklet.identity:04d}"
        for frame in tracklet.frames:
            split, identity, name = frame.split("/")
            assert (split, identity, name[:4], name[5]) == (
                f"bbox_{tracklet.split}",
                folder,
                folder,
                str(tracklet.camera),
            )
    frame = release.test[-1].frames[-1]
    assert release.read_frame(frame) == (small / frame).read_bytes()
    assert release.read_frame(frame)[:2] == b"\xff\xd8"  # a JPEG


def test_reads_through_fsspec_urls(small):
    memory = fsspec.filesystem("memory")
    memory.put(str(small), "/mars", recursive=True)
    for url in (f"file://{small}", "memory://mars"):
        release = read_mars(url)
        assert (len(release.train), len(release.test), len(release.queries)) == (
            TRAIN_TRACKLETS,
            TEST_TRACKLETS,
            3,
        )
        frame = release.train[1].frames[2]
        assert release.read_frame(frame) == (small / frame).read_bytes()
        assert release.keypoints_path == f"{url}/info/keypoints.parquet"


def test_keypoints_path_is_none_without_the_side_file(broken):
    (broken / "info/keypoints.parquet").unlink()
    assert read_mars(str(broken)).keypoints_path is None


def test_real_scale_index(real_scale_mars_index):
    release = read_mars(str(real_scale_mars_index), check_images=False)
    assert len(release.train) == 8298 and len(release.identities("train")) == 625
    assert sum(len(t.frames) for t in release.train) == 509_914
    assert len(release.test) == 12180 and sum(len(t.frames) for t in release.test) == 681_089
    assert len(release.queries) == 1980
    assert len(release.identities("test")) == 634  # persons only, as /work/shared/mars/README.md counts them
    assert len({q.identity for q in release.queries}) == 626
    identities = np.array([t.identity for t in release.test])
    assert (identities == -1).sum() == 870 and (identities == 0).sum() == 3248
    assert release.test[0].frames[0] == "bbox_test/00-1/00-1C1T0001F001.jpg"
    assert release.keypoints_path is None


def save_table(root: Path, split: str, edit) -> None:
    path = root / f"info/tracks_{split}_info.mat"
    table = scipy.io.loadmat(path)[f"track_{split}_info"]
    scipy.io.savemat(path, {f"track_{split}_info": edit(table.copy())})


def edit_names(root: Path, split: str, edit) -> None:
    path = root / f"info/{split}_name.txt"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")


def test_missing_info_file_says_what_the_layout_is(broken):
    (broken / "info/query_IDX.mat").unlink()
    with pytest.raises(ReleaseFormatError, match=r"missing info/query_IDX\.mat.*bbox_train/<NNNN>/\*\.jpg"):
        read_mars(str(broken))


def test_name_list_too_short_names_file_and_row(broken):
    edit_names(broken, "train", lambda names: names[:-2])
    expected = (
        rf"info/tracks_train_info\.mat row {TRAIN_TRACKLETS} .*outside info/train_name\.txt, which has 38"
    )
    with pytest.raises(ReleaseFormatError, match=expected):
        read_mars(str(broken))


def test_camera_in_name_disagreeing_with_table(broken):
    def swap_camera(table):
        table[1, 3] = table[1, 3] % 3 + 1
        return table

    save_table(broken, "train", swap_camera)
    with pytest.raises(
        ReleaseFormatError, match=r"tracks_train_info\.mat row 2: camera \d in the table but .* line 5"
    ):
        read_mars(str(broken))


def test_identity_in_name_disagreeing_with_table(broken):
    def relabel(table):
        table[-1, 2] = 9
        return table

    save_table(broken, "test", relabel)
    with pytest.raises(
        ReleaseFormatError, match=rf"tracks_test_info\.mat row {TEST_TRACKLETS}: identity 9 in the"
    ):
        read_mars(str(broken))


def test_unparseable_name(broken):
    edit_names(broken, "test", lambda names: names[:2] + ["0005C1T0001F01.jpg"] + names[3:])
    with pytest.raises(
        ReleaseFormatError, match=r"info/test_name\.txt line 3: '0005C1T0001F01\.jpg' is not a MARS"
    ):
        read_mars(str(broken))
    edit_names(broken, "test", lambda names: names[:3] + ["0005X1T0001F001.jpg"] + names[4:])
    with pytest.raises(ReleaseFormatError, match=r"info/test_name\.txt line 3: "):
        read_mars(str(broken))


def relabel_identity(root: Path, split: str, old: int, new: str) -> None:
    """Name list and track table of `split` agreeing that identity `old` is `new` (4 characters)."""
    edit_names(root, split, lambda names: [new + n[4:] if n.startswith(f"{old:04d}") else n for n in names])

    def relabel(table):
        table[table[:, 2] == old, 2] = -1 if new == "00-1" else int(new)
        return table

    save_table(root, split, relabel)


def test_a_person_in_both_splits_is_refused(broken):
    relabel_identity(broken, "test", 5, "0001")  # test person 5 now numbered as training person 1
    with pytest.raises(ReleaseFormatError, match=r"identity 0001 is in both info/tracks_train_info\.mat and "
                                              r"info/tracks_test_info\.mat \(1 identities\); .* disjoint"):
        read_mars(str(broken), check_images=False)


@pytest.mark.parametrize(("label", "kind"), [("00-1", "junk"), ("0000", "distractor")])
def test_junk_or_distractor_in_the_training_split_is_refused(broken, label, kind):
    relabel_identity(broken, "train", 4, label)
    with pytest.raises(ReleaseFormatError, match=rf"tracks_train_info\.mat row {TRAIN_TRACKLETS}: identity "
                                              rf"{kind} .* in the training split"):
        read_mars(str(broken), check_images=False)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t[:, :3], r"track_train_info has shape \(10, 3\); expected \(N, 4\)"),
        (lambda t: np.vstack([t, [[5, 2, 1, 1]]]), r"row 11 \(first 5, last 2\): first frame after last"),
        (lambda t: np.vstack([t, [[5, 4, 1, 1]]]), r"row 11 \(first 5, last 4\): empty tracklet"),
        (lambda t: np.vstack([t, [[0, 4, 1, 1]]]), r"row 11 \(first 0, last 4\): range outside"),
    ],
    ids=["shape", "first-after-last", "empty", "zero-based"],
)
def test_bad_track_table(broken, edit, message):
    save_table(broken, "train", edit)
    with pytest.raises(ReleaseFormatError, match=r"info/tracks_train_info\.mat.*" + message):
        read_mars(str(broken), check_images=False)


def test_query_index_out_of_range(broken):
    query = np.array([[1, TEST_TRACKLETS + 1]], np.uint16)
    scipy.io.savemat(broken / "info/query_IDX.mat", {"query_IDX": query})
    expected = rf"info/query_IDX\.mat entry 2: query index {TEST_TRACKLETS + 1} .*rows 1\.\.{TEST_TRACKLETS}"
    with pytest.raises(ReleaseFormatError, match=expected):
        read_mars(str(broken))


def test_missing_image_files_are_counted_and_shown(broken):
    names = (broken / "info/train_name.txt").read_text().split()
    for name in names[5:7]:
        (broken / "bbox_train" / name[:4] / name).unlink()
    shutil.rmtree(broken / "bbox_train/0004")  # the single-tracklet identity: 4 frames
    with pytest.raises(ReleaseFormatError) as error:
        read_mars(str(broken))
    message = str(error.value)
    assert (
        f"6 of {TRAIN_TRACKLETS * 4} frames listed in info/train_name.txt are missing under bbox_train/"
        in message
    )
    assert f"bbox_train/{names[5][:4]}/{names[5]} (info/train_name.txt line 6)" in message
    assert "check_images=False" in message
    assert len(read_mars(str(broken), check_images=False).train) == TRAIN_TRACKLETS


def test_empty_query_index_is_refused(broken):
    scipy.io.savemat(broken / "info/query_IDX.mat", {"query_IDX": np.zeros((1, 0), np.uint16)})
    with pytest.raises(ReleaseFormatError, match=r"info/query_IDX\.mat: query_IDX is empty.*1-based rows of"):
        read_mars(str(broken))


@pytest.mark.parametrize(("identity", "kind"), [(-1, "junk"), (0, "distractor")])
def test_query_on_a_junk_or_distractor_row_is_refused(broken, identity, kind):
    table = scipy.io.loadmat(broken / "info/tracks_test_info.mat")["track_test_info"]
    row = int(np.flatnonzero(table[:, 2] == identity)[0]) + 1
    query = scipy.io.loadmat(broken / "info/query_IDX.mat")["query_IDX"].ravel().tolist()
    scipy.io.savemat(broken / "info/query_IDX.mat", {"query_IDX": np.array([query + [row]], np.uint16)})
    expected = (rf"info/query_IDX\.mat entry {len(query) + 1}: query index {row} is "
                rf"info/tracks_test_info\.mat row {row}, a {kind} \({identity}\) tracklet.*remove the entry")
    with pytest.raises(ReleaseFormatError, match=expected):
        read_mars(str(broken))


@pytest.mark.parametrize("start", [0, 2], ids=["duplicate-row", "partial-overlap"])
def test_overlapping_tracklet_ranges_are_refused(broken, start):
    # a row inserted after row 1 over (part of) its frames: identities and cameras still agree with the names
    save_table(broken, "train",
               lambda t: np.vstack([t[:1], [[t[0, 0] + start, t[0, 1], t[0, 2], t[0, 3]]], t[1:]]))
    expected = (rf"info/tracks_train_info\.mat rows 1 \(frames 1\.\.4\) and 2 \(frames {start + 1}\.\.4\) "
                r"share frames of info/train_name\.txt.*fix the first/last columns")
    with pytest.raises(ReleaseFormatError, match=expected):
        read_mars(str(broken), check_images=False)
