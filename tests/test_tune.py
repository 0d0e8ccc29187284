"""The Tune search on the synthetic data with the tiny model: ASHA stops trials early, the best YAML trains,
an interrupted search resumes without repeating finished trials."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stal_ray.config import ConfigError, load_config
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.train.tensorboard import read_scalars
from stal_ray.train.trainer import train
from stal_ray.tune import RESULTS_FILE, SEARCHED, run_search

REPO = Path(__file__).resolve().parents[1]

OVERRIDES = [
    "model.backbone=tiny", "model.feature_dim=32", "model.pose_source=keypoints",
    "data.seq_len=2", "data.height=32", "data.width=16", "data.identities_per_batch=2",
    "data.clips_per_identity=2", "data.decode_concurrency=1", "data.val_identities=0.25",
    "train.lr=0.01", "train.log_every=100", "train.iterations=6", "train.checkpoint_every=2",
    "tune.grace_iterations=2", "tune.reduction_factor=2", "tune.fusion_rates=[0.0,0.5,1.0]",
    # one trial at a time, each reproducible: ASHA's decisions do not depend on which trial reports first
    "tune.max_concurrent=1", "train.deterministic=true",
]


@pytest.fixture(scope="module")
def shards_uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tune_data")
    release = write_synthetic_release(str(root / "release"), identities=16, test_identities=3, cameras=2,
                                      tracklets_per_identity=(2, 3), frames_per_tracklet=(4, 8),
                                      height=32, width=16, junk_tracklets=1, distractor_tracklets=1)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False)
    return out


def results(experiment: Path) -> list[dict[str, str]]:
    with open(experiment / RESULTS_FILE) as table:
        return list(csv.DictReader(table))


@pytest.mark.e2e  # a search and a training: make test-e2e
def test_search_stops_weak_trials_and_its_best_yaml_trains(ray_cluster, shards_uri, tmp_path):
    config = load_config(None, OVERRIDES + [f"train.storage_path={tmp_path}", "tune.num_samples=3",
                                            "train.seed=1"])
    result = run_search(config, shards_uri, name="search")

    rows = results(tmp_path / "search")
    assert len(rows) == len(result.rows) == 3
    statuses = [row["status"] for row in rows]
    assert "stopped early" in statuses, rows
    assert all(int(row["iterations"]) < 6 for row in rows if row["status"] == "stopped early")
    for row in rows:
        assert 0 <= float(row["val_mAP"]) <= 1 and float(row["val_alpha"]) in (0.0, 0.5, 1.0)
        for name in SEARCHED:
            low, high = getattr(config.tune, name)
            assert low <= float(row[name]) <= high
    # every trial logs for TensorBoard: loss terms and the validation mAP per α
    events = list((tmp_path / "search").glob("*/events.out.tfevents*"))
    assert len(events) == 3
    # and so does each trial's own Ray Train run, validation included
    runs = [run for run in (tmp_path / "search" / "runs").iterdir() if run.is_dir()]
    assert len(runs) == 3 and all("val/mAP" in read_scalars(str(run)) for run in runs)

    best = load_config(result.best_yaml, [f"train.storage_path={tmp_path}", "train.iterations=2"])
    top = result.rows[0]
    assert (best.train.local_weight, best.train.margin_global, best.train.margin_local) == pytest.approx(
        (top["local_weight"], top["margin_global"], top["margin_local"]))
    assert best.eval.fusion_rate == top["val_alpha"] and best.data.root == shards_uri
    trained = train(best, shards_uri, name="best")
    assert trained.metrics["iteration"] == 2


def test_resume_of_a_missing_search_and_bad_schedules_are_refused(ray_cluster, shards_uri, tmp_path):
    config = load_config(None, OVERRIDES + [f"train.storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match="no search to resume"):
        run_search(config, shards_uri, name="never-started", resume=True)
    late = load_config(None, OVERRIDES + [f"train.storage_path={tmp_path}", "tune.grace_iterations=6"])
    with pytest.raises(ConfigError, match="ASHA could never stop a trial early"):
        run_search(late, shards_uri, name="late")


@pytest.mark.e2e  # two searches: make test-e2e
def test_interrupted_search_resumes_without_repeating_finished_trials(shards_uri, tmp_path):
    command = [sys.executable, str(REPO / "jobs" / "tune_stal.py"), "--data", shards_uri,
               "--config", str(REPO / "configs" / "synthetic_tiny.yaml"),
               "--name", "resumable", "--storage-path", str(tmp_path), "--num-samples", "2",
               "--set", "tune.scheduler=fifo"]
    for override in OVERRIDES:
        command += ["--set", override]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    finished, lines = None, []
    deadline = time.monotonic() + 400
    for line in first.stdout:
        lines.append(line)
        # progress bars of Ray Data share the stream, so the line may start with their escape codes
        match = re.search(r"trial (\S+) finished at iteration", line)
        if match:
            finished = match.group(1)
            os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
            break
        assert time.monotonic() < deadline, "".join(lines[-50:])
    assert finished is not None, "".join(lines[-50:])
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 130 and "the same command again" in output, output[-4000:]
    assert "--name resumable" in output, output[-4000:]
    experiment = tmp_path / "resumable"
    finished_dir = next(path for path in experiment.iterdir() if path.is_dir() and finished in path.name)
    reports_before = (finished_dir / "result.json").read_text().count("\n")
    assert not (experiment / RESULTS_FILE).exists()  # the search did not get to its end

    # the same command resumes the search of the same --name (no --resume: the rule of every job)
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    rows = results(experiment)
    assert len(rows) == 2 and all(row["status"] == "completed" for row in rows), rows
    assert (finished_dir / "result.json").read_text().count("\n") == reports_before
    assert f"trial {finished} finished" not in resumed.stdout


def test_results_table_keeps_trials_that_failed_before_reporting(tmp_path):
    import json

    import pandas as pd
    import pyarrow.fs
    from ray.tune import Result

    from stal_ray.tune import results_rows

    def result(name, metrics, error=None, history=None, params=None):
        path = tmp_path / name
        path.mkdir()
        if params is not None:
            (path / "params.json").write_text(json.dumps(params))
        return Result(metrics=metrics, checkpoint=None, error=error, path=str(path),
                      metrics_dataframe=history, _storage_filesystem=pyarrow.fs.LocalFileSystem())

    values = {"local_weight": 0.5, "margin_global": 1.0, "margin_local": 0.7}
    reported = {"trial_id": "a", "iteration": 4, "config": values, "val_mAP": 0.8}
    history = pd.DataFrame([{"iteration": 4, "val_mAP": 0.8, "val_alpha": 0.3, "val_rank1": 0.9}])
    failed = result("b", {}, error=RuntimeError("no GPU"), params={**values, "margin_local": 1.5})
    rows = results_rows([result("a", reported, history=history), failed,
                         result("c", {}, error=RuntimeError("never started"))], "val_mAP", iterations=4)
    assert [row["status"] for row in rows] == ["completed", "error", "error"]
    assert rows[0]["val_mAP"] == 0.8 and rows[0]["margin_local"] == 0.7
    assert rows[1]["margin_local"] == 1.5 and rows[1]["iterations"] == 0
    assert all(row[name] != row[name] for row in rows[2:] for name in SEARCHED)  # NaN: nothing is known
