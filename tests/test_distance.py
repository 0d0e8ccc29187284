"""Test distances: Eq. 8 against psi_distance and a plain double loop, every mode's features and weights,
fusion, chunking, indexing and the errors."""

import numpy as np
import pytest
import torch

from stal_ray.evaluate.distance import (
    MODES,
    TrackletFeatures,
    branch_distances,
    fuse,
    fused_distance,
)
from stal_ray.objective import aggregate_temporal, local_distance, psi_distance, spatial_scores


def frame_level(n: int, t: int = 5, r: int = 6, d: int = 16, seed: int = 0, dtype=torch.float64):
    """Frame-level part features f (N, T, R, D), positive scores a (N, T, R), global features (N, T, Dg)."""
    generator = torch.Generator().manual_seed(seed)
    f = torch.randn(n, t, r, d, generator=generator, dtype=dtype)
    a = torch.rand(n, t, r, generator=generator, dtype=dtype) + 0.05
    g_t = torch.randn(n, t, 2 * d, generator=generator, dtype=dtype)
    return f, a, g_t


def tracklet_features(f, a, g_t) -> TrackletFeatures:
    """What feature extraction computes over all frames of each tracklet."""
    per_frame = a.mean(2, keepdim=True).expand_as(a)  # a frame's score, shared by its parts
    return TrackletFeatures(
        g=g_t.mean(1),
        f_attended=aggregate_temporal(f, a),
        f_temporal=aggregate_temporal(f, per_frame),
        f_mean=f.mean(1),
        part_scores=a.mean(1),
    )


def double_loop(f_q, an_q, g_q, f_g, an_g, g_g):
    """d_l (Eq. 8) and d_g one pair at a time."""
    d_l = torch.zeros(len(f_q), len(f_g), dtype=f_q.dtype)
    d_g = torch.zeros_like(d_l)
    for i in range(len(f_q)):
        for j in range(len(f_g)):
            for r in range(f_q.shape[1]):
                d_l[i, j] += an_q[i, r] * an_g[j, r] * (f_q[i, r] - f_g[j, r]).norm()
            d_g[i, j] = (g_q[i] - g_g[j]).norm()
    return d_l, d_g


@pytest.fixture(scope="module")
def pair():
    """Query and gallery features (float64) and their frame-level inputs."""
    query_inputs, gallery_inputs = frame_level(7, seed=1), frame_level(11, seed=2)
    return query_inputs, gallery_inputs, tracklet_features(*query_inputs), tracklet_features(*gallery_inputs)


def normalised(part_norm: str):
    """Eq. 8's an = ā / ||ā|| written out, for TrackletFeatures rows."""
    if part_norm == "l1":
        return lambda x: x.part_scores / x.part_scores.sum(dim=1, keepdim=True)
    return lambda x: x.part_scores / x.part_scores.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("part_norm", ["l1", "l2"])
def test_stal_local_distance_is_psi_distance(pair, part_norm):
    _, _, query, gallery = pair
    d_l, _ = branch_distances(query, gallery, "stal", device="cpu", part_norm=part_norm)
    an = normalised(part_norm)
    expected = psi_distance(query.f_attended, an(query), gallery.f_attended, an(gallery))
    torch.testing.assert_close(d_l, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("part_norm", ["l1", "l2"])
@pytest.mark.parametrize("mode", ["stal", "tan", "san", "baseline"])
def test_every_mode_equals_a_double_loop(pair, mode, part_norm):
    _, _, query, gallery = pair
    r = query.part_scores.shape[1]
    uniform = lambda x: torch.full_like(x.part_scores, 1 / r if part_norm == "l1" else r**-0.5)  # noqa: E731
    features, weights = {"stal": ("f_attended", normalised(part_norm)), "tan": ("f_temporal", uniform),
                         "san": ("f_mean", normalised(part_norm)), "baseline": ("f_mean", uniform)}[mode]
    expected = double_loop(getattr(query, features), weights(query), query.g,
                           getattr(gallery, features), weights(gallery), gallery.g)
    d_l, d_g = branch_distances(query, gallery, mode, device="cpu", part_norm=part_norm)
    torch.testing.assert_close(d_l, expected[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(d_g, expected[1], rtol=1e-10, atol=1e-10)


def test_baseline_is_average_pooling_with_uniform_weights(pair):
    (f_q, a_q, _), (f_g, a_g, _), query, gallery = pair
    d_l, _ = branch_distances(query, gallery, "baseline", device="cpu")
    # all attention scores 1: Eq. 9 is the plain average over frames and Eq. 8 weighs parts equally
    expected = local_distance(f_q, torch.ones_like(a_q), f_g, torch.ones_like(a_g))
    torch.testing.assert_close(d_l, expected, rtol=1e-10, atol=1e-10)


def test_stal_equals_the_training_local_distance(pair):
    (f_q, a_q, _), (f_g, a_g, _), query, gallery = pair
    d_l, _ = branch_distances(query, gallery, "stal", device="cpu")
    torch.testing.assert_close(d_l, local_distance(f_q, a_q, f_g, a_g), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(query.parts("stal")[1], spatial_scores(a_q))


def test_chunked_distances_equal_one_pass(pair):
    _, _, query, gallery = pair
    whole = branch_distances(query, gallery, "stal", chunk_size=512, device="cpu")
    for chunk_size in (1, 3):
        chunked = branch_distances(query, gallery, "stal", chunk_size=chunk_size, device="cpu")
        for one, other in zip(whole, chunked, strict=True):
            torch.testing.assert_close(one, other, rtol=1e-12, atol=1e-12)


def test_fuse_picks_the_branches_of_each_mode(pair):
    _, _, query, gallery = pair
    for mode in MODES:
        d_l, d_g = branch_distances(query, gallery, mode, device="cpu")
        fused = fused_distance(query, gallery, mode, alpha=0.7, device="cpu")
        expected = {"global": d_g, "local": d_l}.get(mode, d_l + 0.7 * d_g)
        torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fuse(d_l, d_g, mode, 0.7), expected)
    stal_local, _ = branch_distances(query, gallery, "stal", device="cpu")
    torch.testing.assert_close(fused_distance(query, gallery, "local", device="cpu"), stal_local)


def test_float32_features_give_float32_cpu_distances_with_zero_self_distance():
    features = tracklet_features(*frame_level(9, d=64, dtype=torch.float32))
    d_l, d_g = branch_distances(features, features)
    for d in (d_l, d_g):
        assert d.dtype == torch.float32 and d.device.type == "cpu" and d.shape == (9, 9)
        assert not d.isnan().any() and (d >= 0).all()
        # the expansion ||x||² + ||y||² − 2x·y leaves rounding noise, not a distance
        assert d.diagonal().max() < 1e-2 * d.max()


def test_indexing_applies_to_every_field(pair):
    _, _, query, _ = pair
    for index in (np.array([4, 0, 2]), torch.tensor([4, 0, 2]), [4, 0, 2]):
        picked = query[index]
        assert len(picked) == 3
        torch.testing.assert_close(picked.f_temporal, query.f_temporal[[4, 0, 2]])
        torch.testing.assert_close(picked.part_scores, query.part_scores[[4, 0, 2]])
    mask = np.arange(len(query)) % 2 == 0
    torch.testing.assert_close(query[mask].g, query.g[torch.from_numpy(mask)])
    assert len(query[2:5]) == 3
    torch.testing.assert_close(query[3].f_mean, query.f_mean[3:4])
    torch.testing.assert_close(query[-1].f_mean, query.f_mean[-1:])


def test_unknown_mode_is_refused_with_the_allowed_ones(pair):
    _, _, query, gallery = pair
    with pytest.raises(ValueError, match=r"'fused'.*stal, baseline, tan, san, global, local"):
        branch_distances(query, gallery, "fused")
    with pytest.raises(ValueError, match="'fused'"):
        fuse(torch.zeros(1, 1), torch.zeros(1, 1), "fused", 0.3)


def test_mismatched_parts_are_refused_with_both_shapes(pair):
    _, _, query, _ = pair
    other = tracklet_features(*frame_level(4, r=5))
    with pytest.raises(ValueError, match=r"\(7, 6, 16\).*\(4, 5, 16\)"):
        branch_distances(query, other)


def test_inconsistent_fields_are_refused():
    f, g = torch.zeros(3, 6, 8), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="part_scores"):
        TrackletFeatures(g=g, f_attended=f, f_temporal=f, f_mean=f, part_scores=torch.ones(3, 5))
    with pytest.raises(ValueError, match=">= 0"):
        TrackletFeatures(g=g, f_attended=f, f_temporal=f, f_mean=f, part_scores=-torch.ones(3, 6))
