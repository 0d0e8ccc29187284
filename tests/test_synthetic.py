"""The synthetic release: determinism, counts from the arguments, MARS layout, keypoints, cache, CLI."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.io
from PIL import Image

from stal_ray.data.releases.mars import read_mars
from stal_ray.data.synthetic import generator as synthetic
from stal_ray.data.synthetic import render as synthetic_render
from stal_ray.data.synthetic.generator import ensure_synthetic_release, write_synthetic_release

# Fixed ranges make every count follow from the arguments (see write_synthetic_release's docstring).
TINY = dict(
    identities=5,
    test_identities=3,
    cameras=3,
    tracklets_per_identity=(2, 2),
    frames_per_tracklet=(5, 5),
    junk_tracklets=2,
    distractor_tracklets=1,
    height=48,
    width=24,
)
TRAIN_TRACKLETS = (5 - 1) * 2 + 1  # the last training identity has a single tracklet
TEST_TRACKLETS = 3 * 2 + 2 + 1
NAME = re.compile(r"^(\d{4}|00-1)C(\d)T(\d{4})F(\d{3})\.jpg$")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return Path(write_synthetic_release(str(tmp_path_factory.mktemp("tiny") / "release"), **TINY))


def release_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tiny, tmp_path):
    again = release_files(Path(write_synthetic_release(str(tmp_path / "again"), **TINY)))
    assert again == release_files(tiny)  # every file, .mat and parquet included
    other = release_files(Path(write_synthetic_release(str(tmp_path / "other"), **TINY, seed=1)))
    assert other["info/keypoints.parquet"] != again["info/keypoints.parquet"]
    common = [path for path in set(other) & set(again) if path.endswith(".jpg")]
    assert common and all(other[path] != again[path] for path in common)


def test_counts_follow_the_arguments(tiny):
    train_names = (tiny / "info/train_name.txt").read_text().splitlines()
    test_names = (tiny / "info/test_name.txt").read_text().splitlines()
    assert len(train_names) == TRAIN_TRACKLETS * 5 == len(list(tiny.glob("bbox_train/*/*.jpg")))
    assert len(test_names) == TEST_TRACKLETS * 5 == len(list(tiny.glob("bbox_test/*/*.jpg")))
    train = scipy.io.loadmat(tiny / "info/tracks_train_info.mat")["track_train_info"]
    test = scipy.io.loadmat(tiny / "info/tracks_test_info.mat")["track_test_info"]
    query = scipy.io.loadmat(tiny / "info/query_IDX.mat")["query_IDX"]
    # the real release's variables, shapes and dtypes
    assert (train.shape, train.dtype, test.shape, test.dtype) == ((9, 4), np.int32, (9, 4), np.int32)
    assert (query.shape, query.dtype) == ((1, 3), np.uint16)  # every test identity has 2 cameras
    assert sorted(set(train[:, 2])) == [1, 2, 3, 4, 5]
    assert sorted(set(test[:, 2])) == [-1, 0, 6, 7, 8]  # test identities continue after the training ones
    assert list(test[:, 2]).count(-1) == 2 and list(test[:, 2]).count(0) == 1
    assert set(test[:, 3]) | set(train[:, 3]) <= {1, 2, 3}
    assert sorted(test[query[0] - 1, 2]) == [6, 7, 8]


def test_layout_and_names_are_those_of_mars(tiny):
    assert sorted(os.listdir(tiny)) == ["bbox_test", "bbox_train", "info"]
    assert sorted(os.listdir(tiny / "info")) == [
        "keypoints.parquet", "query_IDX.mat", "test_name.txt", "tracks_test_info.mat",
        "tracks_train_info.mat", "train_name.txt",
    ]  # fmt: skip
    assert sorted(os.listdir(tiny / "bbox_test")) == ["00-1", "0000", "0006", "0007", "0008"]
    for split in ("train", "test"):
        names = (tiny / f"info/{split}_name.txt").read_text().splitlines()
        assert names == sorted(names)  # name-list order is file-name order, as in MARS
        table = scipy.io.loadmat(tiny / f"info/tracks_{split}_info.mat")[f"track_{split}_info"]
        for first, last, identity, camera in table:
            parts = [NAME.match(name).groups() for name in names[first - 1 : last]]
            assert {(-1 if p[0] == "00-1" else int(p[0]), int(p[1]), p[2]) for p in parts} == {
                (identity, camera, parts[0][2])
            }
            assert [int(p[3]) for p in parts] == list(range(1, last - first + 2))
        for name in names:
            with Image.open(tiny / f"bbox_{split}" / name[:4] / name) as image:
                assert (image.format, image.size, image.mode) == ("JPEG", (24, 48), "RGB")


def test_keypoints_cover_every_frame_in_pixels(tiny):
    table = pq.read_table(tiny / "info/keypoints.parquet")
    assert table.schema.field("name").type == pa.string()
    assert table.schema.field("keypoints").type == pa.list_(pa.float32(), 42)
    names = [
        *(tiny / "info/train_name.txt").read_text().split(),
        *(tiny / "info/test_name.txt").read_text().split(),
    ]
    assert table["name"].to_pylist() == names
    keypoints = np.asarray(table["keypoints"].to_pylist(), np.float32).reshape(-1, 14, 3)
    person = np.array([not name.startswith(("00-1", "0000")) for name in names])
    x, y, confidence = keypoints[person].transpose(2, 0, 1)
    assert (x >= 0).all() and (x < 24).all() and (y >= 0).all() and (y < 48).all()
    assert ((confidence == 0) | ((confidence >= 0.7) & (confidence <= 1))).all()
    assert (keypoints[~person, :, 2] == 0).all()  # junk and distractors: no person, no joints
    # head above neck above hips above ankles: the figure stands upright
    assert (y[:, 0] < y[:, 1]).all() and (y[:, 1] < y[:, 8]).all() and (y[:, 8] < y[:, 10]).all()


def test_occlusion_hides_joints_of_that_share_of_frames(tmp_path):
    def hidden(occlusion):
        root = write_synthetic_release(str(tmp_path / str(occlusion)), **TINY, occlusion=occlusion)
        table = pq.read_table(Path(root) / "info/keypoints.parquet")
        keypoints = np.asarray(table["keypoints"].to_pylist()).reshape(-1, 14, 3)
        person = np.array([not name.startswith(("00-1", "0000")) for name in table["name"].to_pylist()])
        return (keypoints[person, :, 2] == 0).sum(1)

    assert (hidden(0.0) == 0).all()
    always = hidden(1.0)
    assert (always > 0).all() and (always < 14).all()  # part of the body, never all of it


def test_default_release_has_the_documented_edge_cases(tmp_path):
    release = read_mars(ensure_synthetic_release(cache_dir=str(tmp_path)))
    tracklets_of = {}
    for tracklet in release.train:
        tracklets_of.setdefault(tracklet.identity, []).append(tracklet)
    assert len(tracklets_of) == 24 and len(release.identities("test")) == 16
    assert len(tracklets_of[24]) == 1  # an identity with a single tracklet
    assert len(tracklets_of[1][0].frames) < 8  # a tracklet shorter than T = 8
    assert len(release.queries) == 16
    assert {t.camera for t in release.train + release.test} == {1, 2, 3, 4}


def test_cache_is_generated_once_and_reused(tmp_path, monkeypatch):
    calls = []
    real = synthetic.write_synthetic_release
    monkeypatch.setattr(
        synthetic, "write_synthetic_release", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    first = ensure_synthetic_release(cache_dir=str(tmp_path), **TINY)
    stamp = os.stat(Path(first) / "info/train_name.txt").st_mtime_ns
    assert ensure_synthetic_release(cache_dir=str(tmp_path), **TINY) == first
    assert len(calls) == 1 and os.stat(Path(first) / "info/train_name.txt").st_mtime_ns == stamp
    assert (Path(first) / synthetic.COMPLETE_MARKER).exists()
    assert Path(first).parent == tmp_path and Path(first).name.startswith("synthetic-")
    # other arguments, another release; nothing half-written is left beside them
    other = ensure_synthetic_release(cache_dir=str(tmp_path), **{**TINY, "seed": 3})
    assert other != first and len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([Path(first).name, Path(other).name])


def test_cache_regenerates_a_folder_without_its_marker(tmp_path):
    first = Path(ensure_synthetic_release(cache_dir=str(tmp_path), **TINY))
    (first / synthetic.COMPLETE_MARKER).unlink()
    (first / "info/train_name.txt").write_text("truncated\n")
    assert ensure_synthetic_release(cache_dir=str(tmp_path), **TINY) == str(first)
    assert len(read_mars(str(first)).train) == TRAIN_TRACKLETS


def test_bad_arguments_and_non_empty_output_are_refused(tiny):
    with pytest.raises(ValueError, match="frames_per_tracklet"):
        write_synthetic_release(str(tiny.parent / "bad"), frames_per_tracklet=(8, 4))
    with pytest.raises(ValueError, match="cameras"):
        write_synthetic_release(str(tiny.parent / "bad"), cameras=10)
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_release(str(tiny), **TINY)


def test_command_line_writes_a_readable_release(tmp_path):
    out = tmp_path / "cli"
    arguments = [
        "--identities", "3", "--test-identities", "2", "--tracklets-per-identity", "2", "2",
        "--frames-per-tracklet", "3", "3", "--junk-tracklets", "1", "--distractor-tracklets", "0",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "stal_ray.data.synthetic.generator", str(out), *arguments],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    release = read_mars(str(out))
    assert (len(release.train), len(release.test), len(release.queries)) == (2 * 2 + 1, 2 * 2 + 1, 2)
    assert release.identities("train") == [1, 2, 3] and release.identities("test") == [4, 5]


def test_alternate_style_keeps_the_layout_and_changes_colours_and_casts(tiny, tmp_path):
    """The style no config was tuned on: the same tracklets, names and keypoints' layout, other pixels
    (clothing from outside the default palette, stronger camera casts), and its own bytes every time."""
    alternate = Path(write_synthetic_release(str(tmp_path / "alternate"), **TINY, style="alternate"))
    files, default = release_files(alternate), release_files(tiny)
    assert set(files) == set(default)
    assert files == release_files(Path(write_synthetic_release(str(tmp_path / "again"), **TINY,
                                                               style="alternate")))
    jpegs = [path for path in files if path.endswith(".jpg")]
    assert all(files[path] != default[path] for path in jpegs)
    # muted random colours: no identity of the alternate style wears a colour of the default palette
    looks = [synthetic_render.appearance(0, identity, "alternate") for identity in range(1, 40)]
    worn = {colour for look in looks for colour in (look.upper, look.lower)}
    assert not worn & set(synthetic_render.PALETTE)
    casts = np.array([synthetic_render.camera(0, camera, "alternate").cast for camera in range(1, 40)])
    assert casts.min() < 0.8 and casts.max() > 1.2  # beyond the default style's 0.8-1.2
    with pytest.raises(ValueError, match="style = 'neon' is invalid"):
        write_synthetic_release(str(tmp_path / "bad"), **TINY, style="neon")


def _first_frames(root: Path, split: str, identities) -> np.ndarray:
    """(identities, H, W, 3) float: each identity's first frame."""
    return np.stack([np.asarray(Image.open(sorted((root / f"bbox_{split}" / f"{i:04d}").glob("*.jpg"))[0]),
                                np.float64) for i in identities])


def test_recording_sessions_make_neighbouring_identities_alike(tmp_path):
    """session_identities = n: consecutive numbers are recorded together (as MARS numbers its people), so
    they share the session's cameras and light and look alike; 0 keeps every identity independent, with the
    bytes of before."""
    sizes = dict(identities=24, test_identities=6, cameras=6, tracklets_per_identity=(3, 3),
                 frames_per_tracklet=(2, 2), height=64, width=32, occlusion=0.0, seed=3)
    root = Path(write_synthetic_release(str(tmp_path / "sessions"), **sizes, session_identities=6))
    release = read_mars(str(root))
    cameras = {}
    for tracklet in release.train + release.test:
        if tracklet.identity > 0:
            cameras.setdefault((tracklet.identity - 1) // 6, set()).add(tracklet.camera)
    assert len(cameras) == 5 and all(len(seen) == 3 for seen in cameras.values())  # half of the 6 cameras
    assert len(set.union(*cameras.values())) > 3  # sessions run different cameras
    # neighbours alike: a frame is closer to the frames of its session than to the others'
    frames = _first_frames(root, "train", range(1, 25)).reshape(24, -1)
    distance = np.linalg.norm(frames[:, None] - frames[None], axis=-1)
    session = np.arange(24) // 6
    same = (session[:, None] == session[None]) & ~np.eye(24, dtype=bool)
    assert distance[same].mean() < 0.8 * distance[session[:, None] != session[None]].mean()
    # without sessions the same numbers are not alike, and the release is that of before sessions existed
    plain = Path(write_synthetic_release(str(tmp_path / "plain"), **sizes))
    assert release_files(plain) == release_files(
        Path(write_synthetic_release(str(tmp_path / "zero"), **sizes, session_identities=0)))
    frames = _first_frames(plain, "train", range(1, 25)).reshape(24, -1)
    distance = np.linalg.norm(frames[:, None] - frames[None], axis=-1)
    assert distance[same].mean() > 0.9 * distance[session[:, None] != session[None]].mean()
    with pytest.raises(ValueError, match="session_identities = -1 is invalid"):
        write_synthetic_release(str(tmp_path / "bad"), **sizes, session_identities=-1)
