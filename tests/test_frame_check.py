"""Tests of the frame checks of a prepare (stal_ray/data/releases/frame_check.py): truncated, zero-byte and
non-JPEG frames left out and listed, too many refused, symlinks out of the release root refused."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from stal_ray.data.prepared.manifest import DatasetExistsError, IncompleteDatasetError, read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.frame_check import BadFramesError, UnsafeFrameError, jpeg_problem
from stal_ray.data.releases.mars import read_mars

JOB = Path(__file__).resolve().parent.parent / "jobs" / "prepare_mars.py"


@pytest.fixture
def root(small_release_root, tmp_path) -> Path:
    """A copy of the small release for a test to damage."""
    return Path(shutil.copytree(small_release_root, tmp_path / "release"))


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 32)).save(buffer, format="PNG")
    return buffer.getvalue()


def damage(root: Path) -> dict[str, str]:
    """Three bad frames, each in another tracklet with good frames left: {path: expected problem}."""
    release = read_mars(str(root))
    train = [t for t in release.train if t.identity > 0]
    truncated, empty, other = train[0].frames[1], train[1].frames[0], release.test[0].frames[-1]
    frame = (root / truncated).read_bytes()
    (root / truncated).write_bytes(frame[: len(frame) // 2])
    (root / empty).write_bytes(b"")
    (root / other).write_bytes(png_bytes())
    return {truncated: "truncated JPEG", empty: "zero-byte file", other: "not a JPEG (a PNG signature"}


def frames_by_path(manifest, release) -> dict[str, bytes]:
    """Stored frame bytes by release path, rebuilt from the rows' per-frame tracklet and frame_index."""
    stored = {}
    tracklets = {(t.split, t.row): t for t in (*release.train, *release.test)}
    for path in manifest.paths("train"):
        for row in pq.read_table(path).to_pylist():
            by_tracklet = {}
            per_frame = zip(row["frames"], row["tracklet"], row["frame_index"], strict=True)
            for frame, tracklet, index in per_frame:
                by_tracklet.setdefault(tracklet, []).append((index, frame))
            for tracklet, frames in by_tracklet.items():
                assert [i for i, _ in frames] == list(range(len(frames)))  # contiguous after drops
                stored[("train", tracklet)] = [f for _, f in frames]
    for path in manifest.paths("test"):
        for row in pq.read_table(path).to_pylist():
            stored[("test", row["tracklet"])] = row["frames"]
    found = {}
    for key, frames in stored.items():
        good = [p for p in tracklets[key].frames
                if jpeg_problem((Path(release.root) / p).read_bytes()) is None]
        assert len(good) == len(frames)
        found.update(zip(good, frames, strict=True))
    return found


def test_jpeg_problem_names_each_kind():
    buffer = io.BytesIO()
    Image.new("RGB", (16, 32), (200, 10, 10)).save(buffer, format="JPEG")
    frame = buffer.getvalue()
    assert jpeg_problem(frame) is None and jpeg_problem(frame + b"\0\0\n") is None  # padding is harmless
    assert jpeg_problem(b"") == "zero-byte file"
    assert jpeg_problem(frame[:-10]).startswith("truncated JPEG")
    assert jpeg_problem(png_bytes()).startswith("not a JPEG")


def test_bad_frames_are_left_out_listed_and_counted(root):
    bad = damage(root)
    release = read_mars(str(root))
    out = str(root.parent / "mars")
    manifest = write_shards(release, out, target_file_bytes=24_000, max_bad_fraction=0.05, progress=False)
    listed = {entry["path"]: entry["problem"] for entry in manifest.bad_frames}
    assert set(listed) == set(bad) and all(listed[p].startswith(bad[p]) for p in bad)
    assert read_manifest(out).bad_frames == manifest.bad_frames
    assert (manifest.counts["train"]["bad_frames"], manifest.counts["test"]["bad_frames"]) == (2, 1)
    train = [t for t in release.train if t.identity > 0]
    assert manifest.counts["train"]["frames"] == sum(len(t.frames) for t in train) - 2
    stored = frames_by_path(manifest, release)
    assert not set(bad) & set(stored)
    assert all(frame == (root / path).read_bytes() for path, frame in stored.items())
    # a bad frame replaced by a good one makes the data set out of date: it is not silently kept out
    shutil.copyfile(root / train[0].frames[0], root / next(iter(bad)))
    with pytest.raises(DatasetExistsError, match="set of good frames.*overwrite"):
        write_shards(release, out, target_file_bytes=24_000, max_bad_fraction=0.05, progress=False)


def test_summary_lists_bad_frames_and_the_threshold_refuses_a_damaged_release(root):
    bad = damage(root)
    out = str(root.parent / "mars")
    run = [sys.executable, str(JOB), "--root", str(root), "--out", out]
    result = subprocess.run([*run, "--max-bad-frames", "0.05"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "3 bad frames left out of their tracklets" in result.stdout
    assert all(path in result.stdout for path in bad)
    refused = subprocess.run([*run, "--overwrite"], capture_output=True, text=True, timeout=120)  # 0.1 %
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "more than 0.100% of the" in refused.stderr and "--max-bad-frames" in refused.stderr
    assert read_manifest(out).bad_frames  # the refused run published nothing: the first data set stays


def test_tracklet_with_no_good_frame_is_refused(root):
    release = read_mars(str(root))
    tracklet = release.test[2]
    for path in tracklet.frames:
        (root / path).write_bytes(b"")
    with pytest.raises(BadFramesError, match=f"test tracklet in row 3 of its track table has no whole JPEG "
                                             f"frame left.*{tracklet.frames[0]}: zero-byte file"):
        write_shards(release, str(root.parent / "mars"), max_bad_fraction=1.0, progress=False)


def test_symlink_out_of_the_release_is_refused_before_it_is_read(root):
    secret = root.parent / "credentials"
    secret.write_text("aws_secret_access_key = do-not-ship")
    release = read_mars(str(root))
    frame = release.train[1].frames[2]
    (root / frame).unlink()
    (root / frame).symlink_to(secret)
    out = str(root.parent / "mars")
    with pytest.raises(UnsafeFrameError, match=f"frame {frame} resolves to {secret}, outside the release"):
        write_shards(release, out, progress=False)
    with pytest.raises(IncompleteDatasetError):
        read_manifest(out)
    for folder, _, names in os.walk(root.parent / "mars"):  # nothing of the secret was written anywhere
        assert not any(b"do-not-ship" in (Path(folder) / n).read_bytes() for n in names)
    result = subprocess.run([sys.executable, str(JOB), "--root", str(root), "--out", out],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"frame {frame} resolves to {secret}" in result.stderr


def test_links_inside_the_release_and_linked_image_folders_are_followed(root):
    release = read_mars(str(root))
    inside = release.train[0].frames
    (root / inside[1]).unlink()
    (root / inside[1]).symlink_to(root / inside[0])  # a duplicate frame linked inside the release
    # the image folder on another disk, linked into the release, with a frame linked to a sibling there
    elsewhere = shutil.move(root / "bbox_test", root.parent / "other-disk")
    (root / "bbox_test").symlink_to(elsewhere)
    frames = release.test[0].frames
    (root / frames[1]).unlink()
    (root / frames[1]).symlink_to(Path(elsewhere) / os.path.relpath(frames[0], "bbox_test"))
    manifest = write_shards(release, str(root.parent / "mars"), progress=False)
    assert manifest.bad_frames == [] and manifest.counts["test"]["frames"] == sum(len(t.frames)
                                                                                 for t in release.test)
