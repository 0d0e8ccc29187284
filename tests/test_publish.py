"""Tests of the versioned publish (stal_ray/data/prepared/publish.py): a prepare killed between writing a
version and swapping the pointer, on local disk and S3 (moto); data sets written before versions; the prepare
lock."""

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stal_ray.core.storage import arrow_filesystem, filesystem
from stal_ray.data.prepared import publish
from stal_ray.data.prepared.manifest import read_manifest, verify
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars

JOB = Path(__file__).resolve().parent.parent / "jobs" / "prepare_mars.py"
TARGET = 24_000

# Runs jobs/prepare_mars.py with the pointer swap held: it writes a marker once the new version is complete
# (the window between copy and swap), then waits for a "go" file, which a test may never write (and kill).
HELD_AT_SWAP = """
import runpy, sys, time
from pathlib import Path
from stal_ray.data.prepared import publish

marker, go, job = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
swap = publish.swap_pointer

def held(*args, **kwargs):
    marker.write_text("version written, pointer not swapped")
    while not go.exists():
        time.sleep(0.05)
    return swap(*args, **kwargs)

publish.swap_pointer = held
sys.argv = [job, *sys.argv[4:]]
runpy.run_path(job, run_name="__main__")
"""


@pytest.fixture(scope="module")
def release(small_release_root):
    return read_mars(small_release_root)


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))


def start_held(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """A prepare subprocess held at the swap, once it has written its version; (process, marker, go)."""
    marker, go = tmp_path / "at-swap", tmp_path / "go"
    command = [sys.executable, "-c", HELD_AT_SWAP, str(marker), str(go), str(JOB), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ))
    deadline = time.monotonic() + 120
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the held prepare ended early: {process.communicate()}")
        assert time.monotonic() < deadline, "the held prepare never reached the swap"
        time.sleep(0.05)
    return process, marker, go


def contents(manifest, endpoint_url=None) -> dict[str, pa.Table]:
    fs, _ = arrow_filesystem(manifest.uri, endpoint_url=endpoint_url)
    return {split: pa.concat_tables(pq.read_table(path, filesystem=fs) for path in manifest.paths(split))
            for split in ("train", "test")}


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path, small_release_root):
    """(output URI, endpoint URL or None) on local disk or in a bucket of the moto server."""
    if request.param == "local":
        return str(tmp_path / "mars"), None
    moto_server = request.getfixturevalue("moto_server")
    return request.getfixturevalue("make_bucket")() + "/prepared/mars", moto_server


def endpoint_args(endpoint_url):
    return ("--endpoint-url", endpoint_url) if endpoint_url else ()


def test_kill_between_copy_and_swap_keeps_the_old_dataset_whole(release, small_release_root, place, tmp_path):
    out, endpoint_url = place
    old = write_shards(release, out, target_file_bytes=TARGET, endpoint_url=endpoint_url, progress=False)
    old_tables = contents(old, endpoint_url)
    args = ("--root", small_release_root, "--out", out, "--overwrite", "--target-file-mb", "0.2",
            *endpoint_args(endpoint_url))
    process, _, _ = start_held(tmp_path, *args)
    try:
        fs, root = filesystem(out, endpoint_url=endpoint_url)
        versions = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/versions", detail=False)}
        [new] = versions - {old.version}
        assert fs.exists(f"{root}/versions/{new}/manifest.json")  # the new version is whole, not yet current
        # a reader inside the window sees the old data set, whole
        during = read_manifest(out, endpoint_url=endpoint_url)
        assert during == old and during.version == old.version
        verify(out, endpoint_url=endpoint_url)
        assert all(contents(during, endpoint_url)[s].equals(old_tables[s]) for s in old_tables)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    # after the kill: still the old data set, whole
    after = read_manifest(out, endpoint_url=endpoint_url)
    assert after == old and after.version == old.version
    verify(out, endpoint_url=endpoint_url)
    assert all(contents(after, endpoint_url)[s].equals(old_tables[s]) for s in old_tables)
    # a re-run takes over the dead run's lock, removes its version and publishes the new data set
    rerun = prepare(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert "written (version v-" in rerun.stdout
    current = read_manifest(out, endpoint_url=endpoint_url)
    assert current.version not in (old.version, new) and current.target_file_bytes == int(0.2 * 2**20)
    assert len(current.files["train"]) < len(old.files["train"])
    verify(out, endpoint_url=endpoint_url)
    assert all(contents(current, endpoint_url)[s].equals(old_tables[s]) for s in old_tables)  # same frames
    versions = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(f"{root}/versions", detail=False)}
    assert versions == {old.version, current.version}  # the killed run's is gone, the previous one kept
    assert not fs.exists(f"{root}/{publish.LOCK}")


def test_dataset_written_before_versions_is_read_then_replaced(release, tmp_path):
    out = tmp_path / "mars"
    written = write_shards(release, str(out), target_file_bytes=TARGET, progress=False)
    # the layout of earlier releases of this code: manifest.json, train/ and test/ at the root, no pointer
    for name in os.listdir(written._root):
        shutil.move(os.path.join(written._root, name), out / name)
    shutil.rmtree(out / "versions")
    (out / "current.json").unlink()
    (out / "train" / "notes.txt").write_text("a user's file")
    legacy = read_manifest(str(out))
    assert legacy == written and legacy.version == publish.LEGACY
    verify(str(out))
    first = write_shards(release, str(out), target_file_bytes=10 * TARGET, overwrite=True, progress=False)
    assert read_manifest(str(out)) == first and (out / "manifest.json").exists()  # kept as the previous one
    assert json.loads((out / "current.json").read_text())["previous"] == publish.LEGACY
    write_shards(release, str(out), target_file_bytes=TARGET, overwrite=True, progress=False)
    assert not (out / "manifest.json").exists() and os.listdir(out / "train") == ["notes.txt"]
    assert not os.listdir(out / "test")


def test_second_prepare_into_one_folder_is_refused_while_the_first_finishes(release, small_release_root,
                                                                            tmp_path):
    out = str(tmp_path / "mars")
    args = ("--root", small_release_root, "--out", out, "--target-file-mb", "0.02")
    first, _, go = start_held(tmp_path, *args)
    try:
        second = prepare(*args)
        assert second.returncode == 2
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
        assert f"{out}: another prepare is writing here (host" in second.stderr
        assert f"pid {first.pid}" in second.stderr and f"{out}/.prepare.lock" in second.stderr
        # one that may wait (as the jobs' embedded data set does) takes the first one's data set
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(write_shards, release, out, target_file_bytes=int(0.02 * 2**20),
                                  progress=False, lock_wait_s=120)
            time.sleep(2)
            assert not waiting.done()
            go.write_text("")
            stdout, stderr = first.communicate(timeout=120)
            assert waiting.result(timeout=120).reused
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert f"{out}: written" in stdout
    assert read_manifest(out) == waiting.result()
    verify(out)
    assert not os.path.exists(os.path.join(out, publish.LOCK))


def test_lock_of_a_live_holder_is_refused_and_of_a_silent_one_taken_over(place):
    out, endpoint_url = place
    fs, root = filesystem(out, endpoint_url=endpoint_url)
    lock = f"{root}/{publish.LOCK}"
    fs.makedirs(root, exist_ok=True)
    holder = {"host": "another-node", "pid": 4242, "token": "theirs", "started": time.time()}
    fs.pipe_file(lock, json.dumps({**holder, "heartbeat": time.time()}).encode())
    with pytest.raises(publish.PrepareLockedError, match="host another-node, pid 4242"):
        with publish.prepare_lock(fs, root, out):
            pass
    fs.pipe_file(lock, json.dumps({**holder, "heartbeat": time.time() - publish.STALE_S - 1}).encode())
    with publish.prepare_lock(fs, root, out):
        assert json.loads(fs.cat_file(lock))["pid"] == os.getpid()
    assert not fs.exists(lock)


def test_held_lock_is_kept_fresh_by_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(publish, "HEARTBEAT_S", 0.1)
    out = str(tmp_path / "mars")
    fs, root = filesystem(out)
    with publish.prepare_lock(fs, root, out):
        first = json.loads(fs.cat_file(f"{root}/{publish.LOCK}"))["heartbeat"]
        time.sleep(0.6)
        assert json.loads(fs.cat_file(f"{root}/{publish.LOCK}"))["heartbeat"] > first
    assert not os.path.exists(f"{root}/{publish.LOCK}")
