"""The jobs' command lines: --data needs --config, and --help shows whole sentences and the real defaults."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
JOBS = ("prepare_mars", "train_mars", "evaluate_mars", "tune_stal", "study")


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train_mars", "tune_stal"])
def test_data_without_config_is_refused(name, capsys):
    job = load_job(name)
    with pytest.raises(SystemExit) as exit_info:
        job.parse_args(["--data", "s3://bucket/mars"])
    assert exit_info.value.code == 2
    assert "--data s3://bucket/mars needs --config" in capsys.readouterr().err
    args = job.parse_args(["--data", "s3://bucket/mars", "--config", "configs/mars_resnet50.yaml"])
    assert args.config == "configs/mars_resnet50.yaml"
    assert job.parse_args([]).config == "synthetic_tiny"  # the packaged config of the synthetic data set


@pytest.mark.parametrize("name", JOBS)
def test_help_shows_the_whole_description(name, capsys):
    job = load_job(name)
    with pytest.raises(SystemExit):
        job.parse_args(["--help"])
    text = capsys.readouterr().out
    for line in job.__doc__.strip().splitlines():
        assert line.strip() in text, line  # not only the first line, cut mid-sentence


@pytest.mark.parametrize(("name", "default"), [
    ("train_mars", "configs/synthetic_tiny.yaml"), ("tune_stal", "configs/synthetic_tiny.yaml"),
    ("study", "configs/study_occluded.yaml")])
def test_help_names_the_default_config(name, default, capsys):
    with pytest.raises(SystemExit):
        load_job(name).parse_args(["--help"])
    assert f"(default: {default}" in " ".join(capsys.readouterr().out.split())
