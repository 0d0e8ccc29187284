"""Tests of jobs/prepare_mars.py run as a user runs it: a subprocess, to a local folder and to S3 (moto)."""

import os
import subprocess
import sys
from pathlib import Path

from stal_ray.data.prepared.manifest import read_manifest, verify

JOB = Path(__file__).resolve().parent.parent / "jobs" / "prepare_mars.py"


def prepare(*args: str) -> subprocess.CompletedProcess:
    # os.environ carries the moto session's fake credentials when that fixture is active
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))


def test_prepares_a_local_dataset_then_finds_it_up_to_date(small_release_root, tmp_path):
    out = str(tmp_path / "mars")
    args = ("--root", small_release_root, "--out", out, "--target-file-mb", "0.02")
    first = prepare(*args)
    assert first.returncode == 0, first.stderr
    assert f"{out}: written" in first.stdout and "train: 5 identities" in first.stdout
    manifest = read_manifest(out)
    assert len(manifest.files["train"]) > 1 and manifest.counts["test"]["queries"] > 0
    verify(out)
    again = prepare(*args)
    assert again.returncode == 0, again.stderr
    assert "already up to date, nothing written" in again.stdout
    assert "frame bytes are not compared: after changing frames, pass --overwrite" in again.stdout
    assert read_manifest(out) == manifest


def test_prepares_on_s3(small_release_root, moto_server, make_bucket):
    out = make_bucket() + "/prepared/mars"
    result = prepare("--root", small_release_root, "--out", out, "--endpoint-url", moto_server)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out, endpoint_url=moto_server)
    assert manifest.counts["train"]["identities"] == 5
    verify(out, endpoint_url=moto_server)


def test_bad_mars_root_exits_2_with_one_line(tmp_path):
    result = prepare("--root", str(tmp_path / "no-release"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "info/train_name.txt" in result.stderr and str(tmp_path / "no-release") in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_bucket_exits_2_with_one_line(small_release_root, moto_server):
    result = prepare("--root", small_release_root, "--out", "s3://no-such-bucket-here/mars",
                     "--endpoint-url", moto_server)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "bucket 'no-such-bucket-here' does not exist" in result.stderr
