"""What a training worker is given (LoopSettings, built once by the driver) and where it is (LoopState)."""

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from stal_ray.config import Config, config_from_dict
from stal_ray.data.prepared.handle import PreparedData
from stal_ray.data.prepared.validation import ValidationSplit


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


@dataclass(frozen=True)
class Faults:
    """Failures injected on purpose, for the tests of recovery (never set by the jobs)."""

    crash_at_step: int | None = None  # os._exit on this step...
    crash_rank: int = 0  # ...of this worker...
    crash_marker: str | None = None  # ...unless this file exists (it is created first: crash once)
    nan_at_step: int | None = None  # the loss becomes NaN on this step


@dataclass(frozen=True)
class LoopSettings:
    """Everything train_loop_per_worker is given, built once in the driver (train.trainer.build_trainer).

    It crosses to the workers as Ray Train's train_loop_config, a plain dict (to_dict; the worker reads it
    back with from_dict), whose "config" is the resolved Config.to_dict() the driver also writes as
    config.yaml."""

    config: Config  # the run's settings, data.root and model.keypoint_supervision resolved
    data: PreparedData  # the prepared data set trained on, its manifest as the driver read it
    labels: tuple[int, ...]  # the person id of every classifier output
    run_dir: str  # the run folder: model.pt and a stop note (STOPPED) go there
    dataset: Mapping[str, Any] | None = None  # the data set trained on (data/protocol.py), for model.pt
    exclude_identities: tuple[int, ...] | None = None  # person ids left out of training (validation's)
    faults: Faults = field(default_factory=Faults)  # failures injected by the recovery tests
    validation: ValidationSplit | None = None  # with a split, rank 0 validates at every report

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (built-in types only) for Ray Train's train_loop_config."""
        excluded = self.exclude_identities
        return {
            "config": self.config.to_dict(), "data": self.data.to_dict(),
            "dataset": dict(self.dataset) if self.dataset is not None else None, "labels": list(self.labels),
            "run_dir": self.run_dir,
            "exclude_identities": list(excluded) if excluded is not None else None,
            "faults": asdict(self.faults),
            "validation": self.validation.to_json() if self.validation is not None else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoopSettings":
        """Inverse of to_dict: what a worker reads its train_loop_config as."""
        excluded = d.get("exclude_identities")
        return cls(
            config=config_from_dict(d["config"]), data=PreparedData.from_dict(d["data"]),
            labels=tuple(d["labels"]), run_dir=d["run_dir"],
            dataset=d.get("dataset"),
            exclude_identities=tuple(excluded) if excluded is not None else None,
            faults=Faults(**(d.get("faults") or {})),
            validation=ValidationSplit.from_json(d["validation"]) if d.get("validation") else None,
        )
