"""What a batch means when the worker group changes size (elastic training, train.min_workers).

Every worker trains on P×K clips per step, so the global batch is world × P×K: it follows the workers. The
learning rate follows the global batch (the linear scaling rule of Goyal et al., "Accurate, large minibatch
SGD", 2017): train.lr is the rate of the full group of train.num_workers, and a group of `world` workers
steps with lr × world / num_workers, so that every clip moves the weights as much as it would in the full
group. train.iterations still counts optimiser steps, the paper's iterations, on which the step decay and
checkpoints are set; a run that shrank therefore trains on fewer clips, which every report says
(`clips_seen`, `workers`), so a shortfall is visible rather than hidden.
"""

import math


def scale_learning_rate(scheduler, unscaled_lrs: list[float], world: int, num_workers: int) -> float:
    """Set the schedule's base rates to unscaled × world / num_workers (a resumed schedule's state holds
    the rates of the group that saved it) and the optimiser's current rates to match -> the factor."""
    factor = world / num_workers
    scheduler.base_lrs = [lr * factor for lr in unscaled_lrs]
    for group, base, rule in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                 strict=True):
        group["lr"] = base * rule(scheduler.last_epoch)
    return factor


def batches_done_at(batches_into_epoch: int, saved_world: int, world: int) -> int:
    """Batches of the current epoch each worker skips on resuming with `world` workers, when the group that
    saved the checkpoint had `saved_world`: the same share of the epoch's clips (every worker of a split
    stream gets an equal share)."""
    if not saved_world or saved_world == world:
        return batches_into_epoch
    return math.ceil(batches_into_epoch * saved_world / world)


def resize_line(saved_world: int, world: int, step: int, factor: float, lr: float) -> str:
    """The run log's line for a group that resumed at another size."""
    change = "shrank" if world < saved_world else "grew"
    return (f"resize: the worker group {change} from {saved_world} to {world} workers at iteration {step}; "
            f"learning rate x{factor:g} of the full group's (now {lr:.3e}), global batch follows the workers")
