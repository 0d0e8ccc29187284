"""Resuming from a DeepSpeed checkpoint without running code from it.

DeepSpeed reads every file of a checkpoint with torch.load(weights_only=False): a pickle planted in shared
storage (an S3 bucket) would run on every worker that resumes. `load_checkpoint` hands DeepSpeed a checkpoint
engine that reads with weights_only=True instead, which rebuilds tensors, containers and the few DeepSpeed
classes its state holds (SAFE_GLOBALS) and refuses anything else before it runs.
"""

import os
import pickle
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that holds more than tensors and plain state: it was not written by this project."""


def _safe_globals() -> list:
    """The classes DeepSpeed legitimately pickles into a checkpoint besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler, DynamicLossScaler,  # the fp16 optimisers' loss scaler (state_dict()["loss_scaler"])
        ZeroStageEnum,  # ZeRO optimisers' "zero_stage"
        fragment_address,  # bf16 / ZeRO optimisers' "param_slice_mappings"
    ]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """TorchCheckpointEngine whose load never unpickles code: weights_only=True, SAFE_GLOBALS allowed."""

    def load(self, path: str, map_location=None) -> Any:
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: it holds more than tensors and training state ({_reason(error)}). "
                "stal_ray's training loop did not write this file, or it was changed since: delete this "
                "checkpoint folder to resume from the one before it, or the run's folder to start again"
            ) from None


def _reason(error: Exception) -> str:
    """The one paragraph of torch's weights_only message that says what was refused."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    paragraphs = [p.strip() for p in str(error).split("\n\n") if p.strip()]
    return next((p for p in paragraphs if not p.startswith(boilerplate)), type(error).__name__)


def load_checkpoint(engine, directory: str, tag: str,
                    source: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """engine.load_checkpoint(directory, tag=tag) with every file read by SafeCheckpointEngine ->
    (load path, client state). A refused file raises UnsafeCheckpointError naming it, under `source` (where
    the checkpoint is stored, e.g. an s3:// folder) when `directory` is a local copy of it."""
    default = engine.checkpoint_engine
    engine.checkpoint_engine = SafeCheckpointEngine()
    try:
        return engine.load_checkpoint(directory, tag=tag)
    except UnsafeCheckpointError as error:
        if not source or os.path.abspath(source) == os.path.abspath(directory):
            raise
        local = os.path.join(os.path.abspath(directory), "")
        raise UnsafeCheckpointError(str(error).replace(local, source.rstrip("/") + "/")) from None
    finally:
        engine.checkpoint_engine = default
