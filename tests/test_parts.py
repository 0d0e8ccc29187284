"""Body parts: Eq. 7 boxes from joints, degenerate joints, ROI pooling and the pose sources."""

import pytest
import torch

from stal_ray.core.skeleton import CANONICAL_POSE, PART_NAMES
from stal_ray.model.parts import (
    KeypointHead,
    PoseSource,
    canonical_joints,
    part_boxes,
    roi_pool,
)

# §III-B as printed (1-based): head, torso, right arm, left arm, P5, P6
PAPER_ASSIGNMENT = [[1, 2, 3, 6], [2, 3, 6, 9, 12], [3, 4, 5], [6, 7, 8], [12, 13, 14], [9, 10, 11]]
CROP = (128, 64)  # H, W


def random_pose(generator: torch.Generator) -> torch.Tensor:
    xy = torch.rand(14, 2, generator=generator) * torch.tensor([64.0, 128.0])
    return torch.cat([xy, torch.ones(14, 1)], dim=1)


def test_part_boxes_span_their_joints_as_eq7():
    generator = torch.Generator().manual_seed(0)
    joints = torch.stack([random_pose(generator) for _ in range(5)])
    boxes = part_boxes(joints, CROP, min_extent=0.0)
    assert boxes.shape == (5, 6, 4)
    for n in range(5):
        for r, members in enumerate(PAPER_ASSIGNMENT):
            xs = [joints[n, j - 1, 0].item() for j in members]
            ys = [joints[n, j - 1, 1].item() for j in members]
            expected = [min(xs), min(ys), max(xs), max(ys)]
            assert boxes[n, r].tolist() == pytest.approx(expected, abs=1e-5), PART_NAMES[r]


def test_zero_confidence_joints_do_not_move_boxes():
    joints = canonical_joints(CROP).clone()
    without_wrist = joints.clone()
    without_wrist[4] = joints[3]  # the right arm spanned by shoulder and elbow alone
    joints[4] = torch.tensor([-500.0, 900.0, 0.0])  # right wrist far away, but not seen
    assert torch.equal(part_boxes(joints, CROP), part_boxes(without_wrist, CROP))


@pytest.mark.parametrize(
    "case",
    ["all_equal", "outside_image", "zero_confidence", "not_finite"],
)
def test_degenerate_joints_give_valid_boxes(case):
    joints = canonical_joints(CROP).clone()
    if case == "all_equal":
        joints[:, :2] = torch.tensor([10.0, 20.0])
    elif case == "outside_image":
        joints[:, 0] = joints[:, 0] * 10 - 300
        joints[:, 1] = joints[:, 1] - 1000
    elif case == "zero_confidence":
        joints[:, 2] = 0
    else:
        joints[:7, :2] = float("nan")
        joints[7:, :2] = float("inf")
    boxes = part_boxes(joints, CROP)
    height, width = CROP
    assert torch.isfinite(boxes).all()
    x_min, y_min, x_max, y_max = boxes.unbind(-1)
    assert (x_min >= 0).all() and (y_min >= 0).all() and (x_max <= width).all() and (y_max <= height).all()
    assert (x_max - x_min >= width * 0.125 - 1e-4).all() and (y_max - y_min >= height * 0.125 - 1e-4).all()
    if case in ("zero_confidence", "not_finite"):  # nothing usable: the canonical pose's boxes
        assert torch.allclose(boxes, part_boxes(canonical_joints(CROP), CROP))


def test_part_boxes_gradient_is_finite_for_degenerate_joints():
    joints = canonical_joints(CROP).clone()
    joints[:, 2] = 0
    joints[0, 2] = 1
    joints.requires_grad_(True)
    part_boxes(joints, CROP).sum().backward()
    assert torch.isfinite(joints.grad).all()


def test_roi_pool_samples_the_box_it_is_given():
    # a map whose value is the x pixel coordinate of each cell centre: bilinear sampling is exact on it
    h, w = 16, 8
    x_of_cell = (torch.arange(w) + 0.5) * (CROP[1] / w)
    feature_map = x_of_cell.expand(1, 1, h, w).contiguous()
    boxes = torch.tensor([[[10.0, 30.0, 42.0, 90.0]]])  # x from 10 to 42: bin centres 12, 16, ..., 40
    pooled = roi_pool(feature_map, boxes, CROP, output_size=8)
    assert pooled.shape == (1, 1, 1, 8, 8)
    expected = 10 + (torch.arange(8) + 0.5) * 4
    assert torch.allclose(pooled[0, 0, 0], expected.expand(8, 8), atol=1e-4)


def test_roi_pool_gradcheck_in_box_coordinates():
    generator = torch.Generator().manual_seed(1)
    feature_map = torch.randn(2, 3, 7, 5, dtype=torch.float64, generator=generator)
    low = torch.rand(2, 6, 2, dtype=torch.float64, generator=generator) * torch.tensor([30.0, 60.0])
    size = 5 + torch.rand(2, 6, 2, dtype=torch.float64, generator=generator) * 25
    boxes = torch.cat([low, low + size], dim=-1).requires_grad_(True)
    feature_map.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, b: roi_pool(m, b, CROP, output_size=3), (feature_map, boxes))


def test_keypoint_head_starts_at_the_canonical_pose():
    head = KeypointHead(channels=16)
    joints = head(torch.randn(3, 16, 16, 8), CROP)
    canonical = torch.tensor(CANONICAL_POSE) * torch.tensor([CROP[1], CROP[0]])
    cell = torch.tensor([CROP[1] / 8, CROP[0] / 16])
    assert joints.shape == (3, 14, 3)
    assert ((joints[..., :2] - canonical).abs() <= cell).all()


def test_learned_joints_receive_gradient_through_roi_pooling():
    head = KeypointHead(channels=16)
    low_map = torch.randn(2, 16, 16, 8)
    boxes = part_boxes(head(low_map, CROP), CROP)
    roi_pool(low_map, boxes, CROP).square().sum().backward()
    grad = head.heatmaps[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_keypoints_pose_source_without_keypoints_names_the_fix():
    source = PoseSource("keypoints", channels=16)
    with pytest.raises(ValueError, match="pose_source=learned"):
        source(torch.randn(2, 16, 16, 8), CROP, None)


def test_prior_pose_source_gives_the_canonical_pose():
    joints = PoseSource("prior", channels=16)(torch.randn(4, 16, 16, 8), CROP, None)
    assert torch.equal(joints, canonical_joints(CROP).expand(4, -1, -1))


def test_unknown_pose_source_is_rejected():
    with pytest.raises(ValueError, match="pose_source"):
        PoseSource("openpose", channels=16)
