"""Backbones split into Table I's low- and high-level CNN, batched part networks, pretrained loading."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field

import fsspec
import torch
import torch.nn.functional as F
from torch import nn

from stal_ray.config import BACKBONES
from stal_ray.core.preprocess import CAFFE_BGR, IMAGENET, Preprocess
from stal_ray.model.weights import local_weights

log = logging.getLogger(__name__)



# --- Building blocks. Each takes `parts`: R copies with separate weights run as one grouped op on an
# (N, R*C, h, w) layout, part r in channels [r*C, (r+1)*C). parts=1 is the plain layer, same state-dict keys.


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, *,
                 bias: bool = True, parts: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin * parts, cout * parts, kernel, stride, padding, bias=bias, groups=parts)
        self.bn = nn.BatchNorm2d(cout * parts)  # over R*C channels: one BatchNorm per part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """BN-Inception block: 1x1 | 1x1-3x3 | 1x1-3x3-3x3 | pool-1x1, concatenated within each part.

    Stride-2 blocks (3c, 4e) have no 1x1 branch and pass the max-pooled input through unprojected.
    """

    def __init__(self, cin: int, c1x1: int, c3x3_reduce: int, c3x3: int, cdbl_reduce: int, cdbl: int,
                 cpool: int, *, stride: int = 1, pool: str = "avg", parts: int = 1):
        super().__init__()
        self.parts = parts
        self.branch1x1 = ConvBNReLU(cin, c1x1, 1, parts=parts) if c1x1 else None
        self.branch3x3_reduce = ConvBNReLU(cin, c3x3_reduce, 1, parts=parts)
        self.branch3x3 = ConvBNReLU(c3x3_reduce, c3x3, 3, stride, 1, parts=parts)
        self.branch3x3dbl_reduce = ConvBNReLU(cin, cdbl_reduce, 1, parts=parts)
        self.branch3x3dbl_1 = ConvBNReLU(cdbl_reduce, cdbl, 3, 1, 1, parts=parts)
        self.branch3x3dbl_2 = ConvBNReLU(cdbl, cdbl, 3, stride, 1, parts=parts)
        # ceil_mode as in Caffe; the stride-2 max-pool has no padding, so map sides must be even there
        if stride == 2:
            self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        elif pool == "max":
            self.pool = nn.MaxPool2d(3, 1, 1, ceil_mode=True)
        else:
            self.pool = nn.AvgPool2d(3, 1, 1, ceil_mode=True)
        self.branch_pool = ConvBNReLU(cin, cpool, 1, parts=parts) if cpool else None
        self.out_channels = c1x1 + c3x3 + cdbl + (cpool or cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, R*C_in, h, w) -> (N, R*C_out, h', w')
        branches = [] if self.branch1x1 is None else [self.branch1x1(x)]
        branches.append(self.branch3x3(self.branch3x3_reduce(x)))
        branches.append(self.branch3x3dbl_2(self.branch3x3dbl_1(self.branch3x3dbl_reduce(x))))
        pooled = self.pool(x)
        branches.append(pooled if self.branch_pool is None else self.branch_pool(pooled))
        # concatenate per part: (N, R, c_b, h, w) pieces along c, so part r keeps its own channel block
        return torch.cat([b.unflatten(1, (self.parts, -1)) for b in branches], 2).flatten(1, 2)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck (stride on the 3x3 conv), with the same parameter names."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, *, parts: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin * parts, width * parts, 1, bias=False, groups=parts)
        self.bn1 = nn.BatchNorm2d(width * parts)
        self.conv2 = nn.Conv2d(width * parts, width * parts, 3, stride, 1, bias=False, groups=parts)
        self.bn2 = nn.BatchNorm2d(width * parts)
        self.conv3 = nn.Conv2d(width * parts, cout * parts, 1, bias=False, groups=parts)
        self.bn3 = nn.BatchNorm2d(cout * parts)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin * parts, cout * parts, 1, stride, bias=False, groups=parts),
                nn.BatchNorm2d(cout * parts),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, h, w) -> (N, C)
        return x.mean((2, 3))


class PartLinear(nn.Module):
    """R fully connected layers with separate weights, as one einsum: (N, R, C) -> (N, R, D)."""

    def __init__(self, parts: int, cin: int, cout: int):
        super().__init__()
        bound = cin**-0.5  # nn.Linear's default init, per part
        self.weight = nn.Parameter(torch.empty(parts, cin, cout).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(parts, cout).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nrc,rcd->nrd", x, self.weight) + self.bias


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            # Kaiming fan-out per group: nn.init counts all groups' outputs and would shrink grouped copies
            fan_out = m.out_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- Part-specific networks (§III-D, Table I "inception4c part" .. "fc part")


class PartNetworks(nn.Module):
    """R part-specific networks of one structure and separate weights, computed as one batched op."""

    def __init__(self, blocks: list[nn.Module], mirrors: list[str], *, num_parts: int, in_channels: int,
                 out_channels: int, feature_dim: int):
        super().__init__()
        self.num_parts, self.in_channels, self.feature_dim = num_parts, in_channels, feature_dim
        self.mirrors = tuple(mirrors)  # the backbone layers that blocks[i] is a grouped copy of
        self.blocks = nn.Sequential(*blocks)
        self.pool = GlobalAvgPool()
        self.fc = PartLinear(num_parts, out_channels, feature_dim)
        _init_weights(self.blocks)

    def forward(self, part_maps: torch.Tensor) -> torch.Tensor:  # (N, R, C, S, S) -> (N, R, D)
        x = self.blocks(part_maps.flatten(1, 2))  # (N, R*C', s, s)
        x = self.pool(x).unflatten(1, (self.num_parts, -1))  # (N, R, C')
        return self.fc(x)

    @torch.no_grad()
    def init_from_backbone(self, backbone: Backbone) -> None:
        """Copy the mirrored backbone layers into every part, so ImageNet weights reach them (not fc)."""
        for name, block in zip(self.mirrors, self.blocks, strict=True):
            single = backbone.get_submodule(name).state_dict()
            # grouped conv weights stack the groups along dim 0, BatchNorm vectors along their only dim
            block.load_state_dict({k: v.repeat(self.num_parts, *[1] * (v.dim() - 1)) if v.dim() else v
                                   for k, v in single.items()})


# --- Backbones


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
        _init_weights(self)
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
        _init_weights(self)
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
        _init_weights(self)
        self._split(["conv1", "conv2"], ["conv3", "conv4", "global_pool"])

    def part_networks(self, num_parts: int, feature_dim: int) -> PartNetworks:
        block = ConvBNReLU(64, 128, 3, 2, 1, bias=False, parts=num_parts)  # a grouped copy of conv3
        return PartNetworks([block], ["conv3"], num_parts=num_parts, in_channels=self.low_channels,
                            out_channels=128, feature_dim=feature_dim)


def bninception() -> BNInception:
    return BNInception()


def resnet50() -> ResNet50:
    return ResNet50()


def tiny() -> TinyCNN:
    return TinyCNN()


def build_backbone(name: str) -> Backbone:
    if name == "bninception":
        return bninception()
    elif name == "resnet50":
        return resnet50()
    elif name == "tiny":
        return tiny()
    raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")


# --- Pretrained weights

# ImageNet heads that no backbone has: torchvision's `fc`, Cadene's `last_linear`, timm-style `classifier`
CLASSIFIER_KEY = re.compile(r"^(fc|last_linear|classifier)\.")
# Cadene's flat BN-Inception names -> ours: conv2_3x3_reduce_bn.weight -> conv2_reduce.bn.weight,
# inception_3a_double_3x3_1.bias -> inception3a.branch3x3dbl_1.conv.bias
CADENE_KEY = re.compile(
    r"^(?P<layer>conv1_7x7_s2|conv2_3x3_reduce|conv2_3x3|inception_(?P<block>\d[a-e])_"
    r"(?P<branch>1x1|3x3_reduce|3x3|double_3x3_reduce|double_3x3_1|double_3x3_2|pool_proj))"
    r"(?P<bn>_bn)?\.(?P<param>\w+)$"
)
CADENE_STEM = {"conv1_7x7_s2": "conv1", "conv2_3x3_reduce": "conv2_reduce", "conv2_3x3": "conv2"}
CADENE_BRANCH = {"1x1": "branch1x1", "3x3_reduce": "branch3x3_reduce", "3x3": "branch3x3",
                 "double_3x3_reduce": "branch3x3dbl_reduce", "double_3x3_1": "branch3x3dbl_1",
                 "double_3x3_2": "branch3x3dbl_2", "pool_proj": "branch_pool"}


def _from_cadene(key: str) -> str:
    m = CADENE_KEY.match(key)
    if m is None:
        return key  # last_linear.*, or something we do not know: left for the report
    layer = CADENE_STEM.get(m["layer"]) or f"inception{m['block']}.{CADENE_BRANCH[m['branch']]}"
    return f"{layer}.{'bn' if m['bn'] else 'conv'}.{m['param']}"


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]
    loaded: int
    source: str = ""
    ignored: list[str] = field(init=False)  # the unexpected keys that are an ImageNet classifier

    def __post_init__(self):
        self.ignored = [k for k in self.unexpected if CLASSIFIER_KEY.match(k)]

    @property
    def ok(self) -> bool:
        return not self.missing and len(self.ignored) == len(self.unexpected)

    def __str__(self) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")

        other = [k for k in self.unexpected if k not in self.ignored]
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        lines.append(f"missing {len(self.missing)}" + (f": {names(self.missing)}" if self.missing else ""))
        if other:
            lines.append(f"unexpected {len(other)}: {names(other)}")
        if self.ignored:
            lines.append(f"ignored classifier keys: {names(self.ignored)}")
        return "; ".join(lines)


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


def _read_state_dict(path_or_url: str) -> dict[str, torch.Tensor]:
    try:
        # a URL with a sha256 is read from this node's checked copy (model/weights.py)
        with fsspec.open(local_weights(path_or_url), "rb") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"pretrained weights not found: {path_or_url} (expected a torch state dict "
                                f"saved with torch.save)") from err
    except OSError as err:  # an unreachable host, an HTTP error status
        raise FileNotFoundError(f"cannot read pretrained weights {path_or_url}: {err}") from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors have no common type
        raise ValueError(f"cannot read {path_or_url} as a state dict saved with torch.save: {err}") from err
    for wrapper in ("state_dict", "model", "module"):  # trainer checkpoints, DeepSpeed's model states
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path_or_url} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_pretrained(model: nn.Module, path_or_url: str, *, prefix: str = "") -> LoadReport:
    """Load a state dict from a path or fsspec URL into `model` (keys under `prefix`), report what matched.

    Accepts `{"state_dict": ...}` / `{"model": ...}` wrappers and `module.` prefixes, converts Cadene's
    BN-Inception names, ignores ImageNet classifiers. `missing` counts only `model` keys under `prefix`: the
    file describes that submodule, not the rest. Shape mismatches raise.
    """
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path_or_url).items()}
    if any(k.startswith("conv1_7x7_s2") for k in state):
        state = {_from_cadene(k): v for k, v in state.items()}
    # a fresh dict has no _metadata, so BatchNorm fills in a num_batches_tracked the file lacks
    state = {prefix + k: v for k, v in state.items()}

    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"shape mismatch loading {path_or_url}: " + "; ".join(wrong))
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(
        missing=[k for k in result.missing_keys if k.startswith(prefix)],
        unexpected=[k.removeprefix(prefix) for k in result.unexpected_keys],
        loaded=sum(k in own for k in state),
        source=path_or_url,
    )
    (log.info if report.ok else log.warning)("load_pretrained: %s", report)
    return report
