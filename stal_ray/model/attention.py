"""STAN, the spatial-temporal attention network (§III-C): one T×R score map per clip."""

import math

import torch
from torch import nn

from stal_ray.config import ATTENTION_MODES, STAN_FCS
from stal_ray.model.blocks import ConvBNReLU


class STAN(nn.Module):
    """7×7 conv, two 3×3 convs, 7×7 max-pool, FC to T×R, sigmoid, L1 normalisation over the T×R map.

    With `batchnorm` (the default) each conv is followed by BatchNorm, as every conv of the backbones is. The
    paper does not say; without it the raw scores stay within 0.5 ± 0.07 (the conv outputs, and so the FC's
    logits, start tiny) and track nothing (docs/attention.md).
    It reads the low-level maps of all T frames of a clip. With `fc` "frame" (the default) one FC maps each
    frame's pooled map to its R scores, the same FC at every position; over the T frames that is the
    paper's FC "whose output is T × R". "clip" (the first STAN) is one FC over the whole clip: each
    position has its own weights, so the same frame scores differently at another position, and it learns
    positions more than occlusion (docs/attention.md).
    `mode` reproduces the paper's ablation: "stal" (both), "tan" (temporal scores only: one score per frame),
    "san" (spatial scores only: one per part), "baseline" (all scores equal).
    """

    def __init__(
        self,
        channels: int,
        map_size: tuple[int, int],
        seq_len: int,
        num_parts: int,
        mode: str = "stal",
        widths: tuple[int, int, int] = (32, 32, 32),
        batchnorm: bool = True,
        fc: str = "frame",
    ):
        super().__init__()
        if mode not in ATTENTION_MODES:
            allowed = ", ".join(ATTENTION_MODES)
            raise ValueError(f"model.attention = {mode!r} is invalid: use one of {allowed}")
        if fc not in STAN_FCS:
            raise ValueError(f"model.stan_fc = {fc!r} is invalid: use one of {', '.join(STAN_FCS)}")
        self.mode, self.seq_len, self.num_parts, self.fc = mode, seq_len, num_parts, fc
        if mode == "baseline":  # no parameters that would never receive a gradient
            return
        c1, c2, c3 = widths
        layers = []
        for cin, cout, kernel in ((channels, c1, 7), (c1, c2, 3), (c2, c3, 3)):
            if batchnorm:
                layers.append(ConvBNReLU(cin, cout, kernel, padding=kernel // 2, bias=False))
            else:
                layers += [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.ReLU(inplace=True)]
        self.texture = nn.Sequential(*layers, nn.MaxPool2d(7, stride=7, ceil_mode=True))
        pooled = math.ceil(map_size[0] / 7) * math.ceil(map_size[1] / 7)
        if fc == "clip":
            self.scores = nn.Linear(seq_len * c3 * pooled, seq_len * num_parts)
        else:  # the same FC for every frame: a frame's scores do not depend on where it sits in the clip
            self.scores = nn.Linear(c3 * pooled, num_parts)

    def raw_scores(self, low_maps: torch.Tensor) -> torch.Tensor:
        """low_maps (B, T, C, h, w) -> positive sigmoid scores (B, T, R) before the L1 normalisation.

        A tracklet longer than T is scored clip by clip: its scores must be normalised over all of its
        frames (Eq. 9 divides by Σ_t over the whole tracklet), not clip by clip, so extraction needs these.
        """
        b, t = low_maps.shape[:2]
        if t != self.seq_len:
            raise ValueError(f"STAN was built for clips of T = {self.seq_len} frames, got {t}")
        if self.mode == "baseline":
            return low_maps.new_ones((b, t, self.num_parts))
        texture = self.texture(low_maps.flatten(0, 1))  # (B·T, c3, ...)
        texture = texture.reshape(b, -1) if self.fc == "clip" else texture.flatten(1)
        s = torch.sigmoid(self.scores(texture)).view(b, t, self.num_parts)
        if self.mode == "tan":
            s = s.mean(2, keepdim=True).expand_as(s)
        elif self.mode == "san":
            s = s.mean(1, keepdim=True).expand_as(s)
        return s

    def forward(self, low_maps: torch.Tensor) -> torch.Tensor:
        """low_maps (B, T, C, h, w) -> a (B, T, R), positive, summing to 1 over T×R."""
        return normalize_scores(self.raw_scores(low_maps))


def normalize_scores(scores: torch.Tensor) -> torch.Tensor:
    """The L1 normalisation over each clip's T×R map: (B, T, R) positive -> a, summing to 1 per clip.

    A map whose sigmoids all underflowed to 0 (possible in bf16) is divided by the smallest normal number
    instead of 0: all zeros then, never NaN.
    """
    total = scores.sum(dim=(1, 2), keepdim=True)
    return scores / total.clamp_min(torch.finfo(scores.dtype).tiny)
