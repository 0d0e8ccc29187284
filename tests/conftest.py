"""Shared fixtures: a MARS index at the real scale (real track tables, name lists written to agree)."""

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

# free ports and process-group stops: one copy, in the cluster helper bench/ and the multinode tests share
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from multinode_cluster import free_port, stop_process_group  # noqa: E402, F401 - tests import them from here

# Ray Train's controller polls its worker group every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a run's end
# and a lost worker wait up to that long to be seen; the suite's runs poll every 0.5 s: about 2 s less per run
# on 2 cores (Ray Train hands the variable to its controller; the jobs that tests start inherit it)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

# the real release's index tables, copied from shared/mars/info so a clean checkout has them
REAL_MARS_INFO = Path(__file__).parent / "data" / "mars_info"


def write_name_list(table: np.ndarray, path: Path) -> None:
    """One NNNNCcTttttFfff.jpg per frame of every track table row, tracklet numbers counted per identity."""
    tracklet_of = {}
    lines = []
    for first, last, identity, camera in table.tolist():
        tracklet_of[identity] = tracklet_of.get(identity, 0) + 1
        folder = "00-1" if identity == -1 else f"{identity:04d}"
        prefix = f"{folder}C{camera}T{tracklet_of[identity]:04d}F"
        lines.extend(f"{prefix}{frame:03d}.jpg" for frame in range(1, last - first + 2))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def real_scale_mars_index(tmp_path_factory) -> Path:
    """A release root whose info/ holds copies of the real MARS .mat tables and name lists that agree with
    them (509,914 train and 681,089 test names); no images, so read it with check_images=False."""
    if not REAL_MARS_INFO.is_dir():
        pytest.skip(f"the real MARS index files are not at {REAL_MARS_INFO}")
    root = tmp_path_factory.mktemp("mars_real_index")
    info = root / "info"
    info.mkdir()
    for split in ("train", "test"):
        source = REAL_MARS_INFO / f"tracks_{split}_info.mat"
        shutil.copyfile(source, info / source.name)
        table = scipy.io.loadmat(source)[f"track_{split}_info"]
        write_name_list(table, info / f"{split}_name.txt")
    shutil.copyfile(REAL_MARS_INFO / "query_IDX.mat", info / "query_IDX.mat")
    return root


# ---------------------------------------------------------------------------------------------- S3 (moto)

# Fake credentials for the moto server; real ones from the developer's environment must never reach it.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}
# Unset for the session: a profile, token or endpoint from the developer's shell would redirect the tests.
UNSET_AWS_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "STAL_S3_ENDPOINT")


@pytest.fixture(scope="session")
def moto_server():
    """Endpoint URL of moto's S3 server on 127.0.0.1: a real HTTP S3 protocol server, reached through the same
    s3fs/botocore code as a user's bucket (not an in-process mock), with fake credentials in the environment
    for the whole session (subprocesses inherit them)."""
    from moto.server import ThreadedMotoServer  # imported here: only the S3 tests pay for moto

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    with pytest.MonkeyPatch.context() as env:
        for name, value in FAKE_AWS_ENV.items():
            env.setenv(name, value)
        for name in UNSET_AWS_ENV:
            env.delenv(name, raising=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="session")
def make_bucket(moto_server):
    """make_bucket(name=None) -> "s3://<name>": a new empty bucket on the moto server (unique if unnamed)."""
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")

    def make(name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=name)
        return f"s3://{name}"

    return make


# ---------------------------------------------------------------------------------------------- shards

# Small enough to write in a second, large enough for several shard files, every tracklet kind and queries.
SMALL_RELEASE = dict(identities=5, test_identities=3, cameras=3, tracklets_per_identity=(2, 3),
                     frames_per_tracklet=(3, 6), height=32, width=16, junk_tracklets=2,
                     distractor_tracklets=2)


@pytest.fixture(scope="session")
def small_release_root(tmp_path_factory) -> str:
    """Root of a small synthetic MARS release (with info/keypoints.parquet), shared by the shard tests."""
    from stal_ray.data.synthetic.generator import write_synthetic_release

    return write_synthetic_release(str(tmp_path_factory.mktemp("small_release") / "release"), **SMALL_RELEASE)


# ---------------------------------------------------------------------------------------------- Ray


def pytest_collection_modifyitems(items):
    """Tests marked own_cluster_first run before the others (in their order otherwise): the shared cluster
    below, once a test has started it, stays up with its idle workers and leftover actors (~0.2 of a core
    on 2 cores), and a test that runs a cluster of its own beside it shares the cores with it. The GPU
    check's quick test: 74.5 s after the tests before it in file order, 60.9 s before them (and the tests
    together 188 s against 174 s)."""
    items.sort(key=lambda item: item.get_closest_marker("own_cluster_first") is None)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session. More logical CPUs than this machine's 2 cores: with
    num_cpus=2, Ray Data stages and train workers starve each other and hang (docs/architecture.md,
    "Ray resources")."""
    import ray

    # "local": never a cluster that `ray start` left on this machine (a bare ray.init() would join it)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True, scope="session")
def _shard_hash_cache(tmp_path_factory):
    """The shard checksum cache (stal_ray/data/prepared/integrity.py) of this session, never the user's own:
    set in the environment before Ray starts, so jobs and Ray workers of the session share it."""
    os.environ["STAL_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash_cache") / "shard-hashes.json")
    yield
    os.environ.pop("STAL_HASH_CACHE", None)
