"""Benchmark: the cost of k-reciprocal re-ranking (eval.rerank) beside the plain fused distance it re-ranks.

For each size Nq x Ng: stal-mode features (6 parts x 1024 + global 1024, as bench/ranking.py), clustered by
identity (about 18 gallery tracklets an identity, as MARS's 11310 over ~630) so that neighbourhoods look like
a trained model's. Timed in the same run on the same device: the plain fused q x g distance (what evaluation
computes anyway), the extra q x q and g x g distances re-ranking needs (rerank.self_distance), and
k_reciprocal_distance itself (k1=20, k2=6, lambda=0.3). Peak memory is the process's maximum resident set
after each size (it only grows: sizes run smallest first); one dense (N, N) float32 matrix, N = Nq + Ng, is
shown beside it, the reference implementation holding several of them at once.

    python bench/rerank.py --sizes 200x2000 1980x11310
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stal_ray.evaluate.distance import TrackletFeatures, fused_distance  # noqa: E402
from stal_ray.evaluate.ranking import evaluate_ranking  # noqa: E402
from stal_ray.evaluate.rerank import K1, K2, LAMBDA, k_reciprocal_distance, self_distance  # noqa: E402

PER_IDENTITY = 18  # gallery tracklets an identity (MARS: 11310 / ~630)
# spread of the identity centres against unit noise per dimension: a hard set, neither separable nor random
CENTRE_SCALE = 0.5


def clustered_features(identity: np.ndarray, centres: torch.Tensor, global_centres: torch.Tensor,
                       generator: torch.Generator) -> TrackletFeatures:
    """Each tracklet its identity's centre plus unit noise in every dimension."""
    index = torch.from_numpy(identity)
    f = centres[index] + torch.randn(len(identity), *centres.shape[1:], generator=generator)
    g = global_centres[index] + torch.randn(len(identity), global_centres.shape[1], generator=generator)
    # one tensor for the three poolings: the stal mode reads only f_attended
    return TrackletFeatures(g=g, f_attended=f, f_temporal=f, f_mean=f,
                            part_scores=torch.rand(len(identity), f.shape[1], generator=generator) + 0.1)


def timed(on: torch.device, step, *args, **kwargs):
    """step(*args, **kwargs) and its seconds, waiting for the device `on` at both ends."""
    if on.type == "cuda":
        torch.cuda.synchronize(on)
    start = time.perf_counter()
    result = step(*args, **kwargs)
    if on.type == "cuda":
        torch.cuda.synchronize(on)
    return result, time.perf_counter() - start


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_size(num_q: int, num_g: int, parts: int, dim: int, global_dim: int, device: torch.device,
             seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    identities = max(2, num_g // PER_IDENTITY)
    centres = CENTRE_SCALE * torch.randn(identities, parts, dim, generator=generator)
    global_centres = CENTRE_SCALE * torch.randn(identities, global_dim, generator=generator)
    rng = np.random.default_rng(seed)
    q_pids, g_pids = rng.integers(0, identities, num_q), np.arange(num_g) % identities
    query = clustered_features(q_pids, centres, global_centres, generator)
    gallery = clustered_features(g_pids, centres, global_centres, generator)
    q_cams, g_cams = np.zeros(num_q, np.int64), np.ones(num_g, np.int64)

    seconds = {}
    q_g, seconds["plain_q_g"] = timed(device, fused_distance, query, gallery, "stal", 0.3, device=device)
    q_q, seconds["q_q"] = timed(device, self_distance, query, "stal", 0.3, device=device)
    g_g, seconds["g_g"] = timed(device, self_distance, gallery, "stal", 0.3, device=device)
    reranked, seconds["k_reciprocal"] = timed(device, k_reciprocal_distance, q_g, q_q, g_g, K1, K2, LAMBDA)
    seconds["rerank_total"] = seconds["q_q"] + seconds["g_g"] + seconds["k_reciprocal"]
    plain_map = evaluate_ranking(q_g, q_pids, g_pids, q_cams, g_cams).mAP
    reranked_map = evaluate_ranking(reranked, q_pids, g_pids, q_cams, g_cams).mAP
    n = num_q + num_g
    return {"num_query": num_q, "num_gallery": num_g, "seconds": seconds,
            "rerank_over_plain": seconds["rerank_total"] / seconds["plain_q_g"],
            "mAP": {"plain": plain_map, "reranked": reranked_map},
            "peak_rss_gib": peak_rss_gib(), "dense_n_by_n_gib": n * n * 4 / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the distances are computed (re-ranking itself runs on the CPU)")
    parser.add_argument("--sizes", nargs="+", default=["200x2000", "1980x11310"], help="Nq x Ng")
    parser.add_argument("--parts", type=int, default=6)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--global-dim", type=int, default=1024)
    parser.add_argument("--out", default="bench/results/rerank.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu x{torch.get_num_threads()}")
    sizes = sorted((tuple(int(x) for x in size.lower().split("x")) for size in args.sizes),
                   key=lambda s: s[0] * s[1])
    rows = [run_size(q, g, args.parts, args.dim, args.global_dim, device, seed=i)
            for i, (q, g) in enumerate(sizes)]

    print(f"k-reciprocal re-ranking (k1={K1}, k2={K2}, lambda={LAMBDA}), stal mode ({args.parts} parts x "
          f"{args.dim} + global {args.global_dim}), distances on {device_name}, re-ranking on the CPU "
          f"x{torch.get_num_threads()}")
    header = ["Nq x Ng", "plain q·g s", "q·q s", "g·g s", "k-recip s", "rerank/plain", "mAP plain",
              "mAP rerank", "peak GiB", "(N,N) GiB"]
    print("".join(f"{h:>14}" for h in header))
    for row in rows:
        s = row["seconds"]
        cells = [f"{row['num_query']}x{row['num_gallery']}", f"{s['plain_q_g']:.2f}", f"{s['q_q']:.2f}",
                 f"{s['g_g']:.2f}", f"{s['k_reciprocal']:.2f}", f"{row['rerank_over_plain']:.1f}x",
                 f"{row['mAP']['plain']:.4f}", f"{row['mAP']['reranked']:.4f}", f"{row['peak_rss_gib']:.2f}",
                 f"{row['dense_n_by_n_gib']:.2f}"]
        print("".join(f"{c:>14}" for c in cells))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "device": device_name, "k1": K1, "k2": K2,
                               "lambda": LAMBDA, "sizes": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
