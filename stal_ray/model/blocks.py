"""Building blocks of the backbones and of the part networks (Table I): convolutions, Inception and
bottleneck blocks, pooling, and the R part-specific networks that run as one batched op.

Each block takes `parts`: R copies with separate weights run as one grouped op on an (N, R*C, h, w) layout,
part r in channels [r*C, (r+1)*C). parts=1 is the plain layer, with the same state-dict keys.
"""

import torch
import torch.nn.functional as F
from torch import nn


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


def init_weights(module: nn.Module) -> None:
    """Kaiming (fan-out) convolutions, BatchNorm as the identity: the random start of every backbone."""
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
        init_weights(self.blocks)

    def forward(self, part_maps: torch.Tensor) -> torch.Tensor:  # (N, R, C, S, S) -> (N, R, D)
        x = self.blocks(part_maps.flatten(1, 2))  # (N, R*C', s, s)
        x = self.pool(x).unflatten(1, (self.num_parts, -1))  # (N, R, C')
        return self.fc(x)

    @torch.no_grad()
    def init_from_backbone(self, backbone: nn.Module) -> None:
        """Copy the mirrored backbone layers into every part, so ImageNet weights reach them (not fc)."""
        for name, block in zip(self.mirrors, self.blocks, strict=True):
            single = backbone.get_submodule(name).state_dict()
            # grouped conv weights stack the groups along dim 0, BatchNorm vectors along their only dim
            block.load_state_dict({k: v.repeat(self.num_parts, *[1] * (v.dim() - 1)) if v.dim() else v
                                   for k, v in single.items()})
