"""The backbone's input: decoded uint8 RGB frames -> float frames in the backbone's channel order and scale.

One definition for every path that feeds a model: training (data.batches.TrainingBatches), evaluation and
validation (evaluate.features.ChunkFeatures), the study and the benchmarks. model.pt carries it, so a model
file evaluated later gets exactly the input it was trained on, whatever the code's defaults become.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class Preprocess:
    """x = (frame[channel_order] - mean) / std per channel, on the 0..255 scale of the decoded frames."""

    mean: tuple[float, float, float]  # per output channel (in channel_order), 0..255 scale
    std: tuple[float, float, float]
    channel_order: str = "RGB"  # of the output; decoded frames are RGB

    def __post_init__(self):
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"preprocess needs 3 means and 3 positive stds, got mean={self.mean} "
                             f"std={self.std}")
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"preprocess channel_order {self.channel_order!r} must be one of "
                             f"{', '.join(CHANNEL_ORDERS)}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def into(self, frames: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """frames uint8 (..., 3, H, W) RGB, any strides (e.g. a channels-first view of channels-last
        memory) -> out float (..., 3, H, W) of the same shape, written in place and returned."""
        if self.channel_order == "RGB":
            out.copy_(frames)
        else:  # channel by channel: no reversed copy of the frames first
            for target, source in enumerate((2, 1, 0)):
                out[..., target, :, :].copy_(frames[..., source, :, :])
        shape = (3, 1, 1)
        out.sub_(torch.tensor(self.mean, dtype=out.dtype, device=out.device).view(shape))
        return out.div_(torch.tensor(self.std, dtype=out.dtype, device=out.device).view(shape))

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """frames uint8 (..., 3, H, W) RGB -> float32 (..., 3, H, W), on the frames' device."""
        return self.into(frames, torch.empty(frames.shape, dtype=torch.float32, device=frames.device))

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(mean=tuple(d["mean"]), std=tuple(d["std"]), channel_order=d.get("channel_order", "RGB"))


# torchvision's ImageNet statistics (RGB, 0..1) on the 0..255 scale
IMAGENET = Preprocess(mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                      std=(0.229 * 255, 0.224 * 255, 0.225 * 255))
# Caffe-ported BN-Inception (Cadene's pretrainedmodels): BGR in 0..255 minus the mean pixel, std 1
CAFFE_BGR = Preprocess(mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0), channel_order="BGR")
