"""What a batch means when the group changes: the learning rate follows the global batch, a resumed epoch
skips the same share of its clips."""

import pytest

from stal_ray.config import load_config
from stal_ray.model.stal import STAL
from stal_ray.train.elastic import batches_done_at, resize_line, scale_learning_rate
from stal_ray.train.optimizer import build_optimizer

TINY = ["model.backbone=tiny", "model.feature_dim=16", "data.seq_len=2", "data.height=32", "data.width=16"]


def schedule(*overrides):
    config = load_config(None, TINY + ["train.lr=0.01", "train.lr_step=2", "train.gamma=0.5", *overrides])
    return build_optimizer(STAL.from_config(config, num_classes=3), config)


def test_the_learning_rate_follows_the_global_batch_and_keeps_its_decay():
    optimizer, scheduler = schedule()
    unscaled = list(scheduler.base_lrs)
    for _ in range(3):  # past one decay step: 0.01 x 0.5
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert scale_learning_rate(scheduler, unscaled, world=1, num_workers=4) == 0.25
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 * 0.25)
    # a schedule resumed from a group of another size holds that group's rates: scaled from the unscaled ones
    _, resumed = schedule()
    resumed.load_state_dict(state)
    scale_learning_rate(resumed, unscaled, world=3, num_workers=4)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 * 0.75)
    resumed.optimizer.step()
    resumed.step()
    assert resumed.get_last_lr()[0] == pytest.approx(0.01 * 0.5 * 0.5 * 0.75)  # the next decay, still scaled


@pytest.mark.parametrize(("done", "saved", "world", "skip"), [(6, 2, 2, 6), (6, 2, 1, 12), (6, 2, 3, 4),
                                                               (5, 2, 3, 4), (6, 0, 3, 6)])
def test_a_resumed_epoch_skips_the_same_share_of_its_clips(done, saved, world, skip):
    assert batches_done_at(done, saved, world) == skip


def test_a_resize_is_one_line_that_says_which_way():
    line = resize_line(2, 1, 40, 0.5, 5e-4)
    assert line.startswith("resize: the worker group shrank from 2 to 1 workers at iteration 40")
    assert "grew from 1 to 2" in resize_line(1, 2, 60, 1.0, 1e-3)
