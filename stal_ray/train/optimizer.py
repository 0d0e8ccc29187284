"""The optimiser and learning-rate schedule: the paper's SGD with step decay (§III-E) by default; Adam, linear
warm-up and cosine decay as switches beyond the paper (Luo et al., "Bag of tricks and a strong baseline for
deep person re-identification", CVPR-W 2019, use Adam with warm-up; cosine decay: Loshchilov and Hutter,
"SGDR", ICLR 2017; multi-step decay at given milestones: Luo et al.'s own schedule)."""

import bisect
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from stal_ray.config import LR_SCHEDULES, OPTIMIZERS

# warm-up starts at this fraction of train.lr (Luo et al.: 3.5e-5 rising to 3.5e-4)
WARMUP_START = 0.1


class LearningRateFactor:
    """The factor on train.lr after `step` optimiser steps: linear warm-up from WARMUP_START to 1 over
    warmup_iterations, times the decay: γ^⌊step / lr_step⌋ ("step", the paper's), γ^(milestones passed)
    ("multistep": γ from each of `milestones` on) or, after the warm-up, ½(1 + cos(π·progress)) down to 0 at
    the last iteration ("cosine"). A class, not a closure, so that LambdaLR's state_dict (in DeepSpeed's
    checkpoints) holds it."""

    def __init__(self, schedule: str, iterations: int, lr_step: int, gamma: float, warmup_iterations: int,
                 milestones: tuple[int, ...] | list[int] = ()):
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule = {schedule!r} is invalid: use one of "
                             f"{', '.join(LR_SCHEDULES)}")
        if schedule == "multistep" and not milestones:
            raise ValueError("train.lr_schedule = 'multistep' needs train.lr_milestones, the iterations to "
                             "decay at, e.g. train.lr_milestones=[4000,7000]")
        self.schedule, self.iterations, self.lr_step, self.gamma = schedule, iterations, lr_step, gamma
        self.warmup_iterations = warmup_iterations
        self.milestones = sorted(int(m) for m in milestones)

    def __call__(self, step: int) -> float:
        warmup = 1.0
        if step < self.warmup_iterations:
            warmup = WARMUP_START + (1 - WARMUP_START) * step / self.warmup_iterations
        if self.schedule == "step":
            return warmup * self.gamma ** (step // self.lr_step)
        if self.schedule == "multistep":
            return warmup * self.gamma ** bisect.bisect_right(self.milestones, step)
        decaying = max(1, self.iterations - self.warmup_iterations)
        progress = min(1.0, max(0, step - self.warmup_iterations) / decaying)
        return warmup * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """train.optimizer ("sgd": momentum, the paper's; "adam") over the model's parameters with train.lr and
    train.weight_decay, and the LearningRateFactor schedule, stepped once per optimiser step (DeepSpeed
    steps the scheduler with the optimiser)."""
    train = config.train
    parameters = [p for p in model.parameters() if p.requires_grad]  # not BNNeck's frozen shift
    if train.optimizer == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=train.lr, momentum=train.momentum,
                                    weight_decay=train.weight_decay)
    elif train.optimizer == "adam":  # β = (0.9, 0.999), torch's and Luo et al.'s
        optimizer = torch.optim.Adam(parameters, lr=train.lr, weight_decay=train.weight_decay)
    else:
        raise ValueError(f"train.optimizer = {train.optimizer!r} is invalid: use one of "
                         f"{', '.join(OPTIMIZERS)}")
    factor = LearningRateFactor(train.lr_schedule, train.iterations, train.lr_step, train.gamma,
                                train.warmup_iterations, train.lr_milestones)
    return optimizer, LambdaLR(optimizer, factor)
