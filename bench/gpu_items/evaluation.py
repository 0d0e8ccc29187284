"""Item `evaluation` of bench/gpu_check.py: evaluation on the device.

1. Feature extraction (evaluate/features.py: evaluation_dataset -> one model actor on the device) of the
   data item's test split with a model file of the stream config's model (random weights): frames/s.
2. Ranking on the device against the CPU, same results (every per-query AP and the CMC equal, bit for bit):
   the CUDA tie test of tests/test_ranking.py (MARS's official split, 3 distance levels: thousands of ties
   per query, true matches among them) and a 1980 x 11310 matrix of random distances (the official split's
   shape), each also timed on both.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.gpu_items.common import ItemResult, Profile, connect_ray, synchronize, verdict


def extraction(shards: str, profile: Profile, device: torch.device) -> dict:
    from stal_ray.config import load_config
    from stal_ray.data.prepared.manifest import read_manifest
    from stal_ray.data.stream.pipeline import evaluation_dataset
    from stal_ray.evaluate.features import extract_features
    from stal_ray.model.export import save_model
    from stal_ray.model.stal import STAL

    config = load_config(profile.stream_config, ["model.pretrained=none"])
    torch.manual_seed(0)
    model = STAL.from_config(config, num_classes=16).eval()
    model_path = str(Path(tempfile.mkdtemp(prefix="gpu-check-eval-")) / "model.pt")
    save_model(model_path, model, config, num_classes=16)
    frames = read_manifest(shards).counts["test"]["frames"]
    start = time.perf_counter()
    features = extract_features(evaluation_dataset(shards, config), model_path,
                                batch_size=config.eval.batch_size, use_gpu=device.type == "cuda")
    seconds = time.perf_counter() - start
    return {"name": f"feature extraction, {config.model.backbone} {config.data.height}x{config.data.width}, "
                    f"1 actor", "tracklets": len(features), "frames": frames, "seconds": seconds,
            "frames_per_s": frames / seconds}


def ranked_on(device: torch.device, dist: np.ndarray, ids: tuple) -> tuple:
    """(result, seconds) of evaluate_ranking with the distances on `device`."""
    from stal_ray.evaluate.ranking import evaluate_ranking

    on_device = torch.from_numpy(dist).to(device)
    synchronize(device)
    start = time.perf_counter()
    result = evaluate_ranking(on_device, *ids, ap="trapezoid")
    synchronize(device)
    return result, time.perf_counter() - start


def same_ranking(a, b) -> bool:
    return (np.array_equal(a.average_precision, b.average_precision)
            and np.array_equal(a.cmc_curve, b.cmc_curve) and a.mINP == b.mINP and a.mAP_step == b.mAP_step
            and a.skipped_queries == b.skipped_queries)


def ranking(result: ItemResult, device: torch.device, query_step: int) -> None:
    from stal_ray.evaluate.ranking import query_gallery_split
    from tests.test_ranking import real_mars_test_split

    identities, cameras, is_query = real_mars_test_split()
    queries, gallery = query_gallery_split(identities, cameras, is_query, "official")
    queries = queries[::query_step]
    ids = (identities[queries], identities[gallery], cameras[queries], cameras[gallery])
    shape = (len(queries), len(gallery))
    cases = {
        # tests/test_ranking.py::test_cuda_ranks_tied_distances_as_the_cpu_does, its seed and levels
        "tied distances (3 levels)": np.random.default_rng(5).integers(0, 3, shape).astype(np.float32),
        "random distances": np.random.default_rng(0).random(shape, dtype=np.float32),
    }
    for name, dist in cases.items():
        cpu, cpu_s = ranked_on(torch.device("cpu"), dist, ids)
        ranked_on(device, dist, ids)  # warm-up: the first CUDA call pays its kernels' loading
        on_device, device_s = ranked_on(device, dist, ids)
        same = same_ranking(cpu, on_device)
        result.row(name=f"ranking {shape[0]} x {shape[1]}, {name}", cpu_s=cpu_s, device_s=device_s,
                   mAP=on_device.mAP)
        result.check(f"ranking on {device.type} == CPU, {name}", "same" if same else "differ",
                     "identical", verdict(same) if device.type == "cuda" else "n/a on cpu")


def run(result: ItemResult, profile: Profile, args) -> None:
    device = torch.device(args.device)
    with result.phase("Ray connection"):
        connect_ray()
    with result.phase("extraction"):
        result.row(**extraction(args.context["shards"], profile, device))
    with result.phase("ranking"):
        ranking(result, device, profile.ranking_query_step)
