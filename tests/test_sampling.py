"""Tests of data.sampling: restricted random sampling and identity rows cut into K-clip groups."""

import numpy as np
import pytest

from stal_ray.data.stream.sampling import identity_groups, restricted_random_sample, sequence_of_length


def frames_of(lengths: list[int]) -> np.ndarray:
    """tracklet_of_frame for an identity whose tracklets 10, 11, ... have these lengths."""
    return np.concatenate([np.full(n, 10 + i) for i, n in enumerate(lengths)])


@pytest.mark.parametrize("num_frames", [8, 9, 30, 100])
def test_restricted_random_sample_takes_one_frame_per_chunk(num_frames):
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, num_frames, 9).astype(int)
    for _ in range(20):
        clip = restricted_random_sample(num_frames, 8, rng)
        assert clip.shape == (8,)
        assert ((clip >= bounds[:-1]) & (clip < bounds[1:])).all()


def test_restricted_random_sample_repeats_short_tracklets_in_order():
    clip = restricted_random_sample(3, 8, np.random.default_rng(0))
    assert clip.tolist() == sorted(clip.tolist())
    assert set(clip.tolist()) == {0, 1, 2}


def test_groups_have_k_sorted_in_range_clips():
    tracklet_of_frame = frames_of([20, 35, 9, 50])
    for group in identity_groups(tracklet_of_frame, 4, 8, np.random.default_rng(1)):
        assert group.shape == (4, 8)
        assert (group >= 0).all() and (group < len(tracklet_of_frame)).all()
        assert (np.diff(group, axis=1) >= 0).all()
        # a clip stays inside one tracklet
        assert all(len(set(tracklet_of_frame[clip])) == 1 for clip in group)


def test_group_clips_come_from_distinct_tracklets_when_possible():
    tracklet_of_frame = frames_of([120, 10, 12, 9, 40])  # the long one must not fill two slots
    groups = identity_groups(tracklet_of_frame, 4, 8, np.random.default_rng(2))
    for group in groups:
        assert len({tracklet_of_frame[clip[0]] for clip in group}) == 4


def test_group_count_and_coverage_over_one_epoch():
    tracklet_of_frame = frames_of([64, 32, 48, 16, 40])
    groups = identity_groups(tracklet_of_frame, 4, 8, np.random.default_rng(3))
    assert len(groups) == round(len(tracklet_of_frame) / 32)
    used = np.concatenate([g.ravel() for g in groups])
    # every frame used about once: most frames used, few used twice
    assert len(np.unique(used)) >= 0.9 * len(tracklet_of_frame)
    assert np.bincount(used).max() <= 2


def test_every_tracklet_used_over_one_epoch():
    tracklet_of_frame = frames_of([30, 8, 50, 12, 9, 70])
    groups = identity_groups(tracklet_of_frame, 2, 8, np.random.default_rng(4))
    used = {tracklet_of_frame[g[0]] for group in groups for g in group}
    assert used == set(np.unique(tracklet_of_frame))


def test_single_tracklet_identity_gives_k_disjoint_clips():
    groups = identity_groups(frames_of([40]), 4, 8, np.random.default_rng(5))
    assert len(groups) == 1 and groups[0].shape == (4, 8)
    assert len(np.unique(groups[0])) == 32  # 4 clips x 8 frames, all different


def test_identity_with_fewer_than_t_frames():
    groups = identity_groups(frames_of([2, 3]), 4, 8, np.random.default_rng(6))
    assert len(groups) == 1 and groups[0].shape == (4, 8)
    assert (groups[0] < 5).all() and (np.diff(groups[0], axis=1) >= 0).all()


@pytest.mark.parametrize("num_frames, length", [(30, 8), (8, 8), (5, 8), (1, 4)])
def test_a_sequence_of_length_l_is_drawn_as_the_paper_tests_sequence_lengths(num_frames, length):
    positions = sequence_of_length(num_frames, length, np.random.default_rng(0))
    assert len(positions) == length and (np.diff(positions) >= 0).all()
    assert positions.min() >= 0 and positions.max() < num_frames
    if num_frames >= length:  # L distinct frames
        assert len(set(positions.tolist())) == length
    else:  # every frame, the rest repeats
        assert set(positions.tolist()) == set(range(num_frames))


def test_a_large_identity_gives_at_most_max_groups_and_other_frames_next_epoch():
    # like MARS's largest identities: thousands of frames in many tracklets
    lengths = [40 + 17 * i for i in range(60)]
    tracklet_of_frame = frames_of(lengths)
    uncapped = identity_groups(tracklet_of_frame, 4, 8, np.random.default_rng(0))
    assert len(uncapped) == round(len(tracklet_of_frame) / 32) > 32
    epochs = [identity_groups(tracklet_of_frame, 4, 8, np.random.default_rng([0, epoch, 7]), max_groups=32)
              for epoch in range(2)]
    for groups in epochs:
        assert len(groups) == 32
        for group in groups:  # still K clips of K different tracklets, T sorted frames each
            assert group.shape == (4, 8) and len(set(tracklet_of_frame[group[:, 0]])) == 4
            assert (np.diff(group, axis=1) >= 0).all()
    taken = [set(np.concatenate(groups).ravel()) for groups in epochs]
    assert len(taken[0] ^ taken[1]) > len(taken[0]) // 2  # the next epoch mostly sees other frames
    # clips in proportion to frames: the longest tracklets give the most
    per_tracklet = np.bincount(tracklet_of_frame[np.concatenate(epochs[0])[:, 0]] - 10, minlength=60)
    assert per_tracklet[-10:].sum() > per_tracklet[:10].sum()


def test_a_small_identity_is_not_changed_by_the_cap():
    tracklet_of_frame = frames_of([12, 20, 9])
    plain = identity_groups(tracklet_of_frame, 2, 4, np.random.default_rng(3))
    capped = identity_groups(tracklet_of_frame, 2, 4, np.random.default_rng(3), max_groups=32)
    assert len(plain) == len(capped) and all((a == b).all() for a, b in zip(plain, capped, strict=True))
