"""Evaluation end to end on a local Ray cluster: a saved tiny model and synthetic shards in, metrics.json with
the agreed schema, cmc.png, attention.png and distances.npz out; features reused; jobs/evaluate_mars.py."""

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stal_ray.config import load_config
from stal_ray.data.prepared.manifest import read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.evaluate import evaluate as evaluate_module
from stal_ray.evaluate.distance import MODES
from stal_ray.evaluate.evaluate import evaluate
from stal_ray.model.export import save_model
from stal_ray.model.stal import STAL

JOB = Path(__file__).resolve().parents[1] / "jobs" / "evaluate_mars.py"
TOP_LEVEL = {"model", "dataset", "modes", "ap_rule", "definitions", "fusion_rate", "protocol", "num_query",
             "num_gallery", "num_test_ids", "skipped_queries"}


@pytest.fixture(scope="module")
def shards_uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("evaluate_data")
    release = write_synthetic_release(str(root / "release"), identities=4, test_identities=4, cameras=3,
                                      tracklets_per_identity=(2, 3), frames_per_tracklet=(3, 9), height=32,
                                      width=16, junk_tracklets=1, distractor_tracklets=2)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False)
    return out


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, shards_uri) -> str:
    config = load_config(None, ["model.backbone=tiny", "model.feature_dim=8", "model.pose_source=keypoints",
                                "data.seq_len=4", "data.height=32", "data.width=16",
                                "data.decode_concurrency=1", "eval.fusion_rate=0.5"])
    config.data.root = shards_uri  # as the trainer records the data a model was trained on
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("evaluate_model") / "model.pt")
    save_model(path, STAL.from_config(config, num_classes=4), config, num_classes=4,
               extra={"iteration": 7, "selected_by": "best val_mAP", "score": 0.5})
    return path


@pytest.fixture(scope="module")
def first_run(ray_cluster, shards_uri, model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate_out")
    return out, evaluate(model_path, shards_uri, str(out), save_distances=True)


def test_evaluation_writes_the_agreed_metrics_and_pictures(first_run, model_path):
    out, returned = first_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == TOP_LEVEL and returned == metrics
    assert list(metrics["modes"]) == list(MODES)
    for mode, values in metrics["modes"].items():
        assert set(values) == {"mAP", "mAP_step", "mINP", "cmc", "percent"}, mode
        assert list(values["cmc"]) == ["1", "5", "10", "20"], mode
        assert 0 <= values["mAP"] <= values["mAP_step"] <= 1 and 0 <= values["mINP"] <= 1
        assert all(0 <= v <= 1 for v in values["cmc"].values())
        assert values["percent"]["Rank-1"] == pytest.approx(100 * values["cmc"]["1"])
        assert values["percent"]["mAP"] == pytest.approx(100 * values["mAP"])
        assert values["cmc"]["1"] <= values["cmc"]["20"]
    assert metrics["fusion_rate"] == 0.5 and metrics["protocol"] == "official"  # the model's eval settings
    assert metrics["model"] == {"path": model_path, "iteration": 7, "selected_by": "best val_mAP",
                                "score": 0.5}
    assert metrics["ap_rule"] == "trapezoid"  # the official MARS code's AP
    assert metrics["num_query"] > 0 and metrics["num_gallery"] > metrics["num_query"]
    assert 0 < metrics["num_test_ids"] <= 4
    for picture in ("cmc.png", "attention.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG"
    distances = np.load(out / "distances.npz")
    assert distances["dist"].shape == (metrics["num_query"], metrics["num_gallery"])
    assert str(distances["mode"]) == "stal"
    assert len(distances["q_pids"]) == metrics["num_query"]
    assert len(distances["g_cams"]) == metrics["num_gallery"]
    assert (out / "features.parquet").exists()


def test_a_second_evaluation_reuses_the_saved_features(first_run, shards_uri, model_path, monkeypatch,
                                                       capsys):
    out, _ = first_run

    def no_extraction(*args, **kwargs):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(evaluate_module, "extract_features", no_extraction)
    metrics = evaluate(model_path, shards_uri, str(out), modes=("global", "stal"), fusion_rate=0.0)
    assert "reusing features" in capsys.readouterr().out
    assert list(metrics["modes"]) == ["global", "stal"] and metrics["fusion_rate"] == 0.0


def test_features_of_an_earlier_version_of_the_data_set_are_not_reused(first_run, shards_uri, model_path,
                                                                       monkeypatch, capsys):
    """The same URI prepared again (e.g. --pollute --overwrite, or joints added) is another data set."""
    out, _ = first_run
    resolve_data = evaluate_module.resolve_data

    def republished(*args, **kwargs):
        data = resolve_data(*args, **kwargs)
        again = dataclasses.replace(data.manifest, version="v-prepared-again")
        return dataclasses.replace(data, manifest=again)

    class Extracted(Exception):
        pass

    def extraction(*args, **kwargs):
        raise Extracted

    monkeypatch.setattr(evaluate_module, "resolve_data", republished)
    monkeypatch.setattr(evaluate_module, "extract_features", extraction)
    with pytest.raises(Extracted):
        evaluate(model_path, shards_uri, str(out), modes=("stal",))
    assert "came from another model file or data set: extracting again" in capsys.readouterr().out


def test_extraction_prints_its_progress_with_share_and_eta(first_run, shards_uri, model_path, tmp_path,
                                                           capsys):
    evaluate(model_path, shards_uri, str(tmp_path), modes=("stal",))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("extraction: ")]
    frames = read_manifest(shards_uri).counts["test"]["frames"]
    assert lines[-1].startswith(f"extraction: {frames:,} of {frames:,} frames (100%), ")
    assert lines[-1].endswith("ETA 0s")


def test_rerank_switch_reranks_every_mode_and_says_so(first_run, shards_uri, model_path, monkeypatch,
                                                      tmp_path):
    out, plain = first_run
    shutil.copy(out / "features.parquet", tmp_path / "features.parquet")
    calls = []
    original = evaluate_module.reranked_distance

    def spy(distance, query, gallery, mode, *args, **kwargs):
        calls.append((mode, kwargs["k1"], kwargs["k2"], kwargs["lambda_value"]))
        reranked = original(distance, query, gallery, mode, *args, **kwargs)
        assert not torch.equal(reranked, distance)
        return reranked

    monkeypatch.setattr(evaluate_module, "reranked_distance", spy)
    metrics = evaluate(model_path, shards_uri, str(tmp_path), modes=("stal", "global"), save_distances=True,
                       config_overrides=["eval.rerank=true", "eval.rerank_k1=4", "eval.rerank_k2=2"])
    assert calls == [("stal", 4, 2, 0.3), ("global", 4, 2, 0.3)]
    assert metrics["rerank"] == {"k1": 4, "k2": 2, "lambda": 0.3}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    saved = np.load(tmp_path / "distances.npz")["dist"]
    assert saved.shape == (metrics["num_query"], metrics["num_gallery"])
    assert saved.min() >= 0 and saved.max() <= 1  # d* mixes d_J and the normalised squared distance
    assert "rerank" not in plain


def test_settings_the_model_fixes_cannot_be_overridden(model_path, shards_uri, tmp_path):
    with pytest.raises(ValueError, match="data.seq_len is fixed by the model file"):
        evaluate(model_path, shards_uri, str(tmp_path), config_overrides=["data.seq_len=8"])
    with pytest.raises(ValueError, match="modes .* are invalid"):
        evaluate(model_path, shards_uri, str(tmp_path), modes=("fused",))


def load_job():
    spec = importlib.util.spec_from_file_location("evaluate_mars", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_job_script_runs_in_a_process_that_already_has_ray(first_run, shards_uri, model_path, tmp_path,
                                                           capsys):
    out, _ = first_run
    # the features are reused: this tests the job's plumbing, not the extraction again
    shutil.copy(out / "features.parquet", tmp_path / "features.parquet")
    code = load_job().main(["--model", model_path, "--data", shards_uri, "--out", str(tmp_path),
                     "--modes", "stal", "baseline", "--fusion-rate", "0.3", "--protocol", "torchreid"])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str(tmp_path / "metrics.json")
    # the table as torchreid prints it, saying which AP its mAP is
    assert any(line.split()[:5] == ["mode", "Rank-1", "Rank-5", "Rank-10", "Rank-20"] for line in printed)
    assert any(line.startswith("mAP: step rule (torchreid, fast-reid)") for line in printed)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics["modes"]) == ["stal", "baseline"] and metrics["fusion_rate"] == 0.3
    assert metrics["protocol"] == "torchreid" and metrics["ap_rule"] == "step"
    assert all(values["mAP"] == values["mAP_step"] for values in metrics["modes"].values())
    assert len(JOB.read_text().splitlines()) <= 80


def test_without_data_the_job_evaluates_the_data_the_model_was_trained_on(first_run, shards_uri, model_path,
                                                                          tmp_path, capsys):
    out, _ = first_run
    shutil.copy(out / "features.parquet", tmp_path / "features.parquet")  # reused only for that data set
    code = load_job().main(["--model", model_path, "--out", str(tmp_path), "--modes", "stal"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"evaluating on {shards_uri}" in printed and "reusing features" in printed


def test_job_script_names_a_missing_checkpoint(ray_cluster, tmp_path, capsys):
    code = load_job().main(["--model", str(tmp_path / "gone.pt"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "model file not found: " in capsys.readouterr().err
