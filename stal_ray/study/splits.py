"""Repeated random splits (the paper's §IV-A protocol for iLIDS-VID and PRID-2011): prepare each split's
shards, train and evaluate one model per split (a Ray Train run each), and average over the splits.

Layout under `out`:

    data/split-K/            the shards of split K (jobs/prepare_data.py's output; PRID-2011's seeded splits
                             file data/splits_prid2011.json is shared by all splits)
    runs/split-K/            the training run of split K: model.pt, metrics.json, checkpoints, tensorboard/
    cross/split-K/           with a cross-dataset test set (Table VI): metrics.json of split K's model on the
                             other data set's split K
    summary.json, summary.md the per-split figures, their mean and standard deviation

Started again with the same `out`, it resumes: a split whose metrics.json is there is not run again, an
interrupted training resumes from its last checkpoint, and shards already written are reused; the settings
must be those of out/config.yaml unless a change is allowed (train/run_config.py).
"""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray

from stal_ray.config import Config, with_overrides
from stal_ray.core import storage
from stal_ray.data.prepared import pollution, protocol
from stal_ray.data.prepared.handle import PreparedData
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.registry import REGISTRY, read_release
from stal_ray.evaluate.report import METRICS_FILE, write_bytes

SUMMARY_JSON, SUMMARY_TABLE = "summary.json", "summary.md"
FIGURES = ("Rank-1", "Rank-5", "Rank-10", "Rank-20", "mAP")


@dataclass(frozen=True)
class SplitData:
    """Where the shards of one data set's splits come from and how they are made."""

    dataset: str  # ilidsvid or prid2011
    root: str  # the release as shipped
    out: str  # folder of the split folders (split-K/) and of PRID-2011's seeded splits file
    split_file: str | None = None  # PRID-2011: torchreid's splits_prid2011.json
    pollute_seed: int | None = None  # Table VII: black boxes in every frame, seeded
    endpoint_url: str | None = None

    def ensure_splits(self, split: int) -> None:
        """A data set of seeded splits (PRID-2011) without a split file: write the seeded splits file once,
        before splits run side by side (each would otherwise race to write it)."""
        spec = REGISTRY.get(self.dataset)
        if spec is not None and spec.split_file and self.split_file is None:
            read_release(self.dataset, self.root, split=split, out=self.out, endpoint_url=self.endpoint_url)

    def prepare(self, split: int) -> PreparedData:
        """The shards of split `split` (written once, then reused), as the prepare wrote or found them."""
        uri = storage.join(self.out, f"split-{split}")
        release = read_release(self.dataset, self.root, split=split, split_file=self.split_file, out=self.out,
                               endpoint_url=self.endpoint_url)
        polluted = None if self.pollute_seed is None else pollution.settings(self.pollute_seed)
        manifest = write_shards(release, uri, endpoint_url=self.endpoint_url, progress=False, lock_wait_s=600,
                                dataset=protocol.describe(self.dataset, split, polluted))
        return PreparedData(uri, self.endpoint_url, manifest)


def run_splits(config: Config, data: SplitData, out: str, splits: list[int], *, command: str,
               cross: SplitData | None = None, parallel: int = 1, allow_changed_config: bool = False) -> str:
    """Prepare, train and evaluate every split in `splits` into `out` (module docstring), `parallel` splits at
    once (each a Ray task of its own, so on a cluster they run side by side), then write the summary.
    With `cross`, each split's model is also evaluated on that data set's split of the same number."""
    from stal_ray.train.preflight import preflight  # Ray Data: only where splits run
    from stal_ray.train.run_config import record_config

    start = time.perf_counter()
    storage.check_output_folder(out, "--out", endpoint_url=data.endpoint_url)  # before any split trains
    # the settings' checks before any split is prepared; the data's run per split, once its shards exist
    preflight(with_overrides(config, [f"train.storage_path={storage.join(out, 'runs')}"]), None,
              endpoint_url=data.endpoint_url)
    # a finished split is not run again: its metrics must come from the settings the others run with
    record_config(out, config.to_dict(), allow_changed=allow_changed_config, endpoint_url=data.endpoint_url,
                  what="set of splits")
    if parallel > 1:
        for source in (data, cross):
            if source is not None:
                source.ensure_splits(splits[0])
        task = ray.remote(num_cpus=0)(run_split)
        with ThreadPoolExecutor(parallel) as pool:  # at most `parallel` splits in flight
            results = list(pool.map(lambda k: ray.get(task.remote(config, data, out, k, cross, parallel,
                                                              allow_changed_config)), splits))
    else:
        results = [run_split(config, data, out, k, cross, allow_changed_config=allow_changed_config)
                   for k in splits]
    summary = summarise(dict(zip(splits, results, strict=True)), data, cross, command,
                        time.perf_counter() - start)
    write_bytes(storage.join(out, SUMMARY_JSON), (json.dumps(summary, indent=2) + "\n").encode())
    table = format_summary(summary)
    write_bytes(storage.join(out, SUMMARY_TABLE), (table + "\n").encode())
    print(table)
    return storage.join(out, SUMMARY_JSON)


def run_split(config: Config, data: SplitData, out: str, split: int, cross: SplitData | None,
              side_by_side: int = 1, allow_changed_config: bool = False) -> dict:
    """{"test": metrics.json of split `split`'s model on its own test split, "cross": on the cross data set's
    split (None without one)}; each read back when an earlier run wrote it. side_by_side: splits running at
    once, which share the nodes' CPUs in their evaluations (else their feature actors hold every CPU and the
    reading tasks of each wait on the others')."""
    from stal_ray.evaluate.evaluate import evaluate  # Ray Data and plotting: only where a split runs
    from stal_ray.train.trainer import train

    run_dir = storage.join(out, "runs", f"split-{split}")
    cross_dir = storage.join(out, "cross", f"split-{split}")
    results = {"test": _finished(run_dir, split),
               "cross": None if cross is None else _finished(cross_dir, split)}
    if results["test"] is not None and (cross is None or results["cross"] is not None):
        print(f"splits: split {split} finished earlier, its metrics reused", flush=True)
        return results
    shards = data.prepare(split)
    split_config = with_overrides(config, [f"train.storage_path={storage.join(out, 'runs')}"],
                                  source=f"split {split}")
    print(f"splits: training split {split} on {shards.uri}", flush=True)
    trained = train(split_config, shards, name=f"split-{split}", allow_changed_config=allow_changed_config)
    if results["test"] is None:
        results["test"] = evaluate(trained.model_path, shards, run_dir, cpu_share=0.5 / side_by_side)
    if cross is not None and results["cross"] is None:
        results["cross"] = evaluate(trained.model_path, cross.prepare(split), cross_dir,
                                    cpu_share=0.5 / side_by_side)
    return results


def _finished(folder: str, split: int) -> dict | None:
    """The metrics.json in `folder` when an earlier run wrote it for split `split`, else None."""
    fs, path = storage.filesystem(storage.join(folder, METRICS_FILE), check=False)
    if not fs.exists(path):
        return None
    with fs.open(path) as file:
        metrics = json.load(file)
    return metrics if metrics.get("dataset", {}).get("split") == split else None


def figures(metrics: dict, mode: str) -> dict[str, float]:
    """Rank-1/5/10/20 and mAP of one mode of a metrics.json, in percent."""
    percent = metrics["modes"][mode]["percent"]
    return {name: float(percent[name]) for name in FIGURES}


def summarise(results: dict[int, dict], data: SplitData, cross: SplitData | None, command: str,
              seconds: float) -> dict:
    """summary.json: per test set (own, cross) and mode, each split's figures and their mean and standard
    deviation (over splits, ddof=0) in percent."""
    sets = {"test": data.dataset, **({"cross": cross.dataset} if cross else {})}
    summary = {"dataset": data.dataset, "root": data.root, "splits": sorted(results), "command": command,
               "seconds": round(seconds, 1), "polluted": data.pollute_seed is not None,
               "figures": list(FIGURES), "std": "population standard deviation over the splits (ddof=0)",
               "results": {}}
    for key, dataset in sets.items():
        first = results[min(results)][key]
        by_mode = {}
        for mode in first["modes"]:
            per_split = {str(k): figures(results[k][key], mode) for k in sorted(results)}
            values = np.array([[v[name] for name in FIGURES] for v in per_split.values()])
            by_mode[mode] = {"per_split": per_split,
                             "mean": dict(zip(FIGURES, values.mean(0).round(2).tolist(), strict=True)),
                             "std": dict(zip(FIGURES, values.std(0).round(2).tolist(), strict=True))}
        summary["results"][key] = {"dataset": dataset, "protocol": first["protocol"],
                                   "num_query": first["num_query"], "num_gallery": first["num_gallery"],
                                   "num_test_ids": first["num_test_ids"],
                                   "cross_dataset": bool(first.get("dataset", {}).get("cross_dataset")),
                                   "modes": by_mode}
    return summary


def format_summary(summary: dict) -> str:
    """Markdown: per test set, each split's figures of the stal distance, then mean ± std of every mode."""
    lines = []
    for key, result in summary["results"].items():
        title = protocol.NAMES.get(result["dataset"], result["dataset"])
        if key == "cross":
            title = (f"cross-dataset: trained on {protocol.NAMES.get(summary['dataset'])}, tested on "
                     f"{title}")
        lines += [f"## {title} ({len(summary['splits'])} splits, {result['num_query']} queries, "
                  f"{result['num_gallery']} gallery, {result['num_test_ids']} identities per split)", "",
                  "| split | " + " | ".join(FIGURES) + " |", "|---" * (len(FIGURES) + 1) + "|"]
        stal = result["modes"].get("stal") or next(iter(result["modes"].values()))
        for split, values in stal["per_split"].items():
            lines.append(f"| {split} | " + " | ".join(f"{values[name]:.1f}" for name in FIGURES) + " |")
        lines += ["", "| mode (mean ± std) | " + " | ".join(FIGURES) + " |",
                  "|---" * (len(FIGURES) + 1) + "|"]
        for mode, values in result["modes"].items():
            lines.append(f"| {mode} | " + " | ".join(f"{values['mean'][name]:.1f} ± {values['std'][name]:.1f}"
                                                     for name in FIGURES) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()
