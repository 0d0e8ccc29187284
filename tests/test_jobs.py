"""What every job does with its arguments before Ray starts: local paths made absolute (Ray tasks run in the
cluster's working directory), --endpoint-url checked where it is parsed, --address taken."""

import importlib.util
from pathlib import Path

import pytest

from stal_ray.config import config_from_args
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.source import resolve_data

JOBS = Path(__file__).resolve().parents[1] / "jobs"
# arguments each job requires, besides the one under test
REQUIRED = {
    "train_mars": [], "tune_stal": [], "study": ["--out", "study"],
    "evaluate_mars": ["--model", "model.pt", "--out", "eval"],
    "prepare_mars": ["--root", "release", "--out", "shards"],
    "estimate_pose": ["--data", "shards"],
    "splits": ["--dataset", "ilidsvid", "--root", "release", "--out", "splits"],
}
RAY_JOBS = ("train_mars", "tune_stal", "study", "evaluate_mars", "estimate_pose", "splits")


def job(name: str):
    spec = importlib.util.spec_from_file_location(name, JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_an_endpoint_that_is_not_a_url_is_refused_in_one_line(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        job(name).parse_args(REQUIRED[name] + ["--endpoint-url", "not-a-url"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --endpoint-url: 'not-a-url' is not an endpoint URL" in error
    assert "http(s)://host[:port]" in error


@pytest.mark.parametrize("name", RAY_JOBS)
def test_ray_jobs_take_an_address(name):
    assert job(name).parse_args(REQUIRED[name] + ["--address", "10.0.0.5:6379"]).address == "10.0.0.5:6379"
    assert job(name).parse_args(REQUIRED[name]).address is None


@pytest.mark.parametrize("name", ["train_mars", "tune_stal"])
def test_relative_storage_data_and_pretrained_paths_become_absolute(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = job(name)
    args = module.parse_args(["--storage-path", "runs", "--set", "data.root=shards",
                              "--set", "model.pretrained=~/weights.pth"])
    config = config_from_args(args, module.SHORTCUTS)
    assert config.train.storage_path == str(tmp_path / "runs")
    assert config.data.root == str(tmp_path / "shards")
    assert config.model.pretrained == str(Path.home() / "weights.pth")
    args = module.parse_args(["--storage-path", "s3://bucket/runs", "--set", "data.root=s3://bucket/mars"])
    config = config_from_args(args, module.SHORTCUTS)
    assert (config.train.storage_path, config.data.root) == ("s3://bucket/runs", "s3://bucket/mars")


def test_evaluate_and_study_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evaluate = job("evaluate_mars")
    args = evaluate.parse_args(["--model", "runs/a/model.pt", "--data", "shards", "--out", "ev"])
    assert (args.model, args.data, args.out) == (
        str(tmp_path / "runs/a/model.pt"), str(tmp_path / "shards"), str(tmp_path / "ev"))
    args = evaluate.parse_args(["--model", "s3://b/model.pt", "--out", "s3://b/ev"])
    assert (args.model, args.data, args.out) == ("s3://b/model.pt", None, "s3://b/ev")
    assert job("study").parse_args(["--out", "study"]).out == str(tmp_path / "study")


def test_resolved_data_is_absolute(small_release_root, tmp_path, monkeypatch):
    write_shards(read_mars(small_release_root), str(tmp_path / "shards"), progress=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_data("shards").uri == str(tmp_path / "shards")
