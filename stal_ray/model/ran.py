"""Residual attention branch on the low-level map (§III-B, Fig. 3a, Table I rows "ran conv1" .. "conv3")."""

import torch
from torch import nn


class ResidualAttention(nn.Module):
    """out = x + mask(x) · x, with a sigmoid mask from one down-pool / up-pool pass (Table I)."""

    def __init__(self, channels: int, hidden: int = 64, middle: int = 192):
        super().__init__()
        # down-pooling module: 1x1 conv, 3x3 max-pool (stride 2), 3x3 conv
        self.down = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(hidden, middle, 3, padding=1),
            nn.BatchNorm2d(middle),
            nn.ReLU(inplace=True),
        )
        # up-pooling module: 4x4 deconvolution (stride 2) back to the input resolution, 1x1 conv to `channels`
        self.up = nn.Sequential(
            nn.ConvTranspose2d(middle, middle, 4, stride=2, padding=1),
            nn.BatchNorm2d(middle),
            nn.ReLU(inplace=True),
            nn.Conv2d(middle, channels, 1),
        )

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """Soft mask in [0, 1] with the shape of x: (N, C, h, w)."""
        h, w = x.shape[-2:]
        # an odd side comes back one larger from pool + deconv: crop to the input
        return torch.sigmoid(self.up(self.down(x))[..., :h, :w])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mask(x) * x
