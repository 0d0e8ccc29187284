"""STAN: a T×R score map per clip, L1-normalised, and the paper's ablation modes."""

import pytest
import torch

from stal_ray.model.attention import STAN

B, T, R, C = 3, 4, 6, 16


def scores(mode: str) -> torch.Tensor:
    torch.manual_seed(0)
    return STAN(C, (14, 14), T, R, mode)(torch.randn(B, T, C, 14, 14))


@pytest.mark.parametrize("mode", ["stal", "tan", "san", "baseline"])
def test_scores_are_positive_and_l1_normalised_over_the_map(mode):
    a = scores(mode)
    assert a.shape == (B, T, R)
    assert (a > 0).all()
    assert torch.allclose(a.sum(dim=(1, 2)), torch.ones(B))


def test_stal_scores_vary_over_frames_and_parts():
    a = scores("stal")
    assert a.std(1).mean() > 0 and a.std(2).mean() > 0


def test_temporal_only_scores_are_equal_over_parts():
    a = scores("tan")
    assert torch.allclose(a, a[:, :, :1].expand_as(a)) and a.std(1).mean() > 0


def test_spatial_only_scores_are_equal_over_frames():
    a = scores("san")
    assert torch.allclose(a, a[:, :1].expand_as(a)) and a.std(2).mean() > 0


def test_baseline_is_uniform_and_has_no_parameters():
    assert torch.allclose(scores("baseline"), torch.full((B, T, R), 1 / (T * R)))
    assert not list(STAN(C, (14, 14), T, R, "baseline").parameters())


def test_clip_length_must_match():
    with pytest.raises(ValueError, match="T = 4"):
        STAN(C, (14, 14), T, R)(torch.randn(B, T + 1, C, 14, 14))


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="model.attention"):
        STAN(C, (14, 14), T, R, "spatial")


def test_batchnorm_follows_every_conv_unless_turned_off():
    def norms(stan):
        return sum(isinstance(m, torch.nn.BatchNorm2d) for m in stan.modules())

    assert norms(STAN(C, (14, 14), T, R)) == 3
    assert norms(STAN(C, (14, 14), T, R, batchnorm=False)) == 0


def test_normalising_scores_that_all_underflowed_gives_zeros_not_nan():
    from stal_ray.model.attention import normalize_scores

    assert torch.equal(normalize_scores(torch.zeros(2, T, R)), torch.zeros(2, T, R))


def test_frame_fc_scores_a_frame_the_same_at_every_position_and_clip_fc_does_not():
    torch.manual_seed(0)
    maps = torch.randn(2, T, C, 14, 14)
    order = torch.tensor([2, 0, 3, 1])  # frame order[t] moves to position t
    for fc, position_free in (("frame", True), ("clip", False)):
        stan = STAN(C, (14, 14), T, R, fc=fc).eval()
        with torch.no_grad():
            same = torch.allclose(stan.raw_scores(maps[:, order]), stan.raw_scores(maps)[:, order], atol=1e-6)
        assert same == position_free, fc


def test_unknown_fc_is_rejected():
    with pytest.raises(ValueError, match="model.stan_fc"):
        STAN(C, (14, 14), T, R, fc="shared")
