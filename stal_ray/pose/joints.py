"""The paper's 14 joints (model/parts.py JOINT_NAMES, §III-B) from the landmarks of a person-pose model.

BlazePose (33 landmarks) and COCO-style models (17 keypoints: RTMPose, and the first 17 of COCO-WholeBody's
133 and of Halpe's 26) have shoulders, elbows, wrists, hips, knees and ankles, but no head top or neck:

* neck: MPII's upper neck (the paper's estimator is MPII-trained), between the shoulder line and the head:
  the shoulder midpoint S moved toward the head's centre C (mean of nose, eyes and ears) by NECK_SHARE of
  S->C. Confidence: the lower of the two shoulders'. Halpe-26's own neck when the model has it.
* head top = C extrapolated away from S by HEAD_TOP_EXTENT of S->C. Confidence: the lower of the head points'
  mean and the neck's. Halpe-26's own head top when the model has it.

Both shares are anthropometric: in an adult of 170 cm the acromion (shoulder line) is at ~139 cm, the upper
neck just below the chin at ~145, the centre of eyes, ears and nose at ~156 and the vertex at 170, so the
upper neck sits ~0.35 and the crown ~0.8 of S->C beyond S and C.
"""

import numpy as np

from stal_ray.core.skeleton import JOINT_NAMES

# the named body points both kinds of model have, as indices into their landmark lists
BLAZEPOSE_POINTS = {
    "nose": 0, "left_eye": 2, "right_eye": 5, "left_ear": 7, "right_ear": 8,
    "left_shoulder": 11, "right_shoulder": 12, "left_elbow": 13, "right_elbow": 14,
    "left_wrist": 15, "right_wrist": 16, "left_hip": 23, "right_hip": 24,
    "left_knee": 25, "right_knee": 26, "left_ankle": 27, "right_ankle": 28,
}  # fmt: skip
BLAZEPOSE_LANDMARKS = 33
COCO_POINTS = {
    "nose": 0, "left_eye": 1, "right_eye": 2, "left_ear": 3, "right_ear": 4,
    "left_shoulder": 5, "right_shoulder": 6, "left_elbow": 7, "right_elbow": 8,
    "left_wrist": 9, "right_wrist": 10, "left_hip": 11, "right_hip": 12,
    "left_knee": 13, "right_knee": 14, "left_ankle": 15, "right_ankle": 16,
}  # fmt: skip
HALPE_HEAD, HALPE_NECK = 17, 18  # Halpe-26: the first 17 are COCO's, then head top, neck, hip centre
HEAD_POINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear")
NECK_SHARE = 0.35  # upper neck from the shoulder midpoint toward the head's centre (module docstring)
HEAD_TOP_EXTENT = 0.8  # crown beyond the head's centre, in shoulder-midpoint-to-centre distances


def points_for(landmarks: int) -> dict[str, int]:
    """The named points of a model with `landmarks` outputs; ValueError for a layout this does not know."""
    if landmarks == BLAZEPOSE_LANDMARKS:
        return BLAZEPOSE_POINTS
    if landmarks >= len(COCO_POINTS):
        return COCO_POINTS
    raise ValueError(f"a pose model with {landmarks} keypoints: expected BlazePose's 33 or a COCO layout "
                     "(17 body keypoints first: COCO 17, Halpe 26, COCO-WholeBody 133)")


def to_joints(landmarks: np.ndarray) -> np.ndarray:
    """(..., L, 3) landmarks (x, y, confidence) of a BlazePose or COCO-layout model -> (..., 14, 3) joints
    in JOINT_NAMES order, in the same pixels."""
    landmarks = np.asarray(landmarks, np.float32)
    points = points_for(landmarks.shape[-2])
    out = np.zeros((*landmarks.shape[:-2], len(JOINT_NAMES), 3), np.float32)
    for j, name in enumerate(JOINT_NAMES):
        if name in points:
            out[..., j, :] = landmarks[..., points[name], :]
    neck_index, top_index = JOINT_NAMES.index("neck"), JOINT_NAMES.index("head_top")
    left, right = landmarks[..., points["left_shoulder"], :], landmarks[..., points["right_shoulder"], :]
    shoulders = (left[..., :2] + right[..., :2]) / 2
    head = landmarks[..., [points[name] for name in HEAD_POINTS], :]
    centre = head[..., :2].mean(axis=-2)
    neck = np.concatenate([shoulders + NECK_SHARE * (centre - shoulders),
                           np.minimum(left[..., 2:], right[..., 2:])], axis=-1)
    top = centre + HEAD_TOP_EXTENT * (centre - shoulders)
    top_confidence = np.minimum(head[..., 2].mean(axis=-1), neck[..., 2])
    out[..., neck_index, :] = neck
    out[..., top_index, :] = np.concatenate([top, top_confidence[..., None]], axis=-1)
    if landmarks.shape[-2] == 26:  # Halpe: the model's own head top and neck
        out[..., top_index, :] = landmarks[..., HALPE_HEAD, :]
        out[..., neck_index, :] = landmarks[..., HALPE_NECK, :]
    return out
