"""A real Ray cluster of two nodes on 127.0.0.1 (`ray start` processes), the run's storage on moto's S3
server: the second node killed mid-run (its raylet and workers, by process id). An elastic run
(train.min_workers) goes on with the workers left and grows back when the node returns; a fixed group fails
with how to resume.
"""

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import ray.cloudpickle
from ray.train import UserCallback
from test_train import OVERRIDES, shards_uri  # noqa: F401 (shards_uri is a fixture)

from stal_ray.config import load_config
from stal_ray.core import storage
from stal_ray.train.tensorboard import read_scalars
from stal_ray.train.trainer import WorkersLostError, train

# the cluster of `ray start` processes, shared with bench/node_loss.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from multinode_cluster import Cluster, HeadStartError, alive_nodes, cluster_env, wait_for  # noqa: E402

pytestmark = pytest.mark.multinode

# Ray Train's wait per attempt to start a worker group (60 s by default): short, so a fixed group gives up
# within the test (train.worker_wait_s counts attempts of it)
START_TIMEOUT_S = "10"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, moto_server):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray is already running in this test process: run the multinode tests apart "
                    "(make test-multinode)")
    tmp = tmp_path_factory.mktemp("cluster")
    # the nodes' processes reach moto by the endpoint variable (Ray Train's pyarrow S3 and our fsspec)
    env = cluster_env(AWS_ENDPOINT_URL=moto_server)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", moto_server)
        patch.setenv("RAY_AUTH_MODE", "disabled")
        patch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", START_TIMEOUT_S)
        nodes = start_head(tmp, env)
        try:
            nodes.start_second()
            connect(ray, nodes.address)
            wait_for(lambda: alive_nodes(ray) == 2, 120, "the second node to join")
            yield nodes, ray
        finally:
            ray.shutdown()
            nodes.stop()


def start_head(tmp: Path, env: dict[str, str], attempts: int = 2) -> Cluster:
    """A cluster whose head has started, started again when the first head's `ray start` gave up (its GCS
    missed the start's deadline on a loaded 2-core machine, once in CI)."""
    for attempt in range(1, attempts + 1):
        folder = tmp / f"attempt-{attempt}"
        folder.mkdir()
        nodes = Cluster(folder, env)
        try:
            nodes.wait_for_head()
            return nodes
        except HeadStartError:
            nodes.stop()
            if attempt == attempts:
                raise


def connect(ray, address: str, attempts: int = 3) -> None:
    """ray.init to the cluster, again when the head's GCS did not answer in time: the driver asks it which
    of this host's raylets to join, and on a loaded 2-core machine that call can miss its 60 s deadline."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            return
        except (ConnectionError, RuntimeError):
            if attempt == attempts:
                raise
            ray.shutdown()


class ReportLog(UserCallback):
    """A Ray Train callback (in the controller, on this host) that appends every report's time, iteration
    and worker count to a local file, for the test to follow the run as it goes."""

    def __init__(self, path: Path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics:
            with open(self.path, "a") as out:
                out.write(json.dumps({"time": time.time(), "iteration": metrics[0]["iteration"],
                                      "workers": metrics[0]["workers"]}) + "\n")


# the controller that runs it cannot import this test file: ship the class itself
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def reports(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_in_thread(function) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 (handed to the test thread)
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def config_for(bucket: str, *overrides):
    return load_config(None, OVERRIDES + [f"train.storage_path={bucket}/runs", "train.num_workers=2",
                                          "train.worker_resource=trainer", "train.checkpoint_every=4",
                                          "train.log_every=4", *overrides])


def test_a_head_that_exits_during_its_start_is_reported_not_waited_on(tmp_path):
    # `ray start --head` refusing its arguments stands in for a head whose GCS missed the start's deadline
    nodes = Cluster(tmp_path, cluster_env(), head_cpus=-1)
    started = time.monotonic()
    try:
        with pytest.raises(HeadStartError, match="ray start --head exited with 1"):
            nodes.wait_for_head(timeout=60)
    finally:
        nodes.stop()
    assert time.monotonic() - started < 30


def test_an_elastic_run_goes_on_without_a_lost_node_and_grows_back(cluster, shards_uri,  # noqa: F811
                                                                  make_bucket, tmp_path):
    nodes, ray = cluster
    config = config_for(make_bucket(), "train.min_workers=1", "train.iterations=80",
                        "train.resize_check_s=5", "train.max_failures=3")
    log = tmp_path / "reports.jsonl"
    thread, outcome = run_in_thread(lambda: train(config, shards_uri, name="elastic",
                                                  callbacks=[ReportLog(log)]))
    wait_for(lambda: any(r["workers"] == 2 for r in reports(log)) or "error" in outcome, 300,
             "a report of the two-worker group")
    assert "error" not in outcome, outcome.get("error")
    killed_at, before = time.time(), reports(log)[-1]["iteration"]
    killed = nodes.kill_second()
    wait_for(lambda: any(r["workers"] == 1 for r in reports(log)) or "error" in outcome, 300,
             "a report of the one-worker group")
    shrunk = next(r for r in reports(log) if r["workers"] == 1)
    nodes.start_second()
    wait_for(lambda: alive_nodes(ray) == 2, 120, "the second node to join again")
    returned_at = time.time()
    wait_for(lambda: reports(log)[-1]["workers"] == 2 or "error" in outcome or not thread.is_alive(), 300,
             "the group to grow back to two workers")
    grown = reports(log)[-1]
    thread.join(timeout=420)
    assert not thread.is_alive(), "the elastic run did not finish"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.metrics["iteration"] == 80
    workers = [r["workers"] for r in reports(log)]
    assert workers[0] == 2 and 1 in workers and workers[-1] == 2, f"workers per report: {workers}"
    fs, path = storage.filesystem(result.run_dir)
    fs.get(f"{path}/tensorboard", str(tmp_path / "run" / "tensorboard"), recursive=True)
    assert [value for _, value in read_scalars(str(tmp_path / "run"))["train/workers"]] == workers
    print(f"\nnode loss: killed {len(killed)} processes at iteration {before} (last report); the one-worker "
          f"group reported iteration {shrunk['iteration']} {shrunk['time'] - killed_at:.1f} s later; "
          f"workers per report {workers}; grew back {grown['time'] - returned_at:.1f} s after the node "
          f"returned, at iteration {grown['iteration']}")


def test_a_fixed_group_waits_a_bounded_time_then_says_how_to_resume(cluster, shards_uri,  # noqa: F811
                                                                   make_bucket, tmp_path):
    nodes, ray = cluster
    wait_for(lambda: alive_nodes(ray) == 2, 120, "the second node")
    config = config_for(make_bucket(), "train.iterations=400", "train.max_failures=1",
                        "train.worker_wait_s=20")
    log = tmp_path / "reports.jsonl"
    thread, outcome = run_in_thread(lambda: train(config, shards_uri, name="fixed",
                                                  callbacks=[ReportLog(log)]))
    wait_for(lambda: reports(log) or "error" in outcome, 300, "a report of the two-worker group")
    nodes.kill_second()
    killed_at = time.time()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the fixed group did not give up"
    error = outcome.get("error")
    assert isinstance(error, WorkersLostError), error
    for hint in ("--name fixed", "--min-workers", "train.worker_wait_s"):
        assert hint in str(error)
    print(f"\nfixed group: failed {time.time() - killed_at:.1f} s after the node was killed: {error}")
