"""Benchmark: the paper's training recipe against the strong one (issue 22), on data no config was tuned on.

The data: the synthetic generator's "alternate" style (muted random colours, strong camera casts, darker
scenes; stal_ray.data.synthetic.generator.STYLES), 60 training and 60 test identities in 6 cameras, 30% of
frames occluded. Every configuration was written and tuned on the default style; none saw this one.

For each seed, two models train for the same --iterations (each a Ray Train run): the paper recipe
(configs/synthetic_tiny.yaml, its learning rate halved every quarter of the run as study_occluded.yaml does)
and the strong recipe (configs/synthetic_strong.yaml: BNNeck, Adam, warm-up over a tenth of the run, cosine
decay, label smoothing, flip, pad-and-crop, colour jitter, random erasing). Each model is evaluated
on the test split in the `stal` and `baseline` modes (STAL's attention, and all attention 1: §IV-C1), on
the plain distance and re-ranked (eval.rerank; see RERANKING; the features are extracted once; a model
already trained in --workdir is evaluated again, not retrained). The table and
bench/results/recipe.json hold mAP (official trapezoid rule) and rank-1 for every cell.

    python bench/recipe.py --iterations 800 --seeds 0 1
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import ray  # noqa: E402

from stal_ray.config import load_config  # noqa: E402
from stal_ray.data.synthetic.generator import ensure_synthetic_shards  # noqa: E402
from stal_ray.evaluate.evaluate import evaluate  # noqa: E402
from stal_ray.ray_init import init_ray  # noqa: E402
from stal_ray.train.trainer import train  # noqa: E402

UNSEEN = dict(identities=60, test_identities=60, cameras=6, frames_per_tracklet=(10, 24), occlusion=0.3,
              style="alternate")
RECIPES = {"paper": REPO / "configs" / "synthetic_tiny.yaml",
           "strong": REPO / "configs" / "synthetic_strong.yaml"}
MODES = ("stal", "baseline")
# the plain distance; re-ranked with Zhong et al.'s k1 = 20, k2 = 6 (the configs' values, made for galleries
# of ~15 tracklets per identity as MARS's); and with k1 = 6, k2 = 3 for this gallery's ~3 per identity
# (chosen after k1 = 20 lowered the paper recipe's seed-0 mAP here, not tuned further)
RERANKING = {"": ["eval.rerank=false"], "+rerank": ["eval.rerank=true"],
             "+rerank k1=6": ["eval.rerank=true", "eval.rerank_k1=6", "eval.rerank_k2=3"]}


def run(recipe: str, seed: int, iterations: int, data: str, out: Path, extra: list[str],
        variant: str = "") -> dict:
    # the schedules scaled to the run: the paper recipe halves the rate every quarter (as
    # configs/study_occluded.yaml at 800 iterations), the strong one warms up for a tenth (as at 200)
    scaled = {"paper": [f"train.lr_step={max(1, iterations // 4)}"],
              "strong": [f"train.warmup_iterations={max(1, iterations // 10)}"]}[recipe]
    overrides = [f"train.iterations={iterations}", f"train.seed={seed}", "train.deterministic=true", *scaled,
                 f"train.checkpoint_every={iterations}", f"train.log_every={max(1, iterations // 4)}",
                 f"train.storage_path={out / 'runs'}", *extra]
    config = load_config(RECIPES[recipe], overrides)
    name = f"{recipe}{variant}-seed{seed}-{iterations}"
    model_path, seconds = out / "runs" / name / "model.pt", None
    if not model_path.exists():  # a finished run is evaluated again, not retrained
        if not ray.is_initialized():
            init_ray(None)
        start = time.time()
        model_path = train(config, data, name=name).model_path
        seconds = round(time.time() - start, 1)
    cells = {}
    for suffix, settings in RERANKING.items():
        metrics = evaluate(str(model_path), data, str(out / f"{name}{suffix.replace(' ', '_')}"), modes=MODES,
                           config_overrides=settings, features_path=str(out / f"{name}-features.parquet"))
        for mode in MODES:
            cells[f"{mode}{suffix}"] = {
                "mAP": metrics["modes"][mode]["mAP"], "rank1": metrics["modes"][mode]["cmc"]["1"]}
        queries = metrics["num_query"]
    return {"recipe": recipe + variant, "settings": extra, "seed": seed, "iterations": iterations,
            "train_seconds": seconds,
            "queries": queries, "cells": cells}


def table(rows: list[dict]) -> str:
    columns = [f"{mode}{suffix}" for suffix in RERANKING for mode in MODES]
    lines = ["| recipe | iterations | seed | " + " | ".join(f"{c} mAP / R1" for c in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row['cells'][c]['mAP']:.1%} / {row['cells'][c]['rank1']:.1%}"
                 if c in row["cells"] else "–" for c in columns]
        lines.append(f"| {row['recipe']} | {row['iterations']} | {row['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=800)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for every run, e.g. data.decode_concurrency=1")
    parser.add_argument("--variant", default="", help="a name for runs with --set settings, e.g. "
                        "'-no-augment': the recipe's row and run are named <recipe><variant>")
    parser.add_argument("--workdir", default="/tmp/stal-recipe", help="runs, features and the data set")
    parser.add_argument("--out", default="bench/results/recipe.json")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    data = ensure_synthetic_shards(str(work / "cache"), **UNSEEN)
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for seed in args.seeds:
        for recipe in args.recipes:
            key = (recipe + args.variant, seed, args.iterations)
            rows = [r for r in rows if (r["recipe"], r["seed"], r["iterations"]) != key]
            rows.append(run(recipe, seed, args.iterations, data, work, args.overrides, args.variant))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"data": UNSEEN, "rows": rows}, indent=1) + "\n")  # after every run
            print(table(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
