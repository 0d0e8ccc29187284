"""Benchmark: CMC/mAP ranking against torchreid's per-query loop, and the fused distance against its products.

(a) Ranking. The 1980 queries x 9330 gallery tracklets of MARS under the torchreid protocol (identities and
cameras from the real index tables in tests/data/mars_info), random distances. evaluate_ranking, asked for
the official code's trapezoid AP (it computes the step AP and mINP in the same pass), against
reference_evaluate of stal_ray/evaluate/reference.py (torchreid's eval_func as written, with a stable sort,
and fast-reid's INP), which is also the test's reference; both must give the same step mAP, mINP and CMC.
Its trapezoid AP is checked per query against the same module's transcription of the official MARS code on
every 15th query (untimed). A per-query loop with no Python loop over gallery entries is timed beside them,
for context: the goal is on torchreid's loop. So is evaluate_ranking on heavily tied distances (4 levels:
ties between true matches and thousands of other entries in every row), checked against the official code
too.

(b) Distance. fused_distance (stal mode: Eq. 8 over 6 parts of 1024 dimensions plus the global branch of 1024)
for 1980 x 9330 against the bare matrix products it cannot avoid: the R batched q·gᵀ products and the global
one, timed in the same run on the same device, over the same chunks of query rows (the goal's reference) and
as one call each (shown: its (R, Nq, Ng) result is larger than the chunks, and slower to write on a CPU).

    python bench/ranking.py --device cpu
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.io
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stal_ray.evaluate.distance import TrackletFeatures, fused_distance  # noqa: E402
from stal_ray.evaluate.ranking import evaluate_ranking, query_gallery_split  # noqa: E402
from stal_ray.evaluate.reference import official_evaluation, reference_evaluate  # noqa: E402

MARS_INFO = Path(__file__).resolve().parents[1] / "tests" / "data" / "mars_info"
GOAL_SPEEDUP = 20.0  # evaluate_ranking over torchreid's loop
GOAL_OVERHEAD = 1.5  # fused_distance over its matrix products


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, repeats: int, warm_up: bool = True) -> float:
    """Median seconds of `step()`, after one warm-up run if asked."""
    if warm_up:
        step()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mars_torchreid_split() -> dict[str, np.ndarray]:
    """Identities and cameras of MARS's queries and torchreid-protocol gallery (1980 x 9330)."""
    table = scipy.io.loadmat(MARS_INFO / "tracks_test_info.mat")["track_test_info"].astype(np.int64)
    queries = scipy.io.loadmat(MARS_INFO / "query_IDX.mat")["query_IDX"].ravel().astype(np.int64) - 1
    identities, cameras = table[:, 2], table[:, 3]
    is_query = np.zeros(len(table), bool)
    is_query[queries] = True
    q, g = query_gallery_split(identities, cameras, is_query, "torchreid")
    return dict(q_pids=identities[q], g_pids=identities[g], q_cams=cameras[q], g_cams=cameras[g])


def numpy_loop(dist, q_pids, g_pids, q_cams, g_cams) -> float:
    """mAP by a loop over queries whose body is array operations only (context, not the goal's reference)."""
    average_precision = []
    for i in range(len(dist)):
        order = np.argsort(dist[i], kind="stable")
        kept = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        match = (g_pids[order] == q_pids[i])[kept]
        if match.any():
            rank = np.flatnonzero(match)
            average_precision.append((np.arange(1, len(rank) + 1) / (rank + 1)).mean())
    return float(np.mean(average_precision))


def ranking_benchmark(device: torch.device, repeats: int) -> dict:
    ids = mars_torchreid_split()
    num_q, num_g = len(ids["q_pids"]), len(ids["g_pids"])
    dist = np.random.default_rng(0).random((num_q, num_g), dtype=np.float32)
    dist_on_device = torch.from_numpy(dist).to(device)
    tied = np.random.default_rng(1).integers(0, 4, (num_q, num_g)).astype(np.float32)
    tied_on_device = torch.from_numpy(tied).to(device)

    results = {}

    def vectorised():
        results["vectorised"] = evaluate_ranking(dist_on_device, *ids.values(), ap="trapezoid")

    def vectorised_tied():
        results["vectorised_tied"] = evaluate_ranking(tied_on_device, *ids.values(), ap="trapezoid")

    def reference():
        results["reference"] = reference_evaluate(dist, *ids.values())

    def loop():
        results["numpy_loop"] = numpy_loop(dist, *ids.values())

    seconds = {
        "reference": timed(reference, device, 1, warm_up=False),  # 15 s on 2 cores: once is enough
        "numpy_loop": timed(loop, device, 1, warm_up=False),
        "vectorised": timed(vectorised, device, repeats),
        "vectorised_tied": timed(vectorised_tied, device, repeats),
    }
    ours = results["vectorised"]
    cmc_curve, average_precision, skipped, inverse_negative_penalty = results["reference"]
    reference_map = float(average_precision.mean())
    same = (abs(ours.mAP_step - reference_map) < 1e-9 and abs(ours.mAP_step - results["numpy_loop"]) < 1e-9
            and abs(ours.mINP - inverse_negative_penalty.mean()) < 1e-9
            and skipped == ours.skipped_queries
            and np.allclose(ours.cmc_curve, cmc_curve, rtol=0, atol=1e-12))
    # the official code's AP, per query, on every 15th query that has a true match (a result holds the APs
    # of those only, in query order)
    answered = ((ids["q_pids"][:, None] == ids["g_pids"]) & (ids["q_cams"][:, None] != ids["g_cams"])).any(1)
    sample = np.flatnonzero(answered)[::15]
    position = np.cumsum(answered)[sample] - 1
    same_trapezoid = True
    for matrix, result in ((dist, ours), (tied, results["vectorised_tied"])):
        official_ap, _ = official_evaluation(matrix[sample], ids["g_pids"], ids["q_pids"][sample],
                                             ids["g_cams"], ids["q_cams"][sample])
        same_trapezoid &= result.num_query == answered.sum() and bool(
            np.allclose(result.average_precision[position], official_ap, rtol=0, atol=1e-12))
    return {"num_query": num_q, "num_gallery": num_g, "seconds": seconds,
            "speedup": seconds["reference"] / seconds["vectorised"],
            "speedup_over_numpy_loop": seconds["numpy_loop"] / seconds["vectorised"],
            "mAP": {"vectorised": ours.mAP_step, "reference": reference_map,
                    "numpy_loop": results["numpy_loop"]},
            "mAP_trapezoid": ours.mAP, "mINP": ours.mINP, "official_queries_checked": len(sample),
            "tied_mAP_step": results["vectorised_tied"].mAP_step,
            "skipped_queries": ours.skipped_queries, "same_result": bool(same),
            "same_trapezoid_ap": same_trapezoid}


def random_features(n: int, parts: int, dim: int, global_dim: int, device: torch.device) -> TrackletFeatures:
    f = torch.randn(n, parts, dim)
    # one tensor for the three poolings: the stal mode reads only f_attended
    return TrackletFeatures(g=torch.randn(n, global_dim), f_attended=f, f_temporal=f, f_mean=f,
                            part_scores=torch.rand(n, parts) + 0.1)


def distance_benchmark(device: torch.device, repeats: int, num_q: int, num_g: int, parts: int, dim: int,
                       global_dim: int, chunk_size: int) -> dict:
    query = random_features(num_q, parts, dim, global_dim, device)
    gallery = random_features(num_g, parts, dim, global_dim, device)
    q_parts, g_parts = (x.f_attended.transpose(0, 1).contiguous().to(device) for x in (query, gallery))
    q_global, g_global = query.g.to(device), gallery.g.to(device)

    def products_at_once():
        torch.bmm(q_parts, g_parts.transpose(1, 2))
        q_global @ g_global.T

    def products():
        for start in range(0, num_q, chunk_size):
            torch.bmm(q_parts[:, start : start + chunk_size], g_parts.transpose(1, 2))
            q_global[start : start + chunk_size] @ g_global.T

    def fused():
        fused_distance(query, gallery, "stal", 0.3, chunk_size=chunk_size, device=device)

    seconds = {"products_at_once": timed(products_at_once, device, repeats),
               "products": timed(products, device, repeats), "fused_distance": timed(fused, device, repeats)}
    flops = 2 * num_q * num_g * (parts * dim + global_dim)
    return {"num_query": num_q, "num_gallery": num_g, "parts": parts, "dim": dim, "global_dim": global_dim,
            "chunk_size": chunk_size, "seconds": seconds, "gflop": flops / 1e9,
            "overhead": seconds["fused_distance"] / seconds["products"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", type=int, default=6)
    parser.add_argument("--dim", type=int, default=1024, help="D of each part feature")
    parser.add_argument("--global-dim", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=512, help="fused_distance's query rows per chunk")
    parser.add_argument("--out", default="bench/results/ranking.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    cpu = f"cpu x{torch.get_num_threads()}"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu

    ranking = ranking_benchmark(device, args.repeats)
    distance = distance_benchmark(device, args.repeats, ranking["num_query"], ranking["num_gallery"],
                                  args.parts, args.dim, args.global_dim, args.chunk_size)

    seconds = ranking["seconds"]
    print(f"(a) ranking: {ranking['num_query']} queries x {ranking['num_gallery']} gallery (MARS, torchreid "
          f"protocol, random distances), {device_name}")
    print(f"{'':<36}{'seconds':>10}{'speed-up':>10}{'step mAP':>12}")
    for name, label in (("reference", "torchreid loop (reference)"), ("numpy_loop", "per-query numpy loop"),
                        ("vectorised", "evaluate_ranking")):
        print(f"{label:<36}{seconds[name]:>10.3f}{seconds['reference'] / seconds[name]:>9.1f}x"
              f"{ranking['mAP'][name]:>12.6f}")
    print(f"{'evaluate_ranking, 4 distance levels':<36}{seconds['vectorised_tied']:>10.3f}{'':>10}"
          f"{ranking['tied_mAP_step']:>12.6f}")
    print(f"same step mAP, mINP ({ranking['mINP']:.6f}), CMC and skipped queries "
          f"({ranking['skipped_queries']}) as the reference: {'yes' if ranking['same_result'] else 'NO'}")
    print(f"trapezoid mAP {ranking['mAP_trapezoid']:.6f}; per-query AP as the official MARS code's on "
          f"{ranking['official_queries_checked']} queries, random and tied: "
          f"{'yes' if ranking['same_trapezoid_ap'] else 'NO'}")
    ranking_pass = (ranking["speedup"] >= GOAL_SPEEDUP and ranking["same_result"]
                    and ranking["same_trapezoid_ap"])
    print(f"evaluate_ranking over torchreid's loop: {ranking['speedup']:.1f}x (goal >= {GOAL_SPEEDUP:.0f}x, "
          f"same results): {'PASS' if ranking_pass else 'FAIL'}")

    seconds = distance["seconds"]
    print(f"(b) fused distance: {distance['num_query']} x {distance['num_gallery']}, {args.parts} parts x "
          f"{args.dim} + global {args.global_dim}, fp32, {device_name}")
    print(f"{'':<36}{'seconds':>10}{'of products':>13}{'GFLOP/s':>10}")
    for name, label in (("products_at_once", "matrix products, one call each"),
                        ("products", "matrix products, same chunks"),
                        ("fused_distance", "fused_distance (stal)")):
        print(f"{label:<36}{seconds[name]:>10.3f}{seconds[name] / seconds['products']:>12.2f}x"
              f"{distance['gflop'] / seconds[name]:>10.1f}")
    distance_pass = distance["overhead"] <= GOAL_OVERHEAD
    print(f"fused_distance over its matrix products: {distance['overhead']:.2f}x (goal <= {GOAL_OVERHEAD}x): "
          f"{'PASS' if distance_pass else 'FAIL'}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args), "device": device_name, "ranking": ranking, "distance": distance,
              "goals": {"ranking_speedup": GOAL_SPEEDUP, "distance_overhead": GOAL_OVERHEAD},
              "pass": {"ranking": bool(ranking_pass), "distance": bool(distance_pass)}}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
