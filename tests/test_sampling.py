"""Tests of data.sampling: restricted random sampling, identity rows cut into K-clip groups, and the
epoch's plan (mixing, cap rotation, weighting)."""

import math

import numpy as np
import pytest

from stal_ray.data.stream.sampling import (
    epoch_plan,
    identity_groups,
    interleave,
    restricted_random_sample,
    rotation,
    sequence_of_length,
)


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


def clip_tracklets(groups, tracklet_of_frame) -> set:
    return {int(t) for group in groups for t in tracklet_of_frame[group[:, 0]]}


@pytest.mark.parametrize("tracklets, clips", [(271, 128), (186, 128), (10, 3), (9, 3), (100, 99)])
def test_rotation_covers_every_tracklet_within_each_cycle_and_any_2m_minus_1_epochs(tracklets, clips):
    m = math.ceil(tracklets / clips)
    taken = [rotation(tracklets, clips, epoch, (5, 9)) for epoch in range(4 * m)]
    for chosen in taken:
        assert len(chosen) == len(set(chosen.tolist())) == clips  # one clip each, distinct tracklets
    for cycle in range(4):
        assert set(np.concatenate(taken[cycle * m:(cycle + 1) * m]).tolist()) == set(range(tracklets))
    for start in range(len(taken) - (2 * m - 1) + 1):
        assert set(np.concatenate(taken[start:start + 2 * m - 1]).tolist()) == set(range(tracklets))
    assert not all((taken[0] == taken[m]).all() for _ in [0]) or m == 1  # cycles draw new permutations


def test_the_cap_no_longer_drops_the_same_tracklets_every_epoch():
    """MARS's identity 5: 271 tracklets, more than K·32 = 128 clips: every tracklet within 3 epochs."""
    rng = np.random.default_rng(0)
    tracklet_of_frame = frames_of(rng.integers(5, 120, 271).tolist())
    seen = set()
    for epoch in range(3):
        groups = identity_groups(tracklet_of_frame, 4, 8, np.random.default_rng([0, epoch, 5]), max_groups=32,
                                 epoch=epoch, seed=(0, 5))
        assert len(groups) == 32
        for group in groups:  # K clips of K different tracklets, T sorted frames each
            assert len(set(tracklet_of_frame[group[:, 0]].tolist())) == 4
            assert (np.diff(group, axis=1) >= 0).all()
        this = clip_tracklets(groups, tracklet_of_frame)
        assert len(this) == 128
        seen |= this
    assert seen == set(np.unique(tracklet_of_frame).tolist())


def identities_of(count: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out, row = {}, 0
    for identity in range(1, count + 1):
        lengths = rng.integers(3, 60, rng.integers(1, 12))
        out[identity] = np.repeat(np.arange(row, row + len(lengths)), lengths)
        row += len(lengths)
    return out


def plan(tracklets, **overrides):
    settings = dict(clips_per_identity=2, seq_len=4, identities_per_batch=4, seed=3, epoch=1, max_groups=6)
    return epoch_plan(tracklets, **{**settings, **overrides})


def test_global_mixing_does_not_depend_on_how_rows_sit_in_the_files():
    tracklets = identities_of(60)
    sorted_order = plan(tracklets, stored_order=sorted(tracklets))
    reversed_order = plan(tracklets, stored_order=sorted(tracklets, reverse=True))
    np.testing.assert_array_equal(sorted_order.identity, reversed_order.identity)
    np.testing.assert_array_equal(sorted_order.positions, reversed_order.positions)
    # the shards' order, by contrast, follows the files
    shards = plan(tracklets, mixing="shards", stored_order=sorted(tracklets))
    assert (np.diff(shards.identity) >= 0).all()
    assert not (np.diff(sorted_order.identity) >= 0).all()


def test_a_batch_draws_p_identities_from_all_of_them():
    """Runs of P in the plan hold P distinct identities, spread over identity order like a uniform draw."""
    tracklets = identities_of(200)
    order = plan(tracklets, epoch=0)
    spreads, runs, total = [], 0, 0
    for window in np.unique(order.window):
        identities = order.identity[order.window == window]
        for start in range(0, len(identities) - 3, 4):  # the window's runs of P, from its start
            members = identities[start:start + 4]
            total += 1
            if len(set(members.tolist())) == 4:
                runs += 1
                spreads.append(np.abs(members[:, None] - members[None, :])[np.triu_indices(4, 1)].mean())
    assert runs >= 0.95 * total
    assert 0.30 < np.mean(spreads) / 200 < 0.37  # a uniform draw: (N + 1) / 3N
    # every group of the epoch once, windows consecutive
    assert (np.diff(order.window) >= 0).all()
    shards = plan(tracklets, epoch=0, mixing="shards")
    assert sorted(zip(shards.identity.tolist(), shards.group.tolist(), strict=True)) == \
        sorted(zip(order.identity.tolist(), order.group.tolist(), strict=True))


def test_the_same_seed_gives_the_same_plan_and_another_epoch_another():
    tracklets = identities_of(40)
    a, b, c = plan(tracklets), plan(tracklets), plan(tracklets, epoch=2)
    np.testing.assert_array_equal(a.identity, b.identity)
    np.testing.assert_array_equal(a.positions, b.positions)
    assert not np.array_equal(a.identity[:20], c.identity[:20])


def test_identity_weighting_gives_every_identity_the_same_groups():
    tracklets = identities_of(50)
    frames = plan(tracklets, weighting="frames")
    identities = plan(tracklets, weighting="identities")
    assert len(set(np.bincount(identities.identity)[1:].tolist())) == 1
    assert len(set(np.bincount(frames.identity)[1:].tolist())) > 1
    assert abs(len(identities) - len(frames)) <= 50


def test_interleave_keeps_every_group_and_leaves_the_remainder_round_robin():
    counts = np.array([1, 5, 2, 9, 3])
    order = interleave(counts, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(order, minlength=5), counts)
    full = len(order) - len(order) % 3
    assert all(len(set(order[s:s + 3].tolist())) == 3 for s in range(0, full - 6, 3))


def test_neighbour_windows_hold_consecutive_identities_in_a_new_cut_every_epoch():
    """mixing: neighbours: each window is a stretch of consecutive identity numbers (cyclic), every identity
    in one window per epoch, batches of P distinct identities from within the stretch; the cut and the
    windows' order change with the epoch."""
    tracklets = identities_of(60)
    ids = sorted(tracklets)
    starts = []
    for epoch in (0, 1):
        order = plan(tracklets, epoch=epoch, mixing="neighbours")
        firsts = []
        for window in range(int(order.window.max()) + 1):
            members = np.unique(order.identity[order.window == window])
            positions = sorted(ids.index(int(i)) for i in members)
            gaps = np.diff(positions)
            # consecutive, or consecutive across the wrap from the last identity to the first
            assert (gaps == 1).all() or (sorted(gaps.tolist())[:-1] == [1] * (len(gaps) - 1))
            firsts.append(int(order.identity[order.window == window][0]))
            run = order.identity[order.window == window][:4]
            assert len(set(run.tolist())) == 4
        assert sorted(np.unique(order.identity).tolist()) == ids
        starts.append(firsts)
    assert starts[0] != starts[1]
    global_plan = plan(tracklets, epoch=0)
    neighbours = plan(tracklets, epoch=0, mixing="neighbours")
    assert sorted(zip(neighbours.identity.tolist(), neighbours.group.tolist(), strict=True)) == \
        sorted(zip(global_plan.identity.tolist(), global_plan.group.tolist(), strict=True))
