"""What a training worker tells: its progress line, the metrics it reports with every checkpoint, model.pt,
and the note it leaves when it stops a run for good."""

import dataclasses
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from stal_ray.core import storage
from stal_ray.core.progress import format_duration
from stal_ray.model.export import save_model
from stal_ray.objective import ObjectiveTerms
from stal_ray.train.settings import LoopSettings, LoopState

ENGINE_TAG = "engine"  # DeepSpeed's checkpoint tag: one engine state per reported checkpoint directory
STOPPED = "stopped.json"  # written into the run folder when a non-finite loss stops the run
MODEL_FILE = "model.pt"
LOSS_TERMS = tuple(term.name for term in dataclasses.fields(ObjectiveTerms))  # each reported as loss_<name>


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


def best_model_metric(config) -> str:
    """The validation metric model.pt and the kept checkpoints are chosen by (tune.metric's val_ key)."""
    return f"val_{config.tune.metric}"


def all_workers(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every worker (one small all-reduce; trivially local with one worker)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def sum_over_workers(values: list[float], device: torch.device) -> list[float]:
    """`values` summed element-wise over the workers (one all-reduce; as they are with one worker)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def progress_line(state: LoopState, iterations: int, meter: Meter, scheduler) -> str:
    """The line rank 0 prints every train.log_every iterations: share done, lr, the window's mean losses,
    clips per second, data-wait share, and the ETA at the window's rate."""
    steps = max(meter.steps, 1)
    losses = " ".join(f"{name}={meter.losses[name] / steps:.3f}" for name in LOSS_TERMS if name != "keypoint")
    rate = meter.clips / max(meter.step_time, 1e-9)
    wait = meter.data_wait / max(meter.step_time, 1e-9)
    left = (iterations - state.step) * meter.step_time / steps  # at the rate since the last line
    share = state.step / max(iterations, 1)
    return (f"iteration {state.step}/{iterations} ({share:.0%}) epoch {state.epoch} "
            f"lr={scheduler.get_last_lr()[0]:.2e} {losses} clips/s={rate:.1f} data_wait={wait:.0%} "
            f"ETA {format_duration(left)}")


def report(engine, state: LoopState, meter: Meter, scheduler, batches, device, last_metrics: dict[str, Any],
           validator=None, settings: LoopSettings | None = None) -> dict[str, Any]:
    """Metrics of the steps since the last report, averaged over workers, with the engine's checkpoint;
    with no step since then (an epoch ending right after a report), the last metrics again. With a
    validator (rank 0 of a run with a validation split), the validation metrics of the model as it is, and
    model.pt saved whenever they are the best so far (state.best_score)."""
    steps = max(meter.steps, 1)
    names = list(LOSS_TERMS)
    totals = sum_over_workers(
        [meter.losses[n] / steps for n in names] + [meter.data_wait, meter.step_time,
         float(batches.corrupt_frames), float(batches.skipped_groups), meter.run_data_wait,
         meter.run_step_time], device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    data_wait, step_time, corrupt, skipped, run_data_wait, run_step_time = totals[len(names):]
    metrics = {f"loss_{name}": value / world for name, value in zip(names, totals[:len(names)], strict=True)}
    if meter.steps == 0 and last_metrics:
        metrics = {key: value for key, value in last_metrics.items() if key.startswith(("loss_", "val_"))}
    elif validator is not None:
        metrics.update(validator(engine.module))
        keep_if_best(engine.module, state, metrics, settings)
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


def keep_if_best(model, state: LoopState, metrics: dict[str, Any], settings: LoopSettings) -> None:
    """Save model.pt when this report's validation score beats every earlier one (state remembers it, and
    the checkpoint saved next carries it into a resumed run)."""
    key = best_model_metric(settings.config)
    score = float(metrics[key])
    if state.best_score is None or score > state.best_score:
        state.best_score, state.best_step = score, state.step
        save_run_model(settings, model, state.step, selected_by=f"best {key}", score=score)
    metrics.update(best_iteration=state.best_step, best_score=state.best_score)


def save_run_model(settings: LoopSettings, model, step: int, selected_by: str, score: float | None = None):
    """model.pt in the run folder, saying which iteration it is and why it was chosen."""
    extra = {"iteration": step, "selected_by": selected_by}
    if settings.dataset:  # the data set trained on (data/protocol.py), for cross-dataset reports
        extra["data"] = settings.dataset
    if score is not None:
        extra["score"] = score
    save_model(storage.join(settings.run_dir, MODEL_FILE), model, settings.config,
               num_classes=len(settings.labels), labels=list(settings.labels), extra=extra)


def stop_non_finite(settings: LoopSettings, state: LoopState, terms: ObjectiveTerms, rank: int) -> None:
    """Leave the last good checkpoint as it is and say where the loss went non-finite (no retry: it would
    only repeat from the same checkpoint)."""
    if rank != 0:
        return
    values = {name: value for name, value in terms.as_floats().items()}
    bad = ", ".join(f"{n}={v}" for n, v in values.items() if not math.isfinite(v)) or "after a worker's NaN"
    write_stop_note(settings, rank, {
        "reason": "non-finite loss", "epoch": state.epoch, "iteration": state.step + 1,
        "batch_in_epoch": state.batches_into_epoch + 1, "terms": bad})


def write_stop_note(settings: LoopSettings, rank: int, note: dict) -> None:
    """STOPPED in the run folder (rank 0): why the run stopped without a retry, for the driver to say."""
    if rank != 0:
        return
    fs, path = storage.filesystem(storage.join(settings.run_dir, STOPPED), check=False)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as out:
        out.write(json.dumps(note) + "\n")
