"""The residual attention branch: x + mask·x with a [0, 1] mask at the input's resolution."""

import pytest
import torch

from stal_ray.model.ran import ResidualAttention


@pytest.mark.parametrize("size", [(14, 14), (16, 8), (15, 7)])
def test_output_keeps_the_input_shape(size):
    ran = ResidualAttention(32)
    x = torch.randn(2, 32, *size)
    assert ran(x).shape == x.shape
    mask = ran.mask(x)
    assert mask.shape == x.shape and (mask >= 0).all() and (mask <= 1).all()


def test_output_is_the_input_plus_the_masked_input():
    ran = ResidualAttention(8).eval()
    x = torch.randn(2, 8, 14, 14)
    assert torch.allclose(ran(x), x * (1 + ran.mask(x)))
