"""The rest of the job on a lost node (issue 32, item 5), on a real cluster of two `ray start` nodes on
127.0.0.1: the training stream's read and decoding tasks, evaluation's feature actors and pose estimation's
model actors each lose the second node (its raylet and workers SIGKILLed by process id) while one of their
calls runs there, and each gives the same result as an uninterrupted run of the same seed: every group, every
tracklet's features and every frame's joints exactly once.

Each stage's calls are slowed to ~0.4 s (a wrapper sent to the workers by value), as real-sized calls take,
so that the kill lands while a call runs on the second node; every call appends a line (start or end, its
node and its key) to a log on this host, so the test kills when a call has started there and not ended, and
counts the calls run again afterwards.
"""

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle
import ray.data
import torch
from test_multinode import cluster  # noqa: F401 (a fixture: this module's own two-node cluster)

from stal_ray.config import load_config
from stal_ray.data.prepared.manifest import read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.stream import pipeline
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.evaluate import evaluate as evaluation
from stal_ray.evaluate import features
from stal_ray.evaluate.feature_store import load_features
from stal_ray.evaluate.features import ChunkFeatures, extract_features
from stal_ray.model.export import save_model
from stal_ray.model.stal import STAL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from multinode_cluster import alive_nodes, wait_for  # noqa: E402

pytestmark = pytest.mark.multinode

CALL_S = 0.4  # each slowed call's sleep
OVERRIDES = ["model.backbone=tiny", "model.feature_dim=8", "model.pose_source=keypoints", "data.seq_len=2",
             "data.height=32", "data.width=16", "data.identities_per_batch=2", "data.clips_per_identity=2",
             "train.seed=3", "eval.batch_size=2"]

# the workers cannot import this test file: its slowed calls travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------------------------- the call log


class CallLog:
    """Lines {event: start|end, node, key, time} appended by the slowed calls on every node (one host)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __call__(self, event: str, key) -> None:
        line = json.dumps({"event": event, "node": ray.get_runtime_context().get_node_id(), "key": key,
                           "time": time.time()})
        with open(self.path, "a") as out:
            out.write(line + "\n")

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in Path(self.path).read_text().splitlines()] \
            if os.path.exists(self.path) else []

    def nodes(self, event: str) -> set[str]:
        """The nodes with a line of `event`."""
        return {line["node"] for line in self.lines() if line["event"] == event}

    def counts(self) -> dict[str, str]:
        """'event on node' -> lines, and seconds from the first line to the first and last of them."""
        lines = self.lines()
        by: dict[str, list[float]] = {}
        for line in lines:
            name = f"{line['event']} on {line['node'][:8]}"
            by.setdefault(name, []).append(line["time"] - lines[0]["time"])
        return {name: f"{len(times)} at {min(times):.1f}-{max(times):.1f} s" for name, times in by.items()}

    def running_on(self, node: str) -> bool:
        """A call started on `node` and not ended."""
        started, ended = self._count(node, "start"), self._count(node, "end")
        return started > ended

    def _count(self, node: str, event: str) -> int:
        return sum(1 for line in self.lines() if line["node"] == node and line["event"] == event)

    def summary(self, lost: str, killed_at: float) -> str:
        lines = self.lines()
        starts = [line for line in lines if line["event"] == "start"]
        ends = {json.dumps(line["key"]) for line in lines if line["event"] == "end" and line["node"] != lost}
        cut = [line for line in starts if line["node"] == lost and json.dumps(line["key"]) not in
               {json.dumps(e["key"]) for e in lines if e["event"] == "end" and e["node"] == lost}]
        again = [line for line in starts if line["time"] > killed_at and line["node"] != lost
                 and json.dumps(line["key"]) in {json.dumps(s["key"]) for s in starts if s["node"] == lost}]
        return (f"{len(starts)} calls ({sum(1 for s in starts if s['node'] == lost)} on the lost node, "
                f"{len(cut)} of them cut by the kill, {len(again)} run again elsewhere); "
                f"{len(ends)} calls ended on the head")


def pairs(first, second) -> list:
    """A call's key: its rows' (first, second) values, sorted."""
    return sorted(zip(np.asarray(first).tolist(), np.asarray(second).tolist(), strict=True))


def slowed(module, name: str, log: CallLog, key):
    """The function `name` of `module` as a call that logs its start and end and sleeps CALL_S first. The
    function is looked up where the call runs, in a worker that has not replaced it by this call."""

    def call(batch, *args, **kwargs):
        log("start", key(batch))
        time.sleep(CALL_S)
        out = getattr(module, name)(batch, *args, **kwargs)
        log("end", key(batch))
        return out

    return call


def lost_node(ray) -> str:
    """The second node's id (the driver runs on the head)."""
    head = ray.get_runtime_context().get_node_id()
    return next(node["NodeID"] for node in ray.nodes() if node["Alive"] and node["NodeID"] != head)


def two_nodes(nodes, ray) -> str:
    """Start the second node again when a test before killed it; -> its node id."""
    if nodes.second is None or nodes.second.poll() is not None:
        known = {node["NodeID"] for node in ray.nodes()}
        nodes.start_second()
        wait_for(lambda: any(n["Alive"] and n["NodeID"] not in known for n in ray.nodes()), 240,
                 "the second node to join again")
    wait_for(lambda: alive_nodes(ray) == 2, 120, "two live nodes")
    return lost_node(ray)


def run_and_kill(nodes, log: CallLog, second: str, work) -> tuple[object, float, float, list[int]]:
    """Run work() in a thread, SIGKILL the second node once a call runs there -> (result, seconds,
    kill time, killed pids)."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = work()
        except BaseException as error:  # noqa: BLE001 (handed to the test thread)
            outcome["error"] = error

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    # polled faster than a call lasts (CALL_S), so that the kill lands while one runs there
    wait_for(lambda: log.running_on(second) or not thread.is_alive(), 240, "a call on the second node",
             every=0.05)
    assert thread.is_alive(), (f"the work ended before a call ran on the second node ({second}); the calls "
                               f"by node and event: {log.counts()}")
    killed_at, killed = time.time(), nodes.kill_second()
    thread.join(timeout=420)
    assert not thread.is_alive(), "the work did not finish after the node was lost"
    assert "error" not in outcome, outcome.get("error")
    return outcome["result"], time.monotonic() - start, killed_at, killed


def timed(work):
    start = time.monotonic()
    result = work()
    return result, time.monotonic() - start


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stages")
    release = write_synthetic_release(str(root / "release"), identities=16, test_identities=6, cameras=2,
                                      tracklets_per_identity=(2, 3), frames_per_tracklet=(6, 12), height=32,
                                      width=16, junk_tracklets=1, distractor_tracklets=1)
    write_shards(read_mars(release), str(root / "shards"), target_file_bytes=20_000, progress=False)
    return root


# ---------------------------------------------------------------------------------------------- stream


def stream_groups(shards: str, config) -> list[tuple]:
    """Every group of epoch 0 as consumed on the head: (identity, group, tracklets, clips' and keypoints'
    bytes), sorted."""
    rows = []
    for batch in pipeline.training_dataset(shards, config, epoch=0).iter_batches(batch_size=None,
                                                                                 batch_format="numpy"):
        for i in range(len(batch["identity"])):
            rows.append((int(batch["identity"][i]), int(batch["group"][i]), tuple(batch["tracklets"][i]),
                         batch["clips"][i].tobytes(), batch["keypoints"][i].tobytes()))
    return sorted(rows)


def test_the_training_stream_loses_a_node_and_every_group_arrives_once(cluster, data_root,  # noqa: F811
                                                                      monkeypatch, tmp_path):
    nodes, ray = cluster
    second = two_nodes(nodes, ray)
    shards = str(data_root / "shards")
    config = load_config(None, OVERRIDES + ["data.decode_concurrency=4"])
    # blocks of 4 groups, so that the epoch is many decoding calls spread over both nodes
    group_bytes = 2 * 2 * 32 * 16 * 3
    monkeypatch.setattr(pipeline, "_BLOCK_BYTES", 4 * group_bytes)
    log = CallLog(tmp_path / "calls.jsonl")
    monkeypatch.setattr(pipeline, "_decode_clips", slowed(
        pipeline, "_decode_clips", log,
        lambda batch: pairs(batch.column("identity"), batch.column("group"))))
    plain, plain_s = timed(lambda: stream_groups(shards, config))
    Path(log.path).unlink()
    lost, lost_s, killed_at, killed = run_and_kill(nodes, log, second, lambda: stream_groups(shards, config))
    keys = [(identity, group) for identity, group, *_ in lost]
    assert len(set(keys)) == len(keys), "a group arrived twice"
    assert lost == plain, "the interrupted epoch differs from the uninterrupted one"
    print(f"\nstream: {len(plain)} groups of epoch 0, each once and equal to the uninterrupted epoch; "
          f"{plain_s:.1f} s uninterrupted, {lost_s:.1f} s with the node killed ({len(killed)} processes); "
          f"{log.summary(second, killed_at)}")


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, data_root) -> str:
    config = load_config(None, OVERRIDES)
    config.data.root = str(data_root / "shards")
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("model") / "model.pt")
    save_model(path, STAL.from_config(config, num_classes=16), config, num_classes=16)
    return path


class SlowChunkFeatures(ChunkFeatures):
    log: CallLog  # set by the test before the actors are made (the class travels by value)
    head: str  # the driver's node

    def __call__(self, batch):
        # Ray Data gives each chunk to the least busy actor, and the head's, up first and beside the data,
        # kept up alone: it ran 76 of 76 calls in one run, 76 of 77 in another, and the kill cut nothing.
        # So the head's calls wait (at most a minute) until a call has started on the second node.
        on_head = ray.get_runtime_context().get_node_id() == self.head
        deadline = time.monotonic() + 60
        while on_head and not self.log.nodes("start") - {self.head} and time.monotonic() < deadline:
            time.sleep(0.1)
        key = pairs(batch["tracklet"], batch["chunk"])
        self.log("start", key)
        time.sleep(CALL_S)
        out = super().__call__(batch)
        self.log("end", key)
        return out


def test_feature_extraction_loses_a_node_and_keeps_every_tracklet_once(cluster, data_root,  # noqa: F811
                                                                        model_file, monkeypatch, tmp_path):
    nodes, ray = cluster
    second = two_nodes(nodes, ray)
    shards = str(data_root / "shards")
    log = CallLog(tmp_path / "calls.jsonl")
    SlowChunkFeatures.log, SlowChunkFeatures.head = log, ray.get_runtime_context().get_node_id()
    monkeypatch.setattr(evaluation, "extract_features",
                        lambda *args, **kwargs: extract_features(*args, udf=SlowChunkFeatures, **kwargs))
    # one actor per node (SPREAD), so that the second node's actor runs calls and the kill cuts one: left to
    # Ray's packing, both actors started on the head in 2 of 3 runs and nothing was lost
    spread = {**features.actor_options(), "scheduling_strategy": "SPREAD"}
    monkeypatch.setattr(features, "actor_options", lambda: spread)
    # A task per block of two chunks (a block held all 76, so one actor ran every call), one task in flight
    # per actor (with more, the head's actor queued the blocks read beside it while the other idled)
    monkeypatch.setattr(pipeline, "_BLOCK_BYTES", 2 * 2 * 32 * 16 * 3)
    monkeypatch.setattr(ray.data.DataContext.get_current(), "max_tasks_in_flight_per_actor", 1)

    def run(out: str):
        # two actors of 1 CPU, spread over the nodes by Ray Data; a chunk per call, so that the second node's
        # actor, slower to start than the head's, still finds calls to run
        return evaluation.evaluate(model_file, shards, out, config_overrides=["eval.batch_size=1"],
                                   concurrency=2, cpu_share=0.1, use_gpu=False)

    plain, plain_s = timed(lambda: run(str(tmp_path / "plain")))
    Path(log.path).unlink()
    lost, lost_s, killed_at, killed = run_and_kill(nodes, log, second, lambda: run(str(tmp_path / "lost")))
    before = load_features(str(tmp_path / "plain" / evaluation.FEATURES_FILE))
    after = load_features(str(tmp_path / "lost" / evaluation.FEATURES_FILE))
    test = pq.read_table(read_manifest(shards).paths("test"), columns=["tracklet", "frames"])
    expected = sorted(test.column("tracklet").to_pylist())
    assert sorted(after.tracklet.tolist()) == expected, "a tracklet is missing or counted twice"
    frames = dict(zip(expected, [len(f) for f in test.column("frames").to_pylist()], strict=True))
    assert dict(zip(after.tracklet.tolist(), after.num_frames.tolist(), strict=True)) == frames
    difference = max(float((getattr(after.features, name) - getattr(before.features, name)).abs().max())
                     for name in ("g", "f_attended", "f_temporal", "f_mean", "part_scores"))
    assert difference < 1e-5
    maps = [round(run["modes"]["stal"]["mAP"], 6) for run in (plain, lost)]
    assert maps[0] == maps[1]
    print(f"\nfeatures: {len(expected)} tracklets, each once with all its frames; largest feature difference "
          f"from the uninterrupted run {difference:.2g}, mAP {maps[1]} against {maps[0]}; {plain_s:.1f} s "
          f"uninterrupted, {lost_s:.1f} s with the node killed ({len(killed)} processes); "
          f"{log.summary(second, killed_at)}")


# ---------------------------------------------------------------------------------------------- pose


def keypoints_by_row(shards: str) -> dict:
    """(split, row key) -> every frame's keypoints, from the current version."""
    manifest = read_manifest(shards)
    out = {}
    for split, key in (("train", "identity"), ("test", "tracklet")):
        table = pq.read_table(manifest.paths(split), columns=[key, "keypoints"])
        for row, keypoints in zip(table.column(key).to_pylist(), table.column("keypoints").to_pylist(),
                                  strict=True):
            assert (split, row) not in out, f"{split} row {row} twice"
            out[split, row] = keypoints
    return out


def test_pose_estimation_loses_a_node_and_gives_every_frame_its_joints_once(cluster, data_root,  # noqa: F811
                                                                            monkeypatch, tmp_path):
    pytest.importorskip("ai_edge_litert", reason="the pose extra is not installed (pip install -e .[pose])")
    from stal_ray.pose import annotate
    from stal_ray.pose.models import load_model

    nodes, ray = cluster
    second = two_nodes(nodes, ray)
    plain_data, lost_data = tmp_path / "plain", tmp_path / "lost"
    shutil.copytree(data_root / "shards", plain_data)
    shutil.copytree(data_root / "shards", lost_data)
    log = CallLog(tmp_path / "calls.jsonl")

    class SlowPoseEstimator(annotate.PoseEstimator):
        def __call__(self, batch):
            key = pairs(batch.column("file"), batch.column("key"))
            log("start", key)
            time.sleep(CALL_S)
            out = super().__call__(batch)
            log("end", key)
            return out

    monkeypatch.setattr(annotate, "PoseEstimator", SlowPoseEstimator)
    model = load_model()
    plain, plain_s = timed(lambda: annotate.estimate_pose(str(plain_data), model, workers=2))
    Path(log.path).unlink()
    lost, lost_s, killed_at, killed = run_and_kill(
        nodes, log, second, lambda: annotate.estimate_pose(str(lost_data), model, workers=2))
    assert lost.manifest.counts == plain.manifest.counts
    assert lost.manifest.pose["unreadable_frames"] == plain.manifest.pose["unreadable_frames"]
    before, after = keypoints_by_row(str(plain_data)), keypoints_by_row(str(lost_data))
    assert after.keys() == before.keys()
    assert after == before, "the interrupted run's joints differ from the uninterrupted run's"
    frames = sum(len(v) for v in after.values())
    print(f"\npose: {len(after)} rows, {frames} frames, each frame's joints once and equal to the "
          f"uninterrupted run's; {plain_s:.1f} s uninterrupted, {lost_s:.1f} s with the node killed "
          f"({len(killed)} processes); {log.summary(second, killed_at)}")
