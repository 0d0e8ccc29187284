"""--help answers before the training stack: each job's parser is built and its help printed with no torch,
DeepSpeed or Ray imported (issue 33: --help took 15-24 s and printed DeepSpeed's accelerator warning first),
and the old spellings of the flags still work, each with one deprecation line."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOBS = ("prepare_mars", "prepare_data", "estimate_pose", "train_mars", "evaluate_mars", "tune_stal", "study",
        "splits")
HEAVY = ("torch", "ray", "deepspeed")

# imports the job's module and builds its parser (parse_args(["--help"]) prints the help and exits), then
# says which heavy modules are loaded
PROBE = """
import contextlib, importlib.util, io, sys
spec = importlib.util.spec_from_file_location("job", sys.argv[1])
job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)
with contextlib.redirect_stdout(io.StringIO()) as help_text:
    try:
        job.parse_args(["--help"])
    except SystemExit:
        pass
assert "usage:" in help_text.getvalue(), help_text.getvalue()
print(" ".join(name for name in sys.argv[2:] if name in sys.modules))
"""


@pytest.mark.parametrize("name", JOBS)
def test_the_parser_is_built_without_torch_deepspeed_or_ray(name):
    done = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "jobs" / f"{name}.py"), *HEAVY],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == "", f"{name}'s parser imported {done.stdout.strip()}"


@pytest.mark.parametrize("name", JOBS)
def test_help_prints_no_warning_first(name):
    done = subprocess.run([sys.executable, str(REPO / "jobs" / f"{name}.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stdout[:500] + done.stderr[-2000:]
    assert done.stderr == "", done.stderr[-2000:]  # DeepSpeed's accelerator warning was the first line


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "old", "new", "dest", "value"), [
    ("prepare_mars", ["--mars-root", "rel", "--out", "o"], ["--root", "rel", "--out", "o"], "root", "rel"),
    ("evaluate_mars", ["--checkpoint", "s3://b/m.pt", "--out", "s3://b/e"],
     ["--model", "s3://b/m.pt", "--out", "s3://b/e"], "model", "s3://b/m.pt"),
    ("estimate_pose", ["--data", "s3://b/d", "--workers", "3"], ["--data", "s3://b/d", "--num-workers", "3"],
     "num_workers", 3),
    ("tune_stal", ["--max-iterations", "7"], ["--iterations", "7"], "iterations", 7),
    ("splits", ["--dataset", "ilidsvid", "--root", "r", "--out", "o", "--parallel", "2"],
     ["--dataset", "ilidsvid", "--root", "r", "--out", "o", "--max-concurrent", "2"], "max_concurrent", 2),
])
def test_an_old_spelling_sets_the_same_value_with_one_deprecation_line(name, old, new, dest, value, capsys):
    job = load_job(name)
    assert getattr(job.parse_args(new), dest) == value
    assert capsys.readouterr().err == ""
    assert getattr(job.parse_args(old), dest) == value
    flag_new = next(word for word in new if word.startswith("--") and word not in old)
    flag_old = next(word for word in old if word.startswith("--") and word not in new)
    assert capsys.readouterr().err == f"{flag_old} is deprecated; use {flag_new}\n"


def test_old_spellings_are_hidden_and_a_missing_flag_is_named_by_its_new_spelling(capsys):
    job = load_job("evaluate_mars")
    with pytest.raises(SystemExit):
        job.parse_args(["--help"])
    assert "--checkpoint" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        job.parse_args(["--out", "eval"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --model" in capsys.readouterr().err


def test_tune_resume_is_deprecated_and_the_gpu_switch_of_pose_is_one_gpu_per_worker(capsys):
    args = load_job("tune_stal").parse_args(["--name", "search", "--resume"])
    assert args.resume and "--resume is deprecated" in capsys.readouterr().err
    assert not load_job("tune_stal").parse_args(["--name", "search"]).resume
    pose = load_job("estimate_pose")
    assert pose.parse_args(["--data", "d", "--use-gpu"]).num_gpus == 1
    assert pose.parse_args(["--data", "d", "--num-gpus", "0.25"]).num_gpus == 0.25
    assert pose.parse_args(["--data", "d"]).num_gpus == 0
