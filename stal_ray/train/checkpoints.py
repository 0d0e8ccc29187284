"""Resuming from a DeepSpeed checkpoint without running code from it.

DeepSpeed reads every file of a checkpoint with torch.load(weights_only=False): a pickle planted in shared
storage (an S3 bucket) would run on every worker that resumes. `load_checkpoint` hands DeepSpeed a checkpoint
engine that reads with weights_only=True instead, which rebuilds tensors, containers and the few DeepSpeed
classes its state holds (SAFE_GLOBALS) and refuses anything else before it runs.

A ZeRO stage 1/2 checkpoint written by N workers loads on M (a group that shrank after a lost node, or grew
back): DeepSpeed's engine refuses another world size, so the module and schedule load through it and the N
optimiser partitions (saved unpadded: `elastic_checkpoint` in train/deepspeed.py) are merged and cut into M
by DeepSpeed's own ZeRO optimiser, every file read by the same safe engine.
"""

import glob
import os
import pickle
import re
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
        partitions = zero_partition_files(directory, tag)
        # DeepSpeed's own load of the unpadded (elastic) ZeRO partitions fails for SGD even at the same
        # world size (it expects a param-group "step"): those always load through the re-cut below
        elastic = engine.zero_optimization_stage() in (1, 2) and engine.zero_elastic_checkpoint()
        if not partitions or (len(partitions) == engine.dp_world_size and not elastic):
            return engine.load_checkpoint(directory, tag=tag)
        return _load_zero_partitions(engine, directory, tag, partitions)
    except UnsafeCheckpointError as error:
        if not source or os.path.abspath(source) == os.path.abspath(directory):
            raise
        local = os.path.join(os.path.abspath(directory), "")
        raise UnsafeCheckpointError(str(error).replace(local, source.rstrip("/") + "/")) from None
    finally:
        engine.checkpoint_engine = default


def zero_partition_files(directory: str, tag: str) -> list[str]:
    """The ZeRO optimiser partitions of a checkpoint, by the rank that wrote them ([] without ZeRO)."""
    found = {}
    for path in glob.glob(os.path.join(directory, tag, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")):
        found[int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path)).group(1))] = path
    return [found[rank] for rank in sorted(found)]


class _PartitionsByRank(list):
    """The saved partitions as DeepSpeed's ZeRO 1/2 optimiser reads them: it merges all of them (iterating),
    but reads the settings every partition shares (loss scale, clipping) from the entry at its own rank,
    which a grown group's new ranks do not have: for those, the first."""

    def __getitem__(self, index):
        if isinstance(index, int) and index >= len(self):
            index = 0
        return super().__getitem__(index)


def _load_zero_partitions(engine, directory: str, tag: str,
                                partitions: list[str]) -> tuple[str | None, dict[str, Any]]:
    """A ZeRO 1/2 checkpoint of len(partitions) workers on engine.dp_world_size (the same or another): module,
    schedule and client state through DeepSpeed, the optimiser state merged from every partition and re-cut
    for this rank."""
    stage = engine.zero_optimization_stage()
    if stage not in (1, 2) or not engine.zero_elastic_checkpoint():
        raise ValueError(
            f"{os.path.join(directory, tag)}: written by {len(partitions)} workers, loaded by "
            f"{engine.dp_world_size}: only ZeRO stage 1 or 2 with elastic_checkpoint changes world size "
            f"(train.zero_stage = {stage}); resume with train.num_workers = {len(partitions)}")
    load_path, client_state = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=False)
    if load_path is None:
        return load_path, client_state
    saved = _PartitionsByRank(engine.checkpoint_engine.load(path, map_location="cpu")["optimizer_state_dict"]
                              for path in partitions)
    if not all(isinstance(state.get("base_optimizer_state"), list) for state in saved):
        if len(partitions) == engine.dp_world_size:  # an older stal_ray's checkpoint: DeepSpeed loads it
            return engine.load_checkpoint(directory, tag=tag)
        raise ValueError(
            f"{os.path.join(directory, tag)}: written by {len(partitions)} workers without "
            f"elastic_checkpoint (an older stal_ray), so its optimiser state cannot be re-cut for "
            f"{engine.dp_world_size} workers: resume with train.num_workers = {len(partitions)}")
    # DeepSpeed's merge expects a param-group "step", which SGD (unlike Adam variants) never keeps: a missing
    # one is given as None, and the None it then writes into every group is taken out again
    no_step = [state.setdefault("base_optimizer_state_step", None) is None for state in saved]
    engine.optimizer.load_state_dict(state_dict_list=saved, load_optimizer_states=True,
                                     load_from_fp32_weights=engine.zero_load_from_fp32_weights())
    if all(no_step):
        for group in engine.optimizer.optimizer.param_groups:
            group.pop("step", None)
    return load_path, client_state
