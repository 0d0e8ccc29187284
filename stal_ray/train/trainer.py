"""The TorchTrainer of a STAL training run: scaling, storage, checkpoints and failures from the config."""

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import ray.train
from ray.train.torch import TorchTrainer

from stal_ray.config import Config, resolve_keypoint_supervision
from stal_ray.core import storage
from stal_ray.data.prepared.handle import PreparedData, as_prepared
from stal_ray.data.prepared.integrity import check_shards
from stal_ray.data.prepared.validation import ValidationSplit
from stal_ray.data.stream.pipeline import undecodable_frames
from stal_ray.train.loop import train_loop_per_worker
from stal_ray.train.preflight import (  # noqa: F401 - re-exported: the checks were defined here first
    check_data,
    check_resources,
    check_shared_storage,
    preflight,
    run_folder,
    storage_root,
)
from stal_ray.train.reporting import MODEL_FILE, STOPPED, best_model_metric
from stal_ray.train.run_config import CONFIG_FILE, record_config  # noqa: F401 - CONFIG_FILE re-exported
from stal_ray.train.settings import Faults, LoopSettings
from stal_ray.train.supply import report_stream_balance
from stal_ray.train.tensorboard import TensorBoardCallback


class RunStoppedError(RuntimeError):
    """The workers stopped the run without a retry, since a retry would repeat what stopped it."""


class NonFiniteLossError(RunStoppedError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


class NoBatchError(RunStoppedError):
    """An epoch gave no batch: every group had frames that do not decode, or too few identities."""


class WorkersLostError(RunStoppedError):
    """The worker group could not be (re)started within train.worker_wait_s: nodes were lost for good."""


# Ray Train's wait for a worker group's resources, per attempt (its default; the variable overrides it)
START_TIMEOUT_VARIABLE = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_START_TIMEOUT_S = 60.0


@dataclass
class TrainResult:
    run_dir: str  # <storage path>/<name>: checkpoints, model.pt
    model_path: str  # the consolidated model (stal_ray.model.export), for evaluation outside DeepSpeed
    metrics: dict[str, Any]  # the last report's metrics
    checkpoint: ray.train.Checkpoint | None  # the last DeepSpeed checkpoint


def build_trainer(config: Config, data: PreparedData | str, *, name: str,
                  exclude_identities: list[int] | None = None, faults: dict | None = None,
                  callbacks: list | None = None, validation: ValidationSplit | None = None,
                  checksums: bool = True) -> TorchTrainer:
    """A TorchTrainer for `train_loop_per_worker` on the prepared data set `data` (its workers get the
    handle, so they read the version the driver read, never the manifest again). A run with an existing `name`
    under the storage path resumes from that run's latest checkpoint. With a validation split, its
    identities are left out of training and every report carries the validation metrics
    (evaluate.validate: val_mAP, val_rank1, val_alpha and per-α values). checksums=False: the caller has
    checked the training shards (a Tune trial, whose node would otherwise read them all again). faults:
    train.settings.Faults' fields, failures the recovery tests inject."""
    data = as_prepared(data)
    if checksums:
        check_shards(data, ("train",))  # a damaged shard: one line, before work
    if validation is not None:
        exclude_identities = sorted(set(exclude_identities or ()) | set(validation.identities))
    labels, counts = preflight(config, data, exclude_identities=exclude_identities)
    root = storage_root(config)
    # model.pt records the data it was trained on: evaluate_mars.py without --data evaluates that
    config = copy.deepcopy(config)
    config.data.root = data.uri
    config.model.keypoint_supervision, why = resolve_keypoint_supervision(
        config.model, counts.get("frames_with_keypoints", 0))
    print(why, flush=True)
    run_dir = storage.join(root, name)
    # and which data set that is (data/protocol.py): evaluating it on another one is a cross-dataset test
    dataset = data.manifest.dataset
    described = {"uri": data.uri, **{key: dataset.get(key) for key in ("name", "split", "pollution")}}
    settings = LoopSettings(
        config=config, data=data, labels=tuple(labels), run_dir=run_dir, dataset=described,
        exclude_identities=tuple(exclude_identities) if exclude_identities is not None else None,
        faults=Faults(**(faults or {})), validation=validation)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings.to_dict(),  # plain data; the worker reads it as LoopSettings.from_dict
        scaling_config=scaling_config(config),
        run_config=ray.train.RunConfig(
            name=name, storage_path=root,
            checkpoint_config=checkpoint_config(config, validation is not None),
            failure_config=failure_config(config),
            callbacks=[*(callbacks or ()), TensorBoardCallback(run_dir, data.endpoint_url)],
        ),
    )


def scaling_config(config: Config) -> ray.train.ScalingConfig:
    """A fixed group of train.num_workers, or with train.min_workers an elastic one: Ray Train asks for
    num_workers, starts (and after a lost node restarts) with as many as the cluster has, at least
    min_workers, and checks every train.resize_check_s whether more have become free to grow back onto."""
    train = config.train
    workers = (train.min_workers, train.num_workers) if train.min_workers else train.num_workers
    resources = None
    if train.worker_resource:  # Ray's default (1 CPU, or 1 GPU) plus one unit of the named resource
        resources = {"CPU": 1, **({"GPU": 1} if train.use_gpu else {}), train.worker_resource: 1}
    return ray.train.ScalingConfig(num_workers=workers, use_gpu=train.use_gpu, resources_per_worker=resources,
                                   placement_strategy=train.placement_strategy,
                                   elastic_resize_monitor_interval_s=train.resize_check_s)


def failure_config(config: Config) -> ray.train.FailureConfig:
    """Workers that die are replaced train.max_failures times; a group that cannot start (its nodes are gone)
    is tried again for about train.worker_wait_s, in attempts of Ray Train's start timeout, then the run
    fails (Ray Train's own default waits forever)."""
    start_timeout = float(os.environ.get(START_TIMEOUT_VARIABLE, DEFAULT_START_TIMEOUT_S))
    attempts = max(1, math.ceil(config.train.worker_wait_s / start_timeout))
    return ray.train.FailureConfig(max_failures=config.train.max_failures, controller_failure_limit=attempts)


def checkpoint_config(config: Config, validating: bool) -> ray.train.CheckpointConfig:
    """Keep the train.keep_checkpoints best checkpoints by the validation score when a run validates
    (best_model_metric), else the newest ones."""
    if not validating:
        return ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints)
    return ray.train.CheckpointConfig(num_to_keep=config.train.keep_checkpoints,
                                      checkpoint_score_attribute=best_model_metric(config),
                                      checkpoint_score_order="max")


def _no_batch_message(note: dict, data: PreparedData, config: Config) -> str:
    uri = data.uri
    if note.get("skipped_groups"):
        first = note.get("first_skipped") or {}
        frames = ""
        if "identity" in first:  # the stream carries pixels, not names: look the frames up in the shards
            bad = undecodable_frames(data, first["identity"], first.get("tracklets", ()))
            frames = f"; frames that do not decode: {', '.join(bad)}" if bad else ""
        return (f"epoch {note['epoch']} of {uri} gave no batch: all {note['skipped_groups']} clip groups "
                f"had frames that do not decode (first: identity {first.get('identity', '?')}, track-table "
                f"rows {first.get('tracklets', '?')}{frames}); stopped without a retry, which would decode "
                "the same bytes. The frames were damaged before the prepare (its checksums guard the shards, "
                "not the release): check the release's frames, then prepare again with --overwrite")
    return (f"epoch {note['epoch']} of {uri} gave no batch of {config.data.identities_per_batch} distinct "
            "identities: the data set is too small for data.identities_per_batch; lower it")


def train(config: Config, data: PreparedData | str, *, name: str, allow_changed_config: bool = False,
          **kwargs) -> TrainResult:
    """Run (or resume) training; raise NonFiniteLossError when the loss went non-finite, NoBatchError when
    an epoch gave no batch, WorkersLostError when the worker group could not start again within
    train.worker_wait_s (all RunStoppedError: a retry would repeat them). A run `name` that exists resumes
    with the settings of its config.yaml: others raise ChangedConfigError (a ConfigError) naming them, unless
    allow_changed_config, which records the change in its config-changes.yaml (train/run_config.py)."""
    data = as_prepared(data)
    trainer = build_trainer(config, data, name=name, **kwargs)
    run_dir = storage.join(storage_root(config), name)
    # data.root resolved: the settings the run trains with
    record_config(run_dir, trainer.train_loop_config["config"], allow_changed=allow_changed_config,
                  endpoint_url=data.endpoint_url)
    fs, stopped = storage.filesystem(storage.join(run_dir, STOPPED), check=False)
    if fs.exists(stopped):
        fs.rm(stopped)  # from an earlier attempt under this name: this one starts from its last checkpoint
    report_stream_balance(config, data)
    try:
        result = trainer.fit()
    except ray.train.ControllerError as error:
        raise WorkersLostError(workers_lost_message(config, name, run_dir, error)) from None
    if fs.exists(stopped):
        with fs.open(stopped) as note_file:
            note = json.load(note_file)
        where = result.checkpoint.path if result.checkpoint else "none was reported yet"
        if note.get("reason") == "no batch":
            raise NoBatchError(_no_batch_message(note, data, config))
        raise NonFiniteLossError(
            f"the loss became non-finite at epoch {note['epoch']}, iteration {note['iteration']} "
            f"({note['terms']}); training stopped. The last good checkpoint: {where}. Lower train.lr, "
            "set train.grad_clip, or check the data; rerunning with the same --name resumes from it.")
    return TrainResult(run_dir=run_dir, model_path=storage.join(run_dir, MODEL_FILE),
                       metrics=result.metrics or {}, checkpoint=result.checkpoint)


def workers_lost_message(config: Config, name: str, run_dir: str, error: Exception) -> str:
    """What happened when the worker group could not start again, and the two ways on."""
    train = config.train
    cause = getattr(error, "controller_failure", error)
    wanted = (f"{train.min_workers} to {train.num_workers}" if train.min_workers else str(train.num_workers))
    return (f"{run_dir}: the group of {wanted} train workers could not start for about "
            f"{train.worker_wait_s:g} s (train.worker_wait_s): the cluster lacks their resources, as after a "
            f"lost node ({type(cause).__name__}). Its checkpoints stay there: rerun with --name {name} once "
            "the nodes are back to resume from the latest, or with --min-workers M (train.min_workers) to go "
            "on with the workers the cluster has")
