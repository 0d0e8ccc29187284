"""train_loop_per_worker: one Ray Train worker optimising the STAL objective (Eq. 3) under DeepSpeed.

Each epoch, rank 0 builds that epoch's Ray Data training stream (frames sampled anew per epoch) and hands
every worker its streaming_split shard. Workers step in lockstep: an epoch ends for all of them when one
runs out of batches, and a non-finite loss on any of them stops all of them. A checkpoint (the DeepSpeed
engine's, with the loop state) is reported every `train.checkpoint_every` iterations and at every epoch's
end; a restarted or recovered run resumes from the latest one.

The worker's parts: start_worker (engine, state, resume), train_epoch, train_step, end_iteration (progress
line, checkpoint), end_epoch; what it reports and saves is in train.reporting, what it is given in
train.settings.
"""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from stal_ray.config_schema import stream_seed
from stal_ray.core import storage
from stal_ray.data.stream.batches import training_batches
from stal_ray.data.stream.consumer import ConsumerDecoder
from stal_ray.data.stream.pipeline import training_dataset, validation_dataset
from stal_ray.evaluate.validate import validate
from stal_ray.model.stal import STAL
from stal_ray.objective import STALObjective
from stal_ray.train.checkpoints import load_checkpoint
from stal_ray.train.deepspeed import build_engine
from stal_ray.train.elastic import batches_done_at, resize_line, scale_learning_rate
from stal_ray.train.reporting import (
    ENGINE_TAG,
    Meter,
    all_workers,
    progress_line,
    report,
    save_run_model,
    stop_non_finite,
    sum_over_workers,
    write_stop_note,
)
from stal_ray.train.settings import Faults, LoopSettings, LoopState


@dataclass
class Worker:
    """One worker's training: what it was given, its engine, where it is, and what it reports next."""

    settings: LoopSettings
    rank: int
    world: int
    device: torch.device
    engine: Any  # the DeepSpeed engine; engine.module is the STAL model
    scheduler: Any  # the learning-rate scheduler, scaled to the group's size
    objective: STALObjective
    dtype: torch.dtype  # the model's parameters' (bf16/fp16 under mixed precision)
    state: LoopState
    validator: Callable[[Any], dict[str, float]] | None  # rank 0 of a run with a validation split
    meter: Meter = field(default_factory=Meter)  # sums since the last report
    last_metrics: dict[str, Any] = field(default_factory=dict)  # the last report's

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


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
    """Ray Train's entry point. loop_config: LoopSettings.to_dict() (train.trainer builds it); training runs
    epoch after epoch until train.iterations, or until a stop (non-finite loss, an epoch with no batch)."""
    settings = LoopSettings.from_dict(loop_config)
    # the loop prints its own progress line every train.log_every iterations; Ray Data's per-epoch bars from
    # inside a worker only reach the job's log as thousands of lines of terminal escapes
    ray.data.DataContext.get_current().enable_progress_bars = False
    worker = start_worker(settings)
    while worker.state.step < settings.config.train.iterations:
        if not train_epoch(worker):
            return
    if worker.rank == 0 and worker.validator is None:  # a validated run saved its best model at that report
        save_run_model(settings, worker.engine.module, worker.state.step, selected_by="last iteration")


def start_worker(settings: LoopSettings) -> Worker:
    """This worker's model, objective and DeepSpeed engine, seeded alike on every worker, and its state:
    the latest checkpoint's when there is one (resumed_state)."""
    config = settings.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    seed_everything(config)
    model = STAL.from_config(config, num_classes=len(settings.labels)).to(device)
    objective = STALObjective.from_config(config)
    engine, scheduler = build_engine(model, config, on_gpu=device.type == "cuda")
    dtype = next(engine.module.parameters()).dtype
    state = resumed_state(engine, scheduler, config, rank, world)
    return Worker(settings=settings, rank=rank, world=world, device=device, engine=engine,
                  scheduler=scheduler, objective=objective, dtype=dtype, state=state,
                  validator=validator(settings) if rank == 0 else None)


def resumed_state(engine, scheduler, config, rank: int, world: int) -> LoopState:
    """The loop state of Ray Train's latest checkpoint, loaded into the engine (a fresh state without one),
    the learning rate scaled to `world` workers; after a resize, the batches done in the epoch are counted
    in the new group's batches."""
    unscaled_lrs = list(scheduler.base_lrs)
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
    return state


def train_epoch(worker: Worker) -> bool:
    """Epoch state.epoch from its state.batches_into_epoch-th batch on, until train.iterations or until a
    worker runs out of batches (end_epoch). False: the run stopped (a non-finite loss, no batch at all)."""
    config, state = worker.settings.config, worker.state
    shard = epoch_shard(worker.settings, state.epoch, worker.rank, worker.world)
    # on a GPU the batch crosses as uint8 and is normalised there: a quarter of the bytes, and none of the
    # consumer's CPU, which normalising costs about as much of as decoding did (bench/data.py)
    # data.decode_at = consumer: the shard carries JPEG bytes, decoded and augmented here, on the GPU when
    # nvJPEG is there (data.consumer)
    decoder = ConsumerDecoder.from_config(config, state.epoch, worker.device) \
        if config.data.decode_at == "consumer" else None
    batches = training_batches(shard, config.data.identities_per_batch,
                               preprocess=worker.engine.module.preprocess,
                               seed=stream_seed(config) + state.epoch, normalize=not worker.on_gpu,
                               decoder=decoder)
    stream = iter(batches)
    for _ in range(state.batches_into_epoch):  # resuming mid-epoch: the batches already trained on
        next(stream, None)
    trained_this_epoch = 0
    while worker.state.step < config.train.iterations:
        start = time.perf_counter()
        batch = next(stream, None)
        data_wait = time.perf_counter() - start
        if not all_workers(batch is not None, worker.device):
            return end_epoch(worker, batches, trained_this_epoch)
        if not train_step(worker, batch, batches, start, data_wait):
            return False
        trained_this_epoch += 1
    return True


def train_step(worker: Worker, batch: dict, batches, start: float, data_wait: float) -> bool:
    """Forward, backward and DeepSpeed step on one batch (started at `start`, `data_wait` of it waiting for
    the batch); at a gradient-accumulation boundary, one iteration more (end_iteration). False: the loss
    was not finite on some worker, and the run stopped without touching the engine."""
    state, device, dtype = worker.state, worker.device, worker.dtype
    clips = model_input(batch["clips"], batches, device, dtype)
    targets = batch["labels"].to(device)
    keypoints = batch["keypoints"].to(device, dtype=dtype) if batch["keypoints"] is not None else None
    terms = worker.objective(worker.engine(clips, keypoints), targets, keypoints)
    loss = terms.total
    if worker.settings.faults.nan_at_step == state.step + 1:
        loss = loss * float("nan")
    if not all_workers(bool(torch.isfinite(loss)), device):
        stop_non_finite(worker.settings, state, terms, worker.rank)
        return False
    boundary = worker.engine.is_gradient_accumulation_boundary()  # before step(), which advances it
    worker.engine.backward(loss)
    worker.engine.step()
    state.batches_into_epoch += 1
    state.clips_seen += len(clips) * worker.world
    worker.meter.add(terms.as_floats(), len(clips) * worker.world, data_wait, time.perf_counter() - start)
    if boundary:
        end_iteration(worker, batches)
    return True


def end_iteration(worker: Worker, batches) -> None:
    """One optimiser step more: an injected crash if one is due, rank 0's progress line every
    train.log_every iterations, a report with a checkpoint every train.checkpoint_every and at the last."""
    train, state = worker.settings.config.train, worker.state
    state.step += 1
    maybe_crash(worker.settings.faults, state.step, worker.rank)
    if worker.rank == 0 and state.step % train.log_every == 0:
        print(progress_line(state, train.iterations, worker.meter, worker.scheduler), flush=True)
    if state.step % train.checkpoint_every == 0 or state.step == train.iterations:
        report_window(worker, batches)


def end_epoch(worker: Worker, batches, trained_this_epoch: int) -> bool:
    """The epoch ran out of batches: report with a checkpoint at the next epoch's start, so that a resumed
    run starts the next epoch, not this one again. An epoch that gave no batch at all stops the run (False)
    with a note for the driver: the same data gives no batch on every retry."""
    state = worker.state
    if trained_this_epoch == 0 and state.batches_into_epoch == 0:
        skipped = int(sum_over_workers([float(batches.skipped_groups)], worker.device)[0])
        write_stop_note(worker.settings, worker.rank, {
            "reason": "no batch", "epoch": state.epoch, "skipped_groups": skipped,
            "first_skipped": batches.first_skipped})
        return False
    worker.state = replace(state, epoch=state.epoch + 1, batches_into_epoch=0)
    report_window(worker, batches)
    return True


def report_window(worker: Worker, batches) -> None:
    """Report the steps since the last report with a checkpoint (train.reporting.report), then start the
    next window."""
    worker.last_metrics = report(worker.engine, worker.state, worker.meter, worker.scheduler, batches,
                                 worker.device, worker.last_metrics, worker.validator, worker.settings)
    worker.meter = worker.meter.next_window()


def model_input(clips: torch.Tensor, batches, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A batch's clips as the model takes them, on `device` in `dtype`: float clips (normalised by
    `batches`) as they are; uint8 ones (normalize=False) moved first, then normalised on the device."""
    if clips.dtype == torch.uint8:
        clips = batches.normalized(clips.to(device, non_blocking=True))
    return clips.to(device, dtype=dtype, non_blocking=True).contiguous()


def epoch_shard(settings: LoopSettings, epoch: int, rank: int, world: int):
    """This worker's share of epoch `epoch`'s training stream: rank 0 builds it and splits it."""
    config = settings.config
    if config.train.deterministic:
        # block order kept through the decoding tasks: the same batches in the same order on every run
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    splits = [None]
    if rank == 0:
        excluded = settings.exclude_identities
        # the driver's handle: the manifest is not read again, and every epoch reads the run's version
        dataset = training_dataset(settings.data, config, epoch=epoch,
                                   labels=list(settings.labels),
                                   **({"exclude_identities": list(excluded)} if excluded else {}))
        splits = [dataset] if world == 1 else [dataset.streaming_split(world, equal=True)]
    if world == 1:
        return splits[0]
    dist.broadcast_object_list(splits, src=0)  # DataIterators pickle as handles to one split coordinator
    return splits[0][rank]


def validator(settings: LoopSettings) -> Callable[[Any], dict[str, float]] | None:
    """model -> validation metrics (evaluate.validate) on settings.validation, or None without a split."""
    if settings.validation is None:
        return None
    config, split = settings.config, settings.validation

    def run(model) -> dict[str, float]:
        dataset = validation_dataset(settings.data, config, split)
        return validate(model, dataset, config.tune.fusion_rates, protocol=config.eval.protocol,
                        batch_size=config.eval.batch_size, part_norm=config.model.part_norm)

    return run


def maybe_crash(faults: Faults, step: int, rank: int) -> None:
    """The crash the recovery tests inject (Faults): os._exit on faults.crash_at_step of faults.crash_rank."""
    if faults.crash_at_step != step or faults.crash_rank != rank:
        return
    if faults.crash_marker is not None:
        fs, path = storage.filesystem(faults.crash_marker, check=False)
        if fs.exists(path):
            return
        fs.touch(path)
    os._exit(1)
