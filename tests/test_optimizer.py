"""The optimiser and learning-rate schedule: the paper's SGD and step decay by default (as torch's StepLR),
Adam, linear warm-up, cosine and multi-step decay as switches, the learning rate at given iterations,
resumption."""

import math

import pytest
import torch

from stal_ray.config import ConfigError, load_config
from stal_ray.train.optimizer import LearningRateFactor, build_optimizer


def model():
    return torch.nn.Linear(3, 2)


def learning_rates(overrides, steps):
    """The learning rate in force at optimiser steps 0..steps-1, stepping as DeepSpeed does (after each)."""
    optimizer, scheduler = build_optimizer(model(), load_config(None, overrides))
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_default_is_the_papers_sgd_with_step_decay_as_step_lr():
    config = load_config(None, ["train.lr=0.01", "train.lr_step=10", "train.gamma=0.5"])
    optimizer, _ = build_optimizer(model(), config)
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.01, 0.9, 2e-4)
    reference_optimizer = torch.optim.SGD(model().parameters(), lr=0.01)
    step_lr = torch.optim.lr_scheduler.StepLR(reference_optimizer, step_size=10, gamma=0.5)
    expected = []
    for _ in range(35):
        expected.append(step_lr.get_last_lr()[0])
        reference_optimizer.step()
        step_lr.step()
    got = learning_rates(["train.lr=0.01", "train.lr_step=10", "train.gamma=0.5"], 35)
    assert got == pytest.approx(expected, rel=1e-12)
    assert (got[9], got[10], got[20], got[34]) == pytest.approx((0.01, 0.005, 0.0025, 0.00125))


def test_adam_is_chosen_with_lr_and_weight_decay():
    optimizer, _ = build_optimizer(model(), load_config(None, ["train.optimizer=adam", "train.lr=3.5e-4",
                                                               "train.weight_decay=5e-4"]))
    assert type(optimizer) is torch.optim.Adam
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (3.5e-4, 5e-4, (0.9, 0.999))


def test_linear_warm_up_rises_from_a_tenth_then_the_step_decay_applies():
    rates = learning_rates(["train.lr=0.01", "train.warmup_iterations=10", "train.lr_step=20",
                            "train.gamma=0.1"], 25)
    assert rates[0] == pytest.approx(0.001)  # 0.1 × lr
    assert rates[5] == pytest.approx(0.01 * (0.1 + 0.9 * 5 / 10))
    assert rates[10] == pytest.approx(0.01) and rates[19] == pytest.approx(0.01)
    assert rates[20] == pytest.approx(0.001)
    assert all(a < b for a, b in zip(rates[:10], rates[1:11], strict=True))


def test_cosine_decays_from_lr_to_zero_over_the_iterations_after_the_warm_up():
    rates = learning_rates(["train.lr=0.02", "train.lr_schedule=cosine", "train.iterations=110",
                            "train.warmup_iterations=10"], 111)
    assert rates[0] == pytest.approx(0.002) and rates[10] == pytest.approx(0.02)
    assert rates[35] == pytest.approx(0.02 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert rates[60] == pytest.approx(0.01)
    assert rates[110] == pytest.approx(0.0, abs=1e-15)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))
    no_warm_up = learning_rates(["train.lr=0.02", "train.lr_schedule=cosine", "train.iterations=100"], 51)
    assert no_warm_up[0] == pytest.approx(0.02) and no_warm_up[50] == pytest.approx(0.01)


def test_a_resumed_schedule_continues_where_it_stopped():
    overrides = ["train.lr_schedule=cosine", "train.iterations=40", "train.warmup_iterations=8"]
    optimizer, scheduler = build_optimizer(model(), load_config(None, overrides))
    for _ in range(13):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    resumed_optimizer, resumed = build_optimizer(model(), load_config(None, overrides))
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == scheduler.get_last_lr()
    for _ in range(5):
        optimizer.step(), resumed_optimizer.step()
        scheduler.step(), resumed.step()
        assert resumed.get_last_lr() == scheduler.get_last_lr()


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="train.lr_schedule = 'linear' is invalid"):
        LearningRateFactor("linear", 10, 5, 0.5, 0)


def test_multistep_decays_by_gamma_at_each_milestone_after_the_warm_up():
    rates = learning_rates(["train.lr=0.01", "train.lr_schedule=multistep", "train.lr_milestones=[10,15]",
                            "train.gamma=0.1", "train.warmup_iterations=4"], 20)
    reference_optimizer = torch.optim.SGD(model().parameters(), lr=0.01)
    multi_step = torch.optim.lr_scheduler.MultiStepLR(reference_optimizer, milestones=[10, 15], gamma=0.1)
    expected = []
    for _ in range(20):
        expected.append(multi_step.get_last_lr()[0])
        reference_optimizer.step()
        multi_step.step()
    assert rates[4:] == pytest.approx(expected[4:], rel=1e-12)
    assert (rates[9], rates[10], rates[15]) == pytest.approx((0.01, 0.001, 0.0001))
    assert rates[0] == pytest.approx(0.001)  # warm-up from 0.1 × lr still applies


@pytest.mark.parametrize("overrides, message", [
    (["train.lr_schedule=multistep"], "needs train.lr_milestones"),
    (["train.lr_schedule=multistep", "train.lr_milestones=[20,10]"], "increasing integers"),
])
def test_multistep_without_increasing_milestones_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
