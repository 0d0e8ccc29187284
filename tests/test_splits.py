"""jobs/splits.py end to end on synthetic iLIDS-VID and PRID-2011 releases: two splits trained (a few
iterations each) and evaluated under their protocol, the cross-dataset test (Table VI), the summary's mean
and std, and a second run that resumes without training."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stal_ray.data.synthetic.layouts import write_layout
from stal_ray.evaluate.evaluate import evaluate
from stal_ray.study.splits import FIGURES
from stal_ray.train import trainer

# every split prepared, trained and evaluated by the job: minutes, so `make test-e2e`
pytestmark = pytest.mark.e2e

JOB = Path(__file__).resolve().parents[1] / "jobs" / "splits.py"
PERSONS = 8  # 4 train (= data.identities_per_batch of the tiny config), 4 test
TINY = ["--set", "train.iterations=2", "--set", "train.checkpoint_every=2", "--set", "data.height=32",
        "--set", "data.width=16", "--set", "eval.batch_size=8"]


def load_job():
    spec = importlib.util.spec_from_file_location("splits", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("splits")
    releases = {layout: write_layout(str(root / layout), layout, persons=PERSONS, frames_per_tracklet=(4, 6),
                                     height=32, width=16) for layout in ("ilidsvid", "prid2011")}
    argv = ["--dataset", "ilidsvid", "--root", releases["ilidsvid"], "--out", str(root / "out"),
            "--splits", "2", "--cross-dataset", "prid2011", "--cross-root", releases["prid2011"], *TINY]
    assert load_job().main(argv) == 0
    return root / "out", argv


def test_every_split_is_trained_and_evaluated_under_its_protocol(finished):
    out, _ = finished
    for split in (0, 1):
        metrics = json.loads((out / "runs" / f"split-{split}" / "metrics.json").read_text())
        assert metrics["protocol"] == "torchreid" and metrics["ap_rule"] == "step"
        assert (metrics["num_query"], metrics["num_gallery"], metrics["num_test_ids"]) == (4, 4, 4)
        assert metrics["dataset"]["name"] == "ilidsvid" and metrics["dataset"]["split"] == split
        assert metrics["dataset"]["protocol"] == "two_camera" and not metrics["dataset"]["cross_dataset"]
        # the cross-dataset test: split K's model on PRID-2011's split K, said so
        cross = json.loads((out / "cross" / f"split-{split}" / "metrics.json").read_text())
        assert cross["dataset"]["cross_dataset"] and cross["dataset"]["name"] == "prid2011"
        assert cross["dataset"]["trained_on"]["name"] == "ilidsvid"
        assert cross["dataset"]["trained_on"]["uri"] == str(out / "data" / f"split-{split}")
        assert "cross-dataset test" in cross["dataset"]["note"]
        assert (cross["num_query"], cross["num_gallery"]) == (4, 4)


def test_summary_averages_the_splits(finished):
    out, _ = finished
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"] == [0, 1] and set(summary["results"]) == {"test", "cross"}
    assert summary["results"]["cross"]["cross_dataset"] and not summary["results"]["test"]["cross_dataset"]
    for key, folder in (("test", "runs"), ("cross", "cross")):
        stal = summary["results"][key]["modes"]["stal"]
        values = [json.loads((out / folder / f"split-{k}" / "metrics.json").read_text())["modes"]["stal"]
                  ["percent"] for k in (0, 1)]
        for name in FIGURES:
            per_split = [v[name] for v in values]
            assert [stal["per_split"][str(k)][name] for k in (0, 1)] == pytest.approx(per_split)
            assert stal["mean"][name] == pytest.approx(np.mean(per_split), abs=0.01)
            assert stal["std"][name] == pytest.approx(np.std(per_split), abs=0.01)
    table = (out / "summary.md").read_text()
    assert "| mode (mean ± std) | Rank-1 | Rank-5 | Rank-10 | Rank-20 | mAP |" in table
    assert "cross-dataset: trained on iLIDS-VID, tested on PRID-2011" in table


def test_a_second_run_resumes_without_training(finished, monkeypatch, capsys):
    out, argv = finished
    before = json.loads((out / "summary.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a finished split was trained again")

    monkeypatch.setattr(trainer, "train", no_training)
    assert load_job().main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier, its metrics reused") == 2
    after = json.loads((out / "summary.json").read_text())
    assert after["results"] == before["results"]


def test_two_camera_data_refuses_the_official_protocol(finished, tmp_path):
    out, _ = finished
    run = out / "runs" / "split-0"
    shutil.copy(run / "features.parquet", tmp_path / "features.parquet")  # no extraction again
    with pytest.raises(ValueError, match="--protocol official does not fit iLIDS-VID"):
        evaluate(str(run / "model.pt"), str(out / "data" / "split-0"), str(tmp_path), protocol="official")
