"""train_loop_per_worker: one Ray Train worker optimising the STAL objective (Eq. 3) under DeepSpeed.

Each epoch, rank 0 builds that epoch's Ray Data training stream (frames sampled anew per epoch) and hands
every worker its streaming_split shard. Workers step in lockstep: an epoch ends for all of them when one
runs out of batches, and a non-finite loss on any of them stops all of them. A checkpoint (the DeepSpeed
engine's, with the loop state) is reported every `train.checkpoint_every` iterations and at every epoch's
end; a restarted or recovered run resumes from the latest one.
"""

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from stal_ray.config import config_from_dict
from stal_ray.core import storage
from stal_ray.core.progress import format_duration
from stal_ray.data.prepared.validation import ValidationSplit
from stal_ray.data.stream.batches import training_batches
from stal_ray.data.stream.pipeline import training_dataset, validation_dataset
from stal_ray.evaluate.validate import validate
from stal_ray.model.export import save_model
from stal_ray.model.stal import STAL
from stal_ray.objective import STALObjective
from stal_ray.train.checkpoints import load_checkpoint
from stal_ray.train.deepspeed import build_engine
from stal_ray.train.elastic import batches_done_at, resize_line, scale_learning_rate

logger = logging.getLogger(__name__)

ENGINE_TAG = "engine"  # DeepSpeed's checkpoint tag: one engine state per reported checkpoint directory
STOPPED = "stopped.json"  # written into the run folder when a non-finite loss stops the run
MODEL_FILE = "model.pt"
LOSS_TERMS = ("triplet_global", "triplet_local", "softmax", "consistency", "keypoint", "total")


@dataclass
class LoopState:
    """Where training is: saved with every checkpoint, so a resumed run continues from here."""

    step: int = 0  # optimiser steps taken (the paper's iterations)
    epoch: int = 0  # current epoch; it also seeds that epoch's frame sampling
    batches_into_epoch: int = 0  # batches of `epoch` already trained on (skipped when resuming mid-epoch)
    best_score: float | None = None  # the best validation score so far (best_model_metric), when validating
    best_step: int = 0  # the iteration model.pt was saved at for it
    world: int = 0  # workers in the group that trained up to here (0: not recorded, before elastic training)
    clips_seen: int = 0  # clips trained on by all workers together


@dataclass
class Meter:
    """Sums over the steps since the last report: loss terms, clips, time waiting for data, step time."""

    steps: int = 0
    clips: int = 0
    data_wait: float = 0.0
    step_time: float = 0.0
    losses: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_TERMS, 0.0))
    # since this worker started, carried into every next window: the data-wait share of the whole run, epoch
    # starts included (a window's share depends on whether an epoch started in it)
    run_data_wait: float = 0.0
    run_step_time: float = 0.0

    def add(self, terms: dict[str, float], clips: int, data_wait: float, step_time: float) -> None:
        self.steps += 1
        self.clips += clips
        self.data_wait += data_wait
        self.step_time += step_time
        self.run_data_wait += data_wait
        self.run_step_time += step_time
        for name in LOSS_TERMS:
            self.losses[name] += terms[name]

    def next_window(self) -> "Meter":
        """Empty sums for the steps until the next report, the run's totals kept."""
        return Meter(run_data_wait=self.run_data_wait, run_step_time=self.run_step_time)


@dataclass
class Faults:
    """Failures injected on purpose, for the tests of recovery (never set by the jobs)."""

    crash_at_step: int | None = None  # os._exit on this step...
    crash_rank: int = 0  # ...of this worker...
    crash_marker: str | None = None  # ...unless this file exists (it is created first: crash once)
    nan_at_step: int | None = None  # the loss becomes NaN on this step


def best_model_metric(config) -> str:
    """The validation metric model.pt and the kept checkpoints are chosen by (tune.metric's val_ key)."""
    return f"val_{config.tune.metric}"


def seed_everything(config) -> None:
    """The same start on every worker (DeepSpeed broadcasts rank 0's weights too); with
    train.deterministic, Ray Train's reproducibility switch as well (seeds, deterministic kernels, no cuDNN
    autotuning), so GPU runs repeat. Kernels without a deterministic version (grid_sample's backward on
    CUDA) warn instead of failing."""
    if config.train.deterministic:
        ray.train.torch.enable_reproducibility(seed=config.train.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.train.seed)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """loop_config: config (Config.to_dict()), data (shards URI), labels (person id of every classifier
    output), run_dir (where model.pt and a stop note go), endpoint_url, exclude_identities, faults, and
    validation (a ValidationSplit's JSON, or None): rank 0 then validates at every report."""
    config = config_from_dict(loop_config["config"])
    # the loop prints its own progress line every train.log_every iterations; Ray Data's per-epoch bars from
    # inside a worker only reach the job's log as thousands of lines of terminal escapes
    ray.data.DataContext.get_current().enable_progress_bars = False
    labels: list[int] = loop_config["labels"]
    faults = Faults(**loop_config.get("faults") or {})
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"

    seed_everything(config)
    model = STAL.from_config(config, num_classes=len(labels)).to(device)
    objective = STALObjective.from_config(config)
    engine, scheduler = build_engine(model, config, on_gpu=on_gpu)
    unscaled_lrs = list(scheduler.base_lrs)
    dtype = next(engine.module.parameters()).dtype

    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            _, client_state = load_checkpoint(engine, directory, tag=ENGINE_TAG, source=checkpoint.path)
        state = LoopState(**client_state["loop_state"])
        if rank == 0:
            print(f"resuming at iteration {state.step}, epoch {state.epoch}, "
                  f"batch {state.batches_into_epoch}", flush=True)
    factor = scale_learning_rate(scheduler, unscaled_lrs, world, config.train.num_workers)
    if state.world and state.world != world:
        if rank == 0:
            lr = scheduler.optimizer.param_groups[0]["lr"]
            print(resize_line(state.world, world, state.step, factor, lr), flush=True)
        state.batches_into_epoch = batches_done_at(state.batches_into_epoch, state.world, world)
    state.world = world

    iterations = config.train.iterations
    meter, last_metrics = Meter(), {}
    validator = _validator(loop_config, config) if rank == 0 else None
    while state.step < iterations:
        shard = _epoch_shard(loop_config, config, state.epoch, rank, world)
        # on a GPU the batch crosses as uint8 and is normalised there: a quarter of the bytes, and none of the
        # consumer's CPU, which normalising costs about as much of as decoding did (bench/data.py)
        batches = training_batches(shard, config.data.identities_per_batch,
                                   preprocess=engine.module.preprocess, seed=config.train.seed + state.epoch,
                                   normalize=not on_gpu)
        stream = iter(batches)
        for _ in range(state.batches_into_epoch):  # resuming mid-epoch: the batches already trained on
            next(stream, None)
        trained_this_epoch, exhausted = 0, False
        while state.step < iterations:
            start = time.perf_counter()
            batch = next(stream, None)
            data_wait = time.perf_counter() - start
            if not _all(batch is not None, device):
                exhausted = True
                break
            clips = model_input(batch["clips"], batches, device, dtype)
            targets = batch["labels"].to(device)
            keypoints = batch["keypoints"].to(device, dtype=dtype) if batch["keypoints"] is not None else None
            terms = objective(engine(clips, keypoints), targets, keypoints)
            loss = terms.total
            if faults.nan_at_step == state.step + 1:
                loss = loss * float("nan")
            if not _all(bool(torch.isfinite(loss)), device):
                _stop_non_finite(loop_config, state, terms, rank)
                return
            boundary = engine.is_gradient_accumulation_boundary()  # before step(), which advances it
            engine.backward(loss)
            engine.step()
            state.batches_into_epoch += 1
            state.clips_seen += len(clips) * world
            trained_this_epoch += 1
            meter.add(terms.as_floats(), len(clips) * world, data_wait, time.perf_counter() - start)
            if not boundary:
                continue
            state.step += 1
            _maybe_crash(faults, state.step, rank)
            if rank == 0 and state.step % config.train.log_every == 0:
                print(_progress_line(state, iterations, meter, scheduler), flush=True)
            if state.step % config.train.checkpoint_every == 0 or state.step == iterations:
                last_metrics = _report(engine, state, meter, scheduler, batches, device, last_metrics,
                                       validator, loop_config)
                meter = meter.next_window()
        if exhausted:
            if trained_this_epoch == 0 and state.batches_into_epoch == 0:
                # the same data gives no batch on every retry: stop once, the driver says why
                skipped = int(_sum([float(batches.skipped_groups)], device)[0])
                _write_stop_note(loop_config, rank, {
                    "reason": "no batch", "epoch": state.epoch, "skipped_groups": skipped,
                    "first_skipped": batches.first_skipped})
                return
            # the epoch's end is a checkpoint too: a resumed run starts the next epoch, not this one again
            state = replace(state, epoch=state.epoch + 1, batches_into_epoch=0)
            last_metrics = _report(engine, state, meter, scheduler, batches, device, last_metrics, validator,
                                   loop_config)
            meter = meter.next_window()

    if rank == 0 and validator is None:  # a validated run saved its best model at that report
        _save_model(loop_config, engine.module, state.step, selected_by="last iteration")


def model_input(clips: torch.Tensor, batches, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch's clips as the model takes them, on `device` in `dtype`: float clips (normalised by
    `batches`) as they are; uint8 ones (normalize=False) moved first, then normalised on the device."""
    if clips.dtype == torch.uint8:
        clips = batches.normalized(clips.to(device, non_blocking=True))
    return clips.to(device, dtype=dtype, non_blocking=True).contiguous()


def _save_model(loop_config: dict[str, Any], model, step: int, selected_by: str, score: float | None = None):
    """model.pt in the run folder, saying which iteration it is and why it was chosen."""
    config = config_from_dict(loop_config["config"])
    labels = loop_config["labels"]
    extra = {"iteration": step, "selected_by": selected_by}
    if loop_config.get("dataset"):  # the data set trained on (data/protocol.py), for cross-dataset reports
        extra["data"] = loop_config["dataset"]
    if score is not None:
        extra["score"] = score
    save_model(storage.join(loop_config["run_dir"], MODEL_FILE), model, config, num_classes=len(labels),
               labels=labels, extra=extra)


def _epoch_shard(loop_config: dict[str, Any], config, epoch: int, rank: int, world: int):
    """This worker's share of epoch `epoch`'s training stream: rank 0 builds it and splits it."""
    if config.train.deterministic:
        # block order kept through the decoding tasks: the same batches in the same order on every run
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    splits = [None]
    if rank == 0:
        dataset = training_dataset(loop_config["data"], config, epoch=epoch,
                                   endpoint_url=loop_config.get("endpoint_url"), labels=loop_config["labels"],
                                   **_exclusion(loop_config))
        splits = [dataset] if world == 1 else [dataset.streaming_split(world, equal=True)]
    if world == 1:
        return splits[0]
    dist.broadcast_object_list(splits, src=0)  # DataIterators pickle as handles to one split coordinator
    return splits[0][rank]


def _exclusion(loop_config: dict[str, Any]) -> dict[str, Any]:
    excluded = loop_config.get("exclude_identities")
    return {"exclude_identities": excluded} if excluded else {}


def _all(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every worker (one small all-reduce; trivially local with one worker)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _validator(loop_config: dict[str, Any], config):
    """model -> validation metrics (evaluate.validate) on the split in loop_config, or None without one."""
    if not loop_config.get("validation"):
        return None
    split = ValidationSplit.from_json(loop_config["validation"])

    def run(model) -> dict[str, float]:
        dataset = validation_dataset(loop_config["data"], config, split,
                                     endpoint_url=loop_config.get("endpoint_url"))
        return validate(model, dataset, config.tune.fusion_rates, protocol=config.eval.protocol,
                        batch_size=config.eval.batch_size, part_norm=config.model.part_norm)

    return run


def _report(engine, state: LoopState, meter: Meter, scheduler, batches, device,
            last_metrics: dict[str, Any], validator=None, loop_config: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """Metrics of the steps since the last report, averaged over workers, with the engine's checkpoint;
    with no step since then (an epoch ending right after a report), the last metrics again. With a
    validator (rank 0 of a run with a validation split), the validation metrics of the model as it is, and
    model.pt saved whenever they are the best so far (state.best_score)."""
    steps = max(meter.steps, 1)
    names = list(LOSS_TERMS)
    totals = _sum([meter.losses[n] / steps for n in names] + [meter.data_wait, meter.step_time,
                  float(batches.corrupt_frames), float(batches.skipped_groups), meter.run_data_wait,
                  meter.run_step_time], device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    data_wait, step_time, corrupt, skipped, run_data_wait, run_step_time = totals[len(names):]
    metrics = {f"loss_{name}": value / world for name, value in zip(names, totals[:len(names)], strict=True)}
    if meter.steps == 0 and last_metrics:
        metrics = {key: value for key, value in last_metrics.items() if key.startswith(("loss_", "val_"))}
    elif validator is not None:
        metrics.update(validator(engine.module))
        _keep_if_best(engine.module, state, metrics, loop_config)
    metrics.update(
        iteration=state.step, epoch=state.epoch, lr=scheduler.get_last_lr()[0], workers=world,
        clips_seen=state.clips_seen,
        clips_per_s=meter.clips / max(meter.step_time, 1e-9),
        data_wait_share=data_wait / max(step_time, 1e-9),
        data_wait_share_run=run_data_wait / max(run_step_time, 1e-9),
        corrupt_frames=int(corrupt), skipped_groups=int(skipped),
    )
    with tempfile.TemporaryDirectory() as directory:
        engine.save_checkpoint(directory, tag=ENGINE_TAG, client_state={"loop_state": asdict(state)})
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_{state.step:08d}_{state.epoch:04d}")
    return metrics


def _keep_if_best(model, state: LoopState, metrics: dict[str, Any], loop_config: dict[str, Any]) -> None:
    """Save model.pt when this report's validation score beats every earlier one (state remembers it, and
    the checkpoint saved next carries it into a resumed run)."""
    key = best_model_metric(config_from_dict(loop_config["config"]))
    score = float(metrics[key])
    if state.best_score is None or score > state.best_score:
        state.best_score, state.best_step = score, state.step
        _save_model(loop_config, model, state.step, selected_by=f"best {key}", score=score)
    metrics.update(best_iteration=state.best_step, best_score=state.best_score)


def _progress_line(state: LoopState, iterations: int, meter: Meter, scheduler) -> str:
    steps = max(meter.steps, 1)
    losses = " ".join(f"{name}={meter.losses[name] / steps:.3f}" for name in LOSS_TERMS if name != "keypoint")
    rate = meter.clips / max(meter.step_time, 1e-9)
    wait = meter.data_wait / max(meter.step_time, 1e-9)
    left = (iterations - state.step) * meter.step_time / steps  # at the rate since the last line
    share = state.step / max(iterations, 1)
    return (f"iteration {state.step}/{iterations} ({share:.0%}) epoch {state.epoch} "
            f"lr={scheduler.get_last_lr()[0]:.2e} {losses} clips/s={rate:.1f} data_wait={wait:.0%} "
            f"ETA {format_duration(left)}")


def _stop_non_finite(loop_config: dict[str, Any], state: LoopState, terms, rank: int) -> None:
    """Leave the last good checkpoint as it is and say where the loss went non-finite (no retry: it would
    only repeat from the same checkpoint)."""
    if rank != 0:
        return
    values = {name: value for name, value in terms.as_floats().items()}
    bad = ", ".join(f"{n}={v}" for n, v in values.items() if not math.isfinite(v)) or "after a worker's NaN"
    _write_stop_note(loop_config, rank, {
        "reason": "non-finite loss", "epoch": state.epoch, "iteration": state.step + 1,
        "batch_in_epoch": state.batches_into_epoch + 1, "terms": bad})


def _write_stop_note(loop_config: dict[str, Any], rank: int, note: dict) -> None:
    """STOPPED in the run folder (rank 0): why the run stopped without a retry, for the driver to say."""
    if rank != 0:
        return
    fs, path = storage.filesystem(storage.join(loop_config["run_dir"], STOPPED), check=False)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as out:
        out.write(json.dumps(note) + "\n")


def _maybe_crash(faults: Faults, step: int, rank: int) -> None:
    if faults.crash_at_step != step or faults.crash_rank != rank:
        return
    if faults.crash_marker is not None:
        fs, path = storage.filesystem(faults.crash_marker, check=False)
        if fs.exists(path):
            return
        fs.touch(path)
    os._exit(1)

