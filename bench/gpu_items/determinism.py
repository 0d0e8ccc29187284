"""Item `determinism` of bench/gpu_check.py: two short training runs with train.deterministic (Ray Train's
reproducibility switch, deterministic kernels, the stream's block order kept: train/loop.py) on the same
data give identical losses, every term at every report, bit for bit.

The runs go one after the other (a GPU run needs the one GPU for each). Quick mode on a CPU once started
them at once; on two cores that cost more CPU (66 against 60 CPU-seconds for the item) for no gain in wall
time beside the check's other lane: the second run reuses the first one's idle Ray Data workers.

On CUDA, grid_sample's backward (the part boxes' ROI pooling) has no deterministic kernel and torch only
warns (use_deterministic_algorithms(warn_only=True)): if the runs differ, that is the first suspect.
"""

import tempfile

import torch

from bench.gpu_items.common import ItemResult, Profile, connect_ray, training_reports, verdict
from bench.gpu_items.stream import stream_config


def losses(shards: str, profile: Profile, device: torch.device, name: str) -> list[dict]:
    from stal_ray.train.trainer import build_trainer

    n = profile.determinism_iterations
    config = stream_config(profile, device, [
        "train.deterministic=true", f"train.iterations={n}", f"train.checkpoint_every={max(1, n // 2)}",
        "train.num_workers=1", f"train.use_gpu={'true' if device.type == 'cuda' else 'false'}",
        "train.keep_checkpoints=10", f"train.storage_path={tempfile.mkdtemp(prefix='gpu-check-det-')}"])
    reports = training_reports(build_trainer(config, shards, name=name))
    return [{key: value for key, value in report.items() if key.startswith("loss_") or key == "iteration"}
            for report in reports]


def run(result: ItemResult, profile: Profile, args) -> None:
    device = torch.device(args.device)
    with result.phase("Ray connection"):
        connect_ray()
    shards = args.context["shards"]
    runs = []
    for number in (1, 2):
        with result.phase(f"run {number} (TorchTrainer)"):
            runs.append(losses(shards, profile, device, f"deterministic-{number}"))
    for number, reports in enumerate(runs, 1):
        last = reports[-1]
        result.row(name=f"run {number}", reports=len(reports), iteration=int(last["iteration"]),
                   loss_total=last["loss_total"])
    first, second = runs
    same = first == second
    keys = [key for key in first[-1] if key.startswith("loss_")]
    difference = max((abs(a[key] - b[key]) for a, b in zip(first, second, strict=False) for key in keys),
                     default=float("nan"))
    result.check(f"losses of two deterministic runs on {device.type} (largest difference {difference:.3g})",
                 "identical" if same else "differ", "identical", verdict(same))
