"""The skeleton every layer shares, with no torch: the paper's 14 joints (§III-B), its six parts (Eq. 7's
P_r), the canonical standing pose and the left-right mirror map. model/parts.py turns it into tensors; the
stream, the synthetic generator, pose estimation and the prepared format's keypoint column use it as is."""

# The 14 joints of the pose estimator the paper uses ([28], MPII-trained), in its order: J1 .. J14.
JOINT_NAMES = (
    "head_top", "neck",
    "right_shoulder", "right_elbow", "right_wrist",
    "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle",
    "left_hip", "left_knee", "left_ankle",
)  # fmt: skip
NUM_JOINTS = len(JOINT_NAMES)

# The paper's assignment (§III-B), 1-based as printed. Its text calls both P5 and P6 "right leg"; by the joint
# order above P5 = [J12, J13, J14] is the left leg and P6 = [J9, J10, J11] the right leg.
PART_JOINTS = (
    ("head", (1, 2, 3, 6)),
    ("torso", (2, 3, 6, 9, 12)),
    ("right_arm", (3, 4, 5)),
    ("left_arm", (6, 7, 8)),
    ("left_leg", (12, 13, 14)),
    ("right_leg", (9, 10, 11)),
)
PART_NAMES = tuple(name for name, _ in PART_JOINTS)
NUM_PARTS = len(PART_JOINTS)

# A standing pedestrian facing the camera, as (x, y) fractions of the crop; the `prior` pose source and the
# starting point of the `learned` one. Person's right is image left.
CANONICAL_POSE = (
    (0.50, 0.04), (0.50, 0.17),
    (0.34, 0.21), (0.29, 0.36), (0.27, 0.50),
    (0.66, 0.21), (0.71, 0.36), (0.73, 0.50),
    (0.41, 0.53), (0.40, 0.73), (0.39, 0.94),
    (0.59, 0.53), (0.60, 0.73), (0.61, 0.94),
)  # fmt: skip


def _mirror(name: str) -> str:
    return name.replace("left_", "@").replace("right_", "left_").replace("@", "right_")


# The joint order after a left-right flip: each left joint takes its right partner's place and back.
MIRRORED_JOINTS = tuple(JOINT_NAMES.index(_mirror(name)) for name in JOINT_NAMES)
