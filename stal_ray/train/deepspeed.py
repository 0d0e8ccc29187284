"""The DeepSpeed engine of a training worker: its config from TrainConfig, the optimiser and schedule of
stal_ray.train.optimizer (the paper's SGD and step decay by default)."""

import logging
from typing import Any

from torch import nn

from stal_ray.train.optimizer import build_optimizer

logger = logging.getLogger(__name__)


def effective_precision(config, *, on_gpu: bool) -> str:
    """The precision that runs: bf16/fp16 need a GPU; on CPU DeepSpeed trains in fp32, with a warning."""
    precision = config.train.precision
    if precision != "fp32" and not on_gpu:
        logger.warning("train.precision = %s needs a GPU; this worker has none and trains in fp32", precision)
        return "fp32"
    return precision


def deepspeed_config(config, *, on_gpu: bool) -> dict[str, Any]:
    """DeepSpeed's config dict: the batch of one worker is one P×K batch of clips, micro-batches accumulated
    `grad_accumulation` times; ZeRO stage, precision and clipping from the config."""
    train, data = config.train, config.data
    clips = data.identities_per_batch * data.clips_per_identity
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": clips,
        "gradient_accumulation_steps": train.grad_accumulation,
        "gradient_clipping": train.grad_clip,
        # elastic_checkpoint: ZeRO 1/2 save their optimiser partitions without the padding of this world
        # size, so a checkpoint loads on another number of workers (train.checkpoints.load_checkpoint)
        "zero_optimization": {"stage": train.zero_stage, **({"elastic_checkpoint": True}
                                                           if train.zero_stage in (1, 2) else {})},
        # ZeRO is tested by DeepSpeed with its own Adam variants; SGD (the paper's optimiser) works with
        # stages 1-2, which only shard the momentum buffers and gradients
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # progress is reported through Ray Train, not DeepSpeed's own prints
        "wall_clock_breakdown": False,
    }
    precision = effective_precision(config, on_gpu=on_gpu)
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling
    return ds


# DeepSpeed's op that its CPU backend builds at every engine's start (deepspeed/comm/torch.py, build_shm_op)
SHARED_MEMORY_OP = "deepspeed_shm_comm"


def skip_shared_memory_kernel() -> None:
    """On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce kernel when it
    starts; only inference_all_reduce uses it (tensor-parallel inference), while training all-reduces through
    torch.distributed (gloo here). The build takes 20-40 s of every core of a 2-core machine, and again for
    every new virtualenv path (the cache under ~/.cache/torch_extensions is keyed by name, not by path), so
    mark the op unbuildable as DeepSpeed marks an op its platform lacks (deepspeed.ops.__compatible_ops__)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHARED_MEMORY_OP] = False


def build_engine(model: nn.Module, config, *, on_gpu: bool):
    """deepspeed.initialize over the model, its optimiser and schedule (build_optimizer) -> (engine,
    scheduler)."""
    import deepspeed  # here: importing it probes the accelerator, which the driver never needs

    if not on_gpu:
        skip_shared_memory_kernel()
    if config.train.sync_batchnorm:
        # statistics over the global batch, not one worker's share of it (torch runs this on GPUs only;
        # the trainer refuses it on CPU before any worker starts)
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer, scheduler = build_optimizer(model, config)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(config, on_gpu=on_gpu), dist_init_required=False)
    return engine, scheduler
