"""What the items of bench/gpu_check.py share: the sizes of a full and a quick run, the Ray connection, the
result file each item fills in as it goes, and timing on the device."""

import json
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.model import step_times, synchronize  # noqa: F401 - the items time steps as bench/model.py does

REPO = Path(__file__).resolve().parents[2]
RAY_ADDRESS = "STAL_GPU_CHECK_RAY"  # the orchestrator's Ray cluster, which every item joins

# Dense bf16 tensor-core peaks (NVIDIA data sheets, TFLOP/s, no sparsity), matched against
# torch.cuda.get_device_name in this order; --peak-tflops names any other device's.
BF16_PEAK_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0))


@dataclass(frozen=True)
class Profile:
    """The sizes of one run: `full` on the GPU (the MARS configs' batch), `quick` on any CPU in seconds."""

    name: str
    backbones: tuple[tuple[str, str], ...]  # (backbone, config file) of the training-step item
    steps: int  # timed training steps per measurement, after `warm_up`
    warm_up: int
    stream_config: str  # config of the stream, evaluation and determinism items
    fed_iterations: int  # iterations of the data-wait run
    determinism_iterations: int
    train_every: int  # MARS's real index, every k-th training identity (0: the embedded synthetic set)
    test_every: int  # every k-th test identity
    pose_frames: int
    pose_input: tuple[int, int]  # the stand-in SimCC model's input (height, width)
    ranking_query_step: int  # every k-th of MARS's 1980 queries is ranked

    def to_dict(self) -> dict:
        return asdict(self)


FULL = Profile(
    name="full", backbones=(("resnet50", "configs/mars_resnet50.yaml"),
                            ("bninception", "configs/mars_bninception.yaml")),
    steps=20, warm_up=3, stream_config="configs/mars_resnet50.yaml", fed_iterations=300,
    determinism_iterations=8, train_every=4, test_every=48, pose_frames=128, pose_input=(256, 192),
    ranking_query_step=1)
QUICK = Profile(
    name="quick", backbones=(("tiny", "configs/synthetic_tiny.yaml"),), steps=3, warm_up=1,
    stream_config="configs/synthetic_tiny.yaml", fed_iterations=4, determinism_iterations=2, train_every=0,
    test_every=0, pose_frames=16, pose_input=(64, 48), ranking_query_step=10)


def profile(quick: bool) -> Profile:
    return QUICK if quick else FULL


class ItemResult:
    """An item's JSON, rewritten after every measurement: an item stopped at its time limit still leaves
    what it had measured."""

    def __init__(self, path: str):
        self.path, self.data = Path(path), {"rows": [], "checks": []}
        self.save()

    def row(self, **fields) -> None:
        """A measurement: name, and its numbers (frames/s, ms, ...)."""
        self.data["rows"].append(fields)
        self.save()

    def check(self, name: str, value: str, goal: str, verdict: str) -> None:
        """A goal: verdict is PASS, FAIL, or why none applies (n/a on cpu, skipped: ...)."""
        self.data["checks"].append({"name": name, "value": value, "goal": goal, "verdict": verdict})
        self.save()

    @contextmanager
    def phase(self, name: str):
        """Time a part of the item (start-up, a TorchTrainer run, ...): {name: seconds} in the JSON's
        `phases`, printed in the item's table, so that where an item's time goes is on record."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timed(name, time.perf_counter() - start)

    def timed(self, name: str, seconds: float) -> None:
        self.data.setdefault("phases", {})[name] = round(seconds, 2)
        self.save()
        print(f"{name}: {seconds:.1f} s", flush=True)

    def set(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def connect_ray() -> None:
    """Join the orchestrator's Ray cluster. Ray's workers take this driver's sys.path, on which
    bench/gpu_check.py put the repository: they import bench/ and stal_ray from it (a runtime_env would
    start a set of workers of its own for every item)."""
    import ray

    ray.init(address=os.environ[RAY_ADDRESS], log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def training_reports(trainer) -> list[dict]:
    """The reports of a TorchTrainer run in order, its storage removed afterwards (Ray Train 2 keeps the
    metrics of kept checkpoints only: the trainer must keep more checkpoints than it reports)."""
    import shutil

    result = trainer.fit()
    reports = sorted(result.metrics_dataframe.to_dict("records"), key=lambda r: (r["iteration"], r["epoch"]))
    shutil.rmtree(trainer.run_config.storage_path, ignore_errors=True)
    return reports


def median(values: list[float]) -> float:
    return statistics.median(values)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory torch allocated on the device since the last reset (None on a CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()}"


def bf16_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The device's dense bf16 peak in FLOP/s: --peak-tflops, else the data-sheet table; None on a CPU or an
    unknown GPU (MFU is then not computed, never guessed)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)
