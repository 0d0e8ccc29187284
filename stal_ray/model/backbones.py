"""The backbones, split into Table I's low- and high-level CNN, each with its part networks; BACKBONES
(config_schema.py, free of torch, so that configs are checked without it) names them, and BUILDERS maps each
name to the function that builds it. A new backbone is one class, one builder function decorated with
@builder, and its name in config_schema.BACKBONES; importing this module fails if the two lists differ."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stal_ray.config import BACKBONES
from stal_ray.core.preprocess import CAFFE_BGR, IMAGENET, Preprocess
from stal_ray.model.blocks import (
    Bottleneck,
    ConvBNReLU,
    GlobalAvgPool,
    Inception,
    PartNetworks,
    init_weights,
)


class Backbone(nn.Module):
    """A CNN whose layers keep the pretrained file's names, run as `high(low(x))`, split where Table I splits.

    Layers are registered on the backbone itself (state-dict keys like torchvision's `layer3.5.bn2.weight`);
    `low` and `high` are sequential views over them, kept out of nn.Module's registry so no key is duplicated.
    """

    low_channels: int
    global_dim: int
    # what the pretrained weights expect of the input frames (model.preprocess)
    preprocess: Preprocess = IMAGENET

    def _split(self, low: list[str], high: list[str]) -> None:
        self._stages = tuple(nn.Sequential(*(self.get_submodule(n) for n in names)) for names in (low, high))

    @property
    def low(self) -> nn.Sequential:  # (N, 3, H, W) -> (N, low_channels, h, w)
        return self._stages[0]

    @property
    def high(self) -> nn.Sequential:  # (N, low_channels, h, w) -> (N, global_dim)
        return self._stages[1]

    def part_networks(self, num_parts: int, feature_dim: int) -> PartNetworks:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.high(self.low(x))


# (in, 1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3, pool proj), from Cadene's pretrainedmodels
INCEPTION = {
    "3a": (192, 64, 64, 64, 64, 96, 32),  # -> 256
    "3b": (256, 64, 64, 96, 64, 96, 64),  # -> 320
    "3c": (320, 0, 128, 160, 64, 96, 0),  # -> 576, stride 2
    "4a": (576, 224, 64, 96, 96, 128, 128),  # -> 576
    "4b": (576, 192, 96, 128, 96, 128, 128),  # -> 576
    "4c": (576, 160, 128, 160, 128, 160, 128),  # -> 608
    "4d": (608, 96, 128, 192, 160, 192, 128),  # -> 608
    "4e": (608, 0, 128, 192, 192, 256, 0),  # -> 1056, stride 2
    "5a": (1056, 352, 192, 320, 160, 224, 128),  # -> 1024
    "5b": (1024, 352, 192, 320, 192, 224, 128),  # -> 1024, max-pool branch
}


def _inception(name: str, parts: int = 1) -> Inception:
    return Inception(*INCEPTION[name], stride=2 if name in ("3c", "4e") else 1,
                     pool="max" if name == "5b" else "avg", parts=parts)


class BNInception(Backbone):
    """BN-Inception (Ioffe & Szegedy 2015) split as Table I: low = stem .. 4b, high = 4c .. 5b + pool."""

    low_channels, global_dim = 576, 1024
    preprocess = CAFFE_BGR  # Caffe-ported weights

    def __init__(self):
        super().__init__()
        # BatchNorm keeps PyTorch's momentum 0.1: Cadene's 0.9 is Caffe's moving-average factor, which
        # means the opposite in PyTorch
        self.conv1 = ConvBNReLU(3, 64, 7, 2, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2_reduce = ConvBNReLU(64, 64, 1)
        self.conv2 = ConvBNReLU(64, 192, 3, 1, 1)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        for name in INCEPTION:
            self.add_module(f"inception{name}", _inception(name))
        self.global_pool = GlobalAvgPool()
        init_weights(self)
        self._split(["conv1", "pool1", "conv2_reduce", "conv2", "pool2", "inception3a", "inception3b",
                     "inception3c", "inception4a", "inception4b"],
                    ["inception4c", "inception4d", "inception4e", "inception5a", "inception5b",
                     "global_pool"])

    def part_networks(self, num_parts: int, feature_dim: int) -> PartNetworks:
        # 4c, 4d, 4e per part: 8x8 -> 4x4, 1056 channels
        names = ["4c", "4d", "4e"]
        return PartNetworks([_inception(n, num_parts) for n in names], [f"inception{n}" for n in names],
                            num_parts=num_parts, in_channels=self.low_channels, out_channels=1056,
                            feature_dim=feature_dim)


class ResNet50(Backbone):
    """ResNet-50 with torchvision's names: low = conv1 .. layer3 (stride 16), high = layer4 + pool."""

    low_channels, global_dim = 1024, 2048

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 1):
            layer = [Bottleneck(cin, width, stride)]
            cin = width * Bottleneck.expansion
            layer += [Bottleneck(cin, width) for _ in range(blocks - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*layer))
        self.global_pool = GlobalAvgPool()
        init_weights(self)
        self._split(["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"],
                    ["layer4", "global_pool"])

    def part_networks(self, num_parts: int, feature_dim: int) -> PartNetworks:
        # one bottleneck like layer4[0] per part: 1024 -> 2048 channels, stride 2
        return PartNetworks([Bottleneck(1024, 512, 2, parts=num_parts)], ["layer4.0"], num_parts=num_parts,
                            in_channels=self.low_channels, out_channels=2048, feature_dim=feature_dim)


class TinyCNN(Backbone):
    """A few convolutions for CPU tests: low = 2 stride-2 convs (64x32 -> 16x8), high = 2 convs + pool."""

    low_channels, global_dim = 64, 128

    def __init__(self):
        super().__init__()
        self.conv1 = ConvBNReLU(3, 32, 3, 2, 1, bias=False)
        self.conv2 = ConvBNReLU(32, 64, 3, 2, 1, bias=False)
        self.conv3 = ConvBNReLU(64, 128, 3, 2, 1, bias=False)
        self.conv4 = ConvBNReLU(128, 128, 3, 1, 1, bias=False)
        self.global_pool = GlobalAvgPool()
        init_weights(self)
        self._split(["conv1", "conv2"], ["conv3", "conv4", "global_pool"])

    def part_networks(self, num_parts: int, feature_dim: int) -> PartNetworks:
        block = ConvBNReLU(64, 128, 3, 2, 1, bias=False, parts=num_parts)  # a grouped copy of conv3
        return PartNetworks([block], ["conv3"], num_parts=num_parts, in_channels=self.low_channels,
                            out_channels=128, feature_dim=feature_dim)


# --- The registry: backbone name -> the function that builds it

BUILDERS: dict[str, Callable[[], Backbone]] = {}


def builder(function: Callable[[], Backbone]) -> Callable[[], Backbone]:
    """Register `function` as the builder of the backbone named as it is."""
    BUILDERS[function.__name__] = function
    return function


@builder
def bninception() -> BNInception:
    return BNInception()


@builder
def resnet50() -> ResNet50:
    return ResNet50()


@builder
def tiny() -> TinyCNN:
    return TinyCNN()


if set(BUILDERS) != set(BACKBONES):
    raise ImportError(f"config_schema.BACKBONES {sorted(BACKBONES)} and the backbones built here "
                      f"{sorted(BUILDERS)} differ: give every backbone a builder and a name in BACKBONES")


def build_backbone(name: str) -> Backbone:
    if name not in BUILDERS:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
    return BUILDERS[name]()


# Each backbone's ImageNet weights (model.pretrained of the MARS configs): torchvision's ResNet-50 file,
# and the widely used port of BN-Inception in Cadene's pretrainedmodels. The hash prefix in each name is
# its sha256's (torch hub's convention), checked as it is downloaded into the node's cache (model/weights.py).
IMAGENET_WEIGHTS = {
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "bninception": "http://data.lip6.fr/cadene/pretrainedmodels/bn_inception-52deb4733.pth",
}


def check_weights_choice(backbone: str, pretrained: str | None) -> None:
    """A backbone with ImageNet weights trains from them unless model.pretrained says "none" on purpose."""
    if pretrained is None and backbone in IMAGENET_WEIGHTS:
        raise ValueError(
            f"model.pretrained is not set for backbone {backbone}: the paper fine-tunes ImageNet weights "
            f"(§III-E). Set --set model.pretrained={IMAGENET_WEIGHTS[backbone]} (downloaded once per node "
            "and checked by its sha256; configs/mars_*.yaml set it), or a local path or s3:// URL of the "
            "same file, or model.pretrained=none to train from random weights on purpose")
