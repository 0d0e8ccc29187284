"""bench/gpu_check.py --device cpu --quick: every item of the GPU check runs its code path on a CPU (tiny
backbone, sizes and iterations), so that the command a GPU's first slot runs cannot rot."""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import bench.gpu_check as gpu_check  # noqa: E402
from bench.gpu_check import ITEMS  # noqa: E402
from bench.gpu_items import processes  # noqa: E402


def first_result_then_hang(out: str) -> None:
    """An item that writes a first result, then hangs (as a stuck Ray Data stream would), with a child of its
    own (as an item's Ray driver has)."""
    json.dump({"rows": [{"name": "first"}], "checks": []}, open(out, "w"))
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(600)


def test_an_item_past_its_time_limit_is_stopped_with_what_it_had_measured(tmp_path, monkeypatch):
    # both the item and its child are stopped at the limit, and the result written stays
    monkeypatch.setattr(gpu_check, "item_target",
                        lambda args, name, out, context: (first_result_then_hang, (str(out),)))
    start = time.perf_counter()
    result = gpu_check.run_one(argparse.Namespace(), "train", 3, {}, tmp_path)
    assert time.perf_counter() - start < 3 + processes.STOP_GRACE_S + 5
    assert result["status"].startswith("TIMEOUT") and result["rows"] == [{"name": "first"}]
    assert gpu_check.failed(result)
    hung = subprocess.run(["pgrep", "-f", "import time; time.sleep(600)"], capture_output=True, text=True)
    assert hung.stdout.strip() == "", "the item's own child outlived the limit"


def no_such_backbone() -> None:
    print("building the model")
    sys.exit("bench: no such backbone: resnet5")


def test_an_item_that_fails_says_why_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "item_target", lambda args, name, out, context: (no_such_backbone, ()))
    result = gpu_check.run_one(argparse.Namespace(), "train", 30, {}, tmp_path)
    assert result["status"] == "error (exit 1): bench: no such backbone: resnet5"
    assert result["rows"] == [] and gpu_check.failed(result)


def test_stopping_the_check_stops_the_running_items_and_starts_no_more(tmp_path, monkeypatch):
    # the orchestrator's way out (Ctrl-C included): an item in a session of its own would go on, and the
    # interpreter's exit would wait for it
    monkeypatch.setattr(processes, "_started", [])
    monkeypatch.setattr(processes, "_stopping", False)
    out = tmp_path / "item.json"
    process = processes.start(first_result_then_hang, (str(out),), tmp_path / "item.log", dict(os.environ))
    deadline = time.monotonic() + 60
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    processes.stop_all()
    assert process.exitcode is not None and process.exitcode < 0  # stopped by a signal, not finished
    hung = subprocess.run(["pgrep", "-f", "import time; time.sleep(600)"], capture_output=True, text=True)
    assert hung.stdout.strip() == "", "the item's own child outlived the stop"
    with pytest.raises(processes.StoppedError):
        processes.start(no_such_backbone, (), tmp_path / "next.log", dict(os.environ))


def template_state(out: str) -> None:
    import ray
    import torch

    json.dump({"cuda_initialised": torch.cuda.is_initialized(), "bad_fork": torch.cuda._is_in_bad_fork(),
               "ray_connected": ray.is_initialized(), "cwd": os.getcwd(),
               "preloaded": [name for name in processes.PRELOAD if name in sys.modules],
               "deepspeed": sorted(name for name in sys.modules if name.split(".")[0] == "deepspeed"),
               "variable": os.environ.get("STAL_GPU_CHECK_TEST")}, open(out, "w"))


def test_items_fork_from_a_template_that_touched_no_device_and_no_ray(tmp_path, monkeypatch):
    # a CUDA driver initialised in the template cannot be used in the items forked from it, and deepspeed's
    # import probes the accelerator: the template imports, nothing more. Each item gets the orchestrator's
    # environment of the moment, and the repository as its working directory.
    monkeypatch.setenv("STAL_GPU_CHECK_TEST", "from the orchestrator")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "state.json"
    process = processes.start(template_state, (str(out),), tmp_path / "state.log", dict(os.environ))
    process.join(120)
    assert process.exitcode == 0, (tmp_path / "state.log").read_text()[-2000:]
    state = json.loads(out.read_text())
    assert state == {"cuda_initialised": False, "bad_fork": False, "ray_connected": False,
                     "cwd": str(REPO), "preloaded": list(processes.PRELOAD),
                     "deepspeed": [], "variable": "from the orchestrator"}


# four Ray Train runs and three Ray Data streams, each item in a process forked from the template: about 105
# CPU-seconds, 57-60 s alone on a slow 2-core machine (where the fresh interpreters of each item took 78-82 s;
# docs/benchmarks.md, "Where the quick mode's time goes"). Inside CI's `make test` it once took 148 s: the
# environment had no bytecode and PYTHONDONTWRITEBYTECODE was set, so every process compiled ray and torch
# again; `make venv` compiles them now (tests/test_environment.py)
@pytest.mark.own_cluster_first
def test_quick_check_runs_every_item_on_cpu_and_gives_each_goal_a_verdict(tmp_path):
    out = tmp_path / "gpu_check.json"
    completed = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    summary = json.loads(out.read_text())
    items = summary["items"]
    assert list(items) == list(ITEMS) and summary["failed"] == []
    for name, item in items.items():
        assert item["status"] == "ok", (name, item["status"])
        assert item["seconds"] <= item["limit_s"]
        assert item["phases"]["start-up (fork, imports)"] >= 0  # where the item's time went, on record
        for check in item["checks"]:  # a GPU's goal on a CPU says so, never a PASS it did not earn
            assert check["verdict"] == "PASS" or check["verdict"].startswith("n/a"), (name, check)
    checks = {c["name"]: c for item in items.values() for c in item["checks"]}
    # the checks that mean as much on a CPU as on a GPU passed
    assert checks["uint8 normalised on cpu == CPU float (ImageNet RGB)"]["verdict"] == "PASS"
    assert checks["uint8 normalised on cpu == CPU float (Caffe BGR)"]["verdict"] == "PASS"
    assert [c["verdict"] for c in items["determinism"]["checks"]] == ["PASS"]
    # GPU goals: n/a on a CPU
    assert checks["ResNet-50 step MFU (bf16, under Ray Train)"]["verdict"] == "n/a on cpu"
    # every measurement is there, with numbers
    train = [row["name"] for row in items["train"]["rows"]]
    assert train == ["tiny 64x32, plain PyTorch", "tiny 64x32, TorchTrainer + DeepSpeed"]
    assert all(row["frames_per_s"] > 0 and row["gflop_per_step"] > 0 for row in items["train"]["rows"])
    stream = items["stream"]["rows"]
    assert stream[0]["frames_per_s"] > 0 and [r["name"] for r in stream[-2:]] == [
        "fed run, first window (stream start)", "fed run, steady window"]
    assert 0 <= stream[-1]["data_wait_share"] <= 1
    evaluation = items["evaluation"]["rows"]
    assert evaluation[0]["frames"] > 0 and evaluation[0]["frames_per_s"] > 0
    assert len(evaluation) == 3 and all(r["device_s"] > 0 for r in evaluation[1:])
    assert items["pose"]["rows"][0]["frames_per_s"] > 0
    assert "ranking on cpu == CPU, tied distances (3 levels)" in checks
    # the table is on stdout
    assert "all items ran; no check failed" in completed.stdout
