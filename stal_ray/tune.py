"""The Ray Tune search over λ, m_g and m_l (Eq. 4): every trial is a full distributed training run
(train.trainer) validated on identities held out of the training split, never the test split.

The fusion rate α is a test-time setting: each validation ranks the whole α grid (tune.fusion_rates, the
paper's Fig. 8) on one set of extracted features, and a trial's score is the mAP (or rank-1) of its best α.
ASHA (tune.scheduler) stops weak trials at rungs of grace_iterations × reduction_factor^k iterations.

Layout under <storage>/<name>: Tune's experiment (trial folders with result.json, progress.csv and
TensorBoard event files), runs/<trial id>/ (each trial's Ray Train run: checkpoints, model.pt),
results.csv and best.yaml (the best trial's full configuration, for jobs/train_mars.py --config).
"""

import csv
import io
import json
import logging
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from stal_ray.config import Config, ConfigError, config_from_dict
from stal_ray.core import storage
from stal_ray.data.prepared.handle import PreparedData, as_prepared
from stal_ray.data.prepared.integrity import check_shards
from stal_ray.data.prepared.validation import ValidationSplit, ensure_validation_split
from stal_ray.evaluate.report import write_bytes
from stal_ray.train.run_config import record_config
from stal_ray.train.supply import report_stream_balance
from stal_ray.train.trainer import preflight, storage_root, train

logger = logging.getLogger(__name__)

# the searched settings of TrainConfig, with the paper's symbols
SEARCHED = {"local_weight": "λ", "margin_global": "m_g", "margin_local": "m_l"}
RUNS, RESULTS_FILE, BEST_FILE = "runs", "results.csv", "best.yaml"
# a trial driver only waits on its TorchTrainer, whose workers hold the CPUs and GPUs
DRIVER_RESOURCES = {"cpu": 0.1}


class SearchInterrupted(RuntimeError):
    """The search stopped before all of its trials finished; its state is saved for the same --name."""


@dataclass
class SearchResult:
    experiment_dir: str  # <storage>/<name>
    rows: list[dict[str, Any]]  # one per trial (results_rows), best first
    best_config: Config  # the best trial's settings, eval.fusion_rate its best α
    best_yaml: str  # where best_config was written
    results_csv: str


def search_space(config: Config) -> dict[str, Any]:
    """λ, m_g, m_l drawn uniformly from the tune section's [low, high] ranges."""
    return {name: tune.uniform(*getattr(config.tune, name)) for name in SEARCHED}


def trial_config(config: Config, params: Mapping[str, Any], *, fusion_rate: float | None = None) -> Config:
    """config with a trial's λ, m_g, m_l (and optionally the fusion rate α) in place."""
    layered = config.to_dict()
    for name in SEARCHED:
        layered["train"][name] = float(params[name])
    if fusion_rate is not None:
        layered["eval"]["fusion_rate"] = float(fusion_rate)
    return config_from_dict(layered)


def _run_trial(params: dict[str, Any], *, base: dict, data: PreparedData, split: str, runs: str,
               allow_changed_config: bool = False) -> None:
    """One trial: a TorchTrainer run named after the trial (so a resumed search resumes it from its last
    checkpoint), whose reports reach Tune through TuneReportCallback."""
    layered = trial_config(config_from_dict(base), params).to_dict()
    layered["train"]["storage_path"] = runs
    train(config_from_dict(layered), data, name=tune.get_context().get_trial_id(),
          validation=ValidationSplit.from_json(split), callbacks=[TuneReportCallback()],
          checksums=False,  # run_search checked the training shards in the driver
          allow_changed_config=allow_changed_config)  # run_search recorded the change, if any


class _TrialProgress(tune.Callback):
    """One line per finished trial: what a user watching the job wants besides Tune's periodic table."""

    def __init__(self, metric: str, iterations: int):
        self.metric, self.iterations = metric, iterations

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        done = result.get("iteration", 0)
        how = "finished" if done >= self.iterations else "stopped early by the scheduler"
        params = " ".join(f"{symbol}={trial.config[name]:.3f}" for name, symbol in SEARCHED.items())
        print(f"trial {trial.trial_id} {how} at iteration {done}: {params} "
              f"{self.metric}={result.get(self.metric, math.nan):.4f} at α={result.get('val_alpha')}",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} failed: see {trial.path}/error.txt", flush=True)


def _scheduler(config: Config):
    search = config.tune
    if search.scheduler == "fifo":
        return FIFOScheduler()
    iterations = config.train.iterations
    if search.grace_iterations >= iterations:
        raise ConfigError(f"tune.grace_iterations = {search.grace_iterations} is not below "
                          f"train.iterations = {iterations}: ASHA could never stop a trial early; lower "
                          "tune.grace_iterations or set tune.scheduler=fifo")
    if search.grace_iterations < config.train.checkpoint_every:
        raise ConfigError(f"tune.grace_iterations = {search.grace_iterations} is below "
                          f"train.checkpoint_every = {config.train.checkpoint_every}: trials are validated "
                          "only at checkpoints; lower train.checkpoint_every or raise tune.grace_iterations")
    return ASHAScheduler(time_attr="iteration", max_t=iterations, grace_period=search.grace_iterations,
                         reduction_factor=search.reduction_factor)


def _check_concurrency(config: Config) -> None:
    """Warn when the trials running at once need more CPUs than the cluster has now: each holds its train
    workers and, while it trains and validates, two sets of decoding tasks (one CPU each). Over-committed,
    trials hold workers while waiting for decoders that can never start."""
    # uncapped (data.decode_concurrency null), a trial's stream takes the free CPUs but needs one at least
    decoders = config.data.decode_concurrency or 1
    per_trial = config.train.num_workers + 2 * decoders
    needed, cpus = config.tune.max_concurrent * per_trial, ray.cluster_resources().get("CPU", 0)
    if needed > cpus:
        logger.warning("tune.max_concurrent = %d trials need about %d CPUs (%d train workers + 2 x %d "
                       "decoding tasks each), but the Ray cluster has %g now: unless it scales up, lower "
                       "tune.max_concurrent or the trials wait on each other", config.tune.max_concurrent,
                       needed, config.train.num_workers, decoders, cpus)


def check_resume_folder(experiment_dir: str) -> None:
    """Refuse to resume from a local search folder holding anything this user does not own or others can
    write: Tuner.restore unpickles tuner.pkl and the trials in the experiment state, so a file planted
    there runs as this user. On S3 whoever can write the bucket is trusted (no owner to check)."""
    if "://" in experiment_dir and not experiment_dir.startswith("file://"):
        return
    top = os.path.abspath(os.path.expanduser(experiment_dir.removeprefix("file://")))
    for folder, dirs, files in os.walk(top):
        for path in [folder, *(os.path.join(folder, name) for name in dirs + files)]:
            status = os.lstat(path)
            owner = status.st_uid == os.getuid()
            # group-writable is fine for the user's own (private, under umask 002) group, not another's
            others = stat.S_IWOTH | (stat.S_IWGRP if status.st_gid != os.getgid() else 0)
            if not owner or (status.st_mode & others and not stat.S_ISLNK(status.st_mode)):
                why = "is owned by another user" if not owner else "can be written by other users"
                raise ConfigError(
                    f"resuming: {path} {why}; Ray Tune unpickles this search folder's state, so a file "
                    "planted there would run as you. Resume only from a folder only you can write "
                    f"(chmod -R go-w {top}, after checking its contents), or start a new search")


def run_search(config: Config, data: PreparedData | str, *, name: str, resume: bool = False,
               allow_changed_config: bool = False) -> SearchResult:
    """Run the search `name` under train.storage_path and write results.csv and best.yaml. Every trial trains
    on `data` as the driver read it. A search `name` that exists is resumed (finished trials are kept,
    unfinished ones continue from their last checkpoint) with the settings of its config.yaml: others raise
    ChangedConfigError naming them, unless allow_changed_config, which records the change
    (train/run_config.py). resume=True (the deprecated --resume): refuse to start a search that does not
    exist yet."""
    data = as_prepared(data)
    # before the validation split and any trial: each trial would refuse the same settings on its own, late
    preflight(config, data, held_out=config.data.val_identities)
    root = storage_root(config)
    storage.check_output_folder(root, "--storage-path (train.storage_path)", endpoint_url=data.endpoint_url)
    experiment_dir = storage.join(root, name)
    exists = tune.Tuner.can_restore(experiment_dir)
    if resume and not exists:
        raise ConfigError(f"--resume: no search to resume at {experiment_dir}; check --name and "
                          "--storage-path, or start it without --resume")
    settings = config.to_dict()
    settings["data"]["root"] = data.uri  # the data set the search trains and validates on
    record_config(experiment_dir, settings, allow_changed=allow_changed_config,
                  endpoint_url=data.endpoint_url, what="search")
    min_training = config.data.identities_per_batch
    check_shards(data, ("train",))  # once here, not in every trial's traceback
    split = ensure_validation_split(data, config.data.val_identities, config.train.seed,
                                    min_training_identities=min_training)
    print(f"validation split {split.uri}: {len(split.identities)} held-out identities, "
          f"{len(split.query_tracklets)} queries, {len(split.tracklets)} gallery tracklets")
    _check_concurrency(config)
    report_stream_balance(config, data)  # what one trial's stream can supply
    metric = f"val_{config.tune.metric}"
    trainable = tune.with_resources(tune.with_parameters(
        _run_trial, base=config.to_dict(), data=data, split=split.to_json(),
        runs=storage.join(experiment_dir, RUNS), allow_changed_config=allow_changed_config),
        DRIVER_RESOURCES)
    if exists:
        print(f"resuming the search {name!r} at {experiment_dir}", flush=True)
        check_resume_folder(experiment_dir)  # Tune unpickles its state: only the user's own files
        tuner = tune.Tuner.restore(experiment_dir, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=search_space(config),
            tune_config=tune.TuneConfig(metric=metric, mode="max", scheduler=_scheduler(config),
                                        # the same draws of λ, m_g, m_l for the same train.seed
                                        search_alg=BasicVariantGenerator(
                                            random_state=config.train.seed,
                                            max_concurrent=config.tune.max_concurrent),
                                        num_samples=config.tune.num_samples),
            run_config=tune.RunConfig(name=name, storage_path=root,
                                      callbacks=[_TrialProgress(metric, config.train.iterations)]))
    grid = tuner.fit()
    # A trial that neither reported validation nor failed was stopped by the interruption, whatever its status
    # says: Tune ends the pending trials of an interrupted run as TERMINATED in memory, and a trial that had
    # just started holds Tune's auto-filled metrics (pid, hostname, ...) without any of its own.
    finished = sum(1 for result in grid if result.error is not None or metric in result.metrics)
    if finished < max(len(grid), config.tune.num_samples):
        # Ctrl-C (or SIGINT from a scheduler): Tune saved the experiment's state and returned early
        raise SearchInterrupted(f"the search {name!r} was interrupted with {finished} of "
                                f"{config.tune.num_samples} trials finished; finish it by running the same "
                                f"command again (the same --storage-path and --name {name})")
    rows = results_rows(grid, metric, config.train.iterations)
    if not any(math.isfinite(row[metric]) for row in rows):
        raise RuntimeError(f"no trial of {experiment_dir} reported a validation result; see the trials' "
                           "error.txt files")
    best = rows[0]
    best_config = trial_config(config, best, fusion_rate=best["val_alpha"])
    layered = best_config.to_dict()
    layered["data"]["root"] = data.uri  # the data set the search validated on
    best_config = config_from_dict(layered)
    results_csv = storage.join(experiment_dir, RESULTS_FILE)
    best_yaml = storage.join(experiment_dir, BEST_FILE)
    write_bytes(results_csv, _csv(rows).encode())
    header = (f"# best trial {best['trial']} of the search {name!r}: {metric} {best[metric]:.4f} at "
              f"iteration {best['best_iteration']}, fusion rate α = {best['val_alpha']}\n"
              f"# train it: python jobs/train_mars.py --config {best_yaml}\n")
    write_bytes(best_yaml, (header + yaml.safe_dump(best_config.to_dict(), sort_keys=False)).encode())
    return SearchResult(experiment_dir, rows, best_config, best_yaml, results_csv)


def results_rows(grid, metric: str, iterations: int) -> list[dict[str, Any]]:
    """One row per trial, best first: its λ, m_g, m_l, status, iterations run, and its best validation
    (highest `metric` over all of its reports) with that report's α, mAP and rank-1."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        last = result.metrics or {}
        params = _trial_params(result)
        row = {"trial": last.get("trial_id") or result.path.rsplit("/", 1)[-1],
               **{name: float(params.get(name, math.nan)) for name in SEARCHED}}
        done = int(last.get("iteration", 0))
        row["status"] = "error" if result.error else ("completed" if done >= iterations else "stopped early")
        row["iterations"] = done
        if history is not None and metric in history and history[metric].notna().any():
            top = history.loc[history[metric].idxmax()]
            row.update(best_iteration=int(top["iteration"]), val_alpha=float(top["val_alpha"]),
                       val_mAP=float(top["val_mAP"]), val_rank1=float(top["val_rank1"]))
        else:
            row.update(best_iteration=0, val_alpha=math.nan, val_mAP=math.nan, val_rank1=math.nan)
        rows.append(row)
    return sorted(rows, key=lambda row: -row[metric] if math.isfinite(row[metric]) else math.inf)


def _trial_params(result) -> dict[str, Any]:
    """A trial's searched values: from its reports, or else from the params.json Tune writes as it starts
    (a trial that failed before its first report); empty when it never started."""
    if result.config:
        return result.config
    try:
        with result.filesystem.open_input_stream(f"{result.path}/params.json") as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):
        return {}


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as an aligned text table, best trial first."""
    header = ["trial", *SEARCHED.values(), "status", "iters", "val mAP", "rank-1", "best α"]
    lines = [[row["trial"], *(f"{row[name]:.3f}" for name in SEARCHED), row["status"], str(row["iterations"]),
              f"{row['val_mAP']:.1%}", f"{row['val_rank1']:.1%}", f"{row['val_alpha']:g}"] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *lines, strict=True)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True))
                     for line in [header, *lines])
