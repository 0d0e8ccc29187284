"""Training augmentation (data.augment): one draw per clip for all its T frames, keypoints following the
frames (mirrored with left/right swapped, shifted, hidden when cropped out or erased), seeded draws, and
every switch off = the pipeline's groups unchanged."""

import numpy as np
import pytest

from stal_ray.config import load_config
from stal_ray.core.skeleton import JOINT_NAMES
from stal_ray.data.stream.augment import MIRRORED_JOINTS, Augmentation

ROWS, K, T, H, W = 3, 2, 4, 16, 8


def batch(seed=0):
    """Frames with distinct pixels (so any move shows), the same in all T frames, and visible joints."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(1, 255, (ROWS, K, 1, H, W, 3), dtype=np.uint8)
    clips = np.repeat(frame, T, axis=2)
    keypoints = np.zeros((ROWS, K, T, 14, 3), np.float32)
    keypoints[..., 0] = rng.uniform(1, W - 1, (ROWS, K, 1, 14))
    keypoints[..., 1] = rng.uniform(1, H - 1, (ROWS, K, 1, 14))
    keypoints[..., 2] = 1.0
    return clips, keypoints, np.array([5, 9, 12]), np.array([0, 1, 0])


def test_mirrored_joints_swap_every_left_joint_with_its_right_partner():
    for index, name in enumerate(JOINT_NAMES):
        partner = JOINT_NAMES[MIRRORED_JOINTS[index]]
        assert partner == name.replace("left", "@").replace("right", "left").replace("@", "right")


def test_every_switch_off_builds_no_augmentation():
    assert Augmentation.from_config(load_config(None), epoch=0) is None


def test_a_flipped_clip_is_flipped_in_all_frames_with_its_joints_mirrored_and_swapped():
    clips, keypoints, identities, groups = batch()
    out, joints = Augmentation(flip=True, seed=1)(clips.copy(), keypoints.copy(), identities, groups)
    flipped = np.all(out == clips[..., ::-1, :], axis=(2, 3, 4, 5))
    kept = np.all(out == clips, axis=(2, 3, 4, 5))
    assert (flipped | kept).all() and flipped.any() and kept.any()  # every clip all-or-nothing, both occur
    for row, clip in zip(*np.nonzero(flipped), strict=True):
        expected = keypoints[row, clip][:, MIRRORED_JOINTS]
        np.testing.assert_allclose(joints[row, clip, ..., 0], W - expected[..., 0])
        np.testing.assert_allclose(joints[row, clip, ..., 1:], expected[..., 1:])
        # the left wrist of the mirrored image is where the right wrist was, mirrored
        right, left = JOINT_NAMES.index("right_wrist"), JOINT_NAMES.index("left_wrist")
        assert joints[row, clip, 0, left, 0] == pytest.approx(W - keypoints[row, clip, 0, right, 0])


def test_pad_and_crop_shifts_all_frames_and_their_joints_alike():
    clips, keypoints, identities, groups = batch()
    pad = 3
    out, joints = Augmentation(crop_padding=pad, seed=2)(clips.copy(), keypoints.copy(), identities, groups)
    moved = 0
    for row in range(ROWS):
        for clip in range(K):
            # find the shift that explains the output: the same for the T frames
            found = []
            for dy in range(-pad, pad + 1):
                for dx in range(-pad, pad + 1):
                    padded = np.zeros((T, H + 2 * pad, W + 2 * pad, 3), np.uint8)
                    padded[:, pad:pad + H, pad:pad + W] = clips[row, clip]
                    crop = padded[:, pad - dy:pad - dy + H, pad - dx:pad - dx + W]
                    if np.array_equal(out[row, clip], crop):
                        found.append((dy, dx))
            assert len(found) == 1
            dy, dx = found[0]
            moved += (dy, dx) != (0, 0)
            x, y = keypoints[row, clip, ..., 0] + dx, keypoints[row, clip, ..., 1] + dy
            np.testing.assert_allclose(joints[row, clip, ..., 0], x)
            np.testing.assert_allclose(joints[row, clip, ..., 1], y)
            inside = (x >= 0) & (x <= W) & (y >= 0) & (y <= H)
            np.testing.assert_array_equal(joints[row, clip, ..., 2], np.where(inside, 1.0, 0.0))
    assert moved


def test_an_erased_rectangle_is_the_same_in_all_frames_and_hides_its_joints():
    clips, keypoints, identities, groups = batch()
    out, joints = Augmentation(random_erasing=1.0, seed=3)(clips.copy(), keypoints.copy(), identities, groups)
    for row in range(ROWS):
        for clip in range(K):
            changed = np.any(out[row, clip] != clips[row, clip], axis=-1)  # (T, H, W)
            assert changed.any()
            assert (changed == changed[0]).all()  # the same region in every frame
            ys, xs = np.nonzero(changed[0])
            top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            region = out[row, clip, :, top:bottom, left:right].reshape(-1, 3)
            assert (region == region[0]).all()  # one colour
            x, y = keypoints[row, clip, ..., 0], keypoints[row, clip, ..., 1]
            covered = (x > left) & (x < right) & (y > top) & (y < bottom)
            assert (joints[row, clip, ..., 2][covered] == 0).all()
            assert (joints[row, clip, ..., :2] == keypoints[row, clip, ..., :2]).all()


def test_colour_jitter_changes_a_clip_the_same_way_in_all_frames():
    clips, keypoints, identities, groups = batch()
    out, joints = Augmentation(color_jitter=0.3, seed=4)(clips.copy(), keypoints.copy(), identities, groups)
    assert (out == out[:, :, :1]).all()  # the frames were equal, and stay equal to each other
    assert not np.array_equal(out, clips)
    np.testing.assert_array_equal(joints, keypoints)


def test_draws_depend_on_seed_epoch_identity_and_group_only():
    clips, keypoints, identities, groups = batch()
    every = dict(flip=True, crop_padding=2, color_jitter=0.2, random_erasing=0.5)
    first = Augmentation(**every, seed=7)(clips.copy(), keypoints.copy(), identities, groups)
    again = Augmentation(**every, seed=7)(clips.copy(), keypoints.copy(), identities, groups)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # the rows in another order (another decoding task's batch) get the same augmentation each
    order = np.array([2, 0, 1])
    shuffled = Augmentation(**every, seed=7)(clips[order].copy(), keypoints[order].copy(), identities[order],
                                             groups[order])
    np.testing.assert_array_equal(shuffled[0], first[0][order])
    other_epoch = Augmentation(**every, seed=7, epoch=1)(clips.copy(), keypoints.copy(), identities, groups)
    assert not np.array_equal(other_epoch[0], first[0])
