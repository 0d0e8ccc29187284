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
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UnsafeCheckpointError(
                f"{path}: refused to load this checkpoint file: it holds objects other than tensors and "
                f"training state ({reason}). It was not written by stal_ray's training loop (or was altered "
                "afterwards); delete this checkpoint folder, or the run, to start from an earlier "
                "checkpoint or from scratch") from None


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
