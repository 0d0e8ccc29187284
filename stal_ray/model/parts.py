"""Body parts (§III-B): 14 joints, their sources, part boxes by Eq. 7 and ROI pooling by grid_sample."""

import torch
import torch.nn.functional as F
from torch import nn

from stal_ray.config import POSE_SOURCES
from stal_ray.core.skeleton import CANONICAL_POSE, NUM_JOINTS, PART_JOINTS

# Joint indices of every part padded to a rectangle, and a mask of the real slots: one gather for all parts.
_WIDEST = max(len(joints) for _, joints in PART_JOINTS)
_PART_INDEX = torch.tensor([[j - 1 for j in js] + [0] * (_WIDEST - len(js)) for _, js in PART_JOINTS])
_PART_SLOT = torch.tensor([[True] * len(js) + [False] * (_WIDEST - len(js)) for _, js in PART_JOINTS])


def canonical_joints(image_size: tuple[int, int], dtype=torch.float32, device=None) -> torch.Tensor:
    """The canonical pose in pixels of an (H, W) crop: (14, 3) rows of x, y, confidence 1."""
    height, width = image_size
    xy = torch.tensor(CANONICAL_POSE, dtype=dtype, device=device) * torch.tensor(
        [width, height], dtype=dtype, device=device
    )
    return torch.cat([xy, torch.ones(NUM_JOINTS, 1, dtype=dtype, device=device)], dim=1)


def _joint_bounds(joints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 over the usable joints of each part: (..., R, 4) as (x_min, y_min, x_max, y_max), and (..., R)
    saying whether the part had any usable joint (confidence > 0, finite)."""
    index = _PART_INDEX.to(joints.device)
    members = joints[..., index, :]  # (..., R, J, 3)
    x, y, confidence = members.unbind(-1)
    usable = _PART_SLOT.to(joints.device) & (confidence > 0) & x.isfinite() & y.isfinite()
    inf = torch.tensor(float("inf"), dtype=joints.dtype, device=joints.device)
    low = [torch.where(usable, v, inf).amin(-1) for v in (x, y)]
    high = [torch.where(usable, v, -inf).amax(-1) for v in (x, y)]
    return torch.stack(low + high, dim=-1), usable.any(-1)


# Eq. 7 boxes of the canonical pose in crop fractions, computed once: the fallback of parts with no joint.
_PRIOR_BOXES = _joint_bounds(canonical_joints((1, 1), torch.float64))[0]


def part_boxes(
    joints: torch.Tensor, image_size: tuple[int, int], min_extent: float = 0.125
) -> torch.Tensor:
    """Eq. 7: the box of part r spans its joints P_r. joints (..., 14, 3) -> boxes (..., R, 4) in pixels.

    Always a valid box: a part with no usable joint takes the canonical pose's box, boxes are clipped to the
    crop, and each side is at least `min_extent` of the crop (three collinear arm joints span no area).
    """
    height, width = image_size
    bounds, found = _joint_bounds(joints)
    size = torch.tensor([width, height, width, height], dtype=joints.dtype, device=joints.device)
    bounds = torch.where(found[..., None], bounds, _PRIOR_BOXES.to(joints.device, joints.dtype) * size)
    bounds = torch.minimum(bounds.clamp(min=0), size)
    low, high = bounds[..., :2], bounds[..., 2:]
    extent = torch.maximum(high - low, size[:2] * min_extent)
    low = torch.minimum(((low + high - extent) / 2).clamp(min=0), size[:2] - extent)
    return torch.cat([low, low + extent], dim=-1)


def roi_pool(
    feature_map: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    output_size: int = 8,
    samples_per_bin: int = 2,
) -> torch.Tensor:
    """ROI pooling by bilinear sampling, differentiable in the box coordinates.

    feature_map (N, C, h, w) covers the (H, W) crop; boxes (N, R, 4) pixels -> (N, R, C, S, S). Every bin
    averages samples_per_bin² bilinear samples (RoIAlign); all boxes go through one grid_sample call.
    """
    n, channels = feature_map.shape[:2]
    parts = boxes.shape[1]
    height, width = image_size
    side = output_size * samples_per_bin
    centres = (torch.arange(side, dtype=boxes.dtype, device=boxes.device) + 0.5) / side
    x_min, y_min, x_max, y_max = boxes.unbind(-1)  # (N, R) each
    xs = x_min[..., None] + (x_max - x_min)[..., None] * centres  # (N, R, side)
    ys = y_min[..., None] + (y_max - y_min)[..., None] * centres
    # align_corners=False puts -1 and 1 on the outer edges of the map, i.e. of the crop
    gx, gy = xs * (2 / width) - 1, ys * (2 / height) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, :, None, :], gy[:, :, :, None]), dim=-1)
    grid = grid.reshape(n, parts * side, side, 2).to(feature_map.dtype)
    sampled = F.grid_sample(feature_map, grid, mode="bilinear", padding_mode="border", align_corners=False)
    sampled = sampled.view(n, channels, parts, side, side).transpose(1, 2)  # (N, R, C, side, side)
    if samples_per_bin > 1:
        sampled = F.avg_pool2d(sampled.reshape(n * parts, channels, side, side), samples_per_bin)
    return sampled.reshape(n, parts, channels, output_size, output_size)


class KeypointHead(nn.Module):
    """The `learned` pose source: 14 heatmaps on the low-level map, read out by soft-argmax.

    A Gaussian log-prior at the canonical pose is added to the heatmap logits and the last convolution starts
    at zero, so training starts from the canonical pose and the ReID loss moves the joints from there.
    """

    def __init__(self, channels: int, hidden: int = 64, prior_sigma: float = 1.0):
        super().__init__()
        self.heatmaps = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, NUM_JOINTS, 1),
        )
        nn.init.zeros_(self.heatmaps[-1].weight)
        nn.init.zeros_(self.heatmaps[-1].bias)
        self.prior_sigma = prior_sigma

    def forward(self, low_map: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """(N, C, h, w) -> joints (N, 14, 3) in pixels of the (H, W) crop, confidence 1."""
        h, w = low_map.shape[-2:]
        dtype, device = low_map.dtype, low_map.device
        u = (torch.arange(w, dtype=dtype, device=device) + 0.5) / w  # cell centres in crop fractions
        v = (torch.arange(h, dtype=dtype, device=device) + 0.5) / h
        canonical = torch.tensor(CANONICAL_POSE, dtype=dtype, device=device)  # (14, 2)
        # squared distance to the canonical joint, in cells
        d2 = ((u - canonical[:, :1]) * w)[:, None, :] ** 2 + ((v - canonical[:, 1:]) * h)[:, :, None] ** 2
        logits = self.heatmaps(low_map) - d2 / (2 * self.prior_sigma**2)  # (N, 14, h, w)
        p = logits.flatten(2).softmax(-1).view_as(logits)
        height, width = image_size
        x = (p.sum(2) * u).sum(-1) * width
        y = (p.sum(3) * v).sum(-1) * height
        return torch.stack([x, y, torch.ones_like(x)], dim=-1)


class PoseSource(nn.Module):
    """Where the joints come from (model.pose_source): `keypoints` given with clips, `learned` or `prior`."""

    def __init__(self, kind: str, channels: int):
        super().__init__()
        if kind not in POSE_SOURCES:
            raise ValueError(f"model.pose_source = {kind!r} is invalid: use one of {', '.join(POSE_SOURCES)}")
        self.kind = kind
        self.head = KeypointHead(channels) if kind == "learned" else None

    def forward(
        self, low_map: torch.Tensor, image_size: tuple[int, int], keypoints: torch.Tensor | None
    ) -> torch.Tensor:
        """low_map (N, C, h, w), keypoints (N, 14, 3) or None -> joints (N, 14, 3) in pixels."""
        if self.kind == "learned":
            return self.head(low_map, image_size)
        if self.kind == "prior":
            joints = canonical_joints(image_size, low_map.dtype, low_map.device)
            return joints.expand(low_map.shape[0], -1, -1)
        if keypoints is None:
            raise ValueError(
                "model.pose_source = 'keypoints' needs keypoints (B, T, 14, 3) with every clip; the data set "
                "has none: estimate them (jobs/estimate_pose.py), or set model.pose_source=learned (or prior)"
            )
        return keypoints.to(low_map.dtype)
