"""bench/gpu_check.py --device cpu --quick: every item of the GPU check runs its code path on a CPU (tiny
backbone, sizes and iterations), so that the command a GPU's first slot runs cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_check import ITEMS  # noqa: E402


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
