"""CMC and mAP: the vectorised ranking against torchreid's per-query loop, a hand-computed example, the
query/gallery split of both protocols and the errors."""

import numpy as np
import pytest
import torch

from stal_ray.evaluate.ranking import RankingResult, evaluate_ranking, query_gallery_split


def reference_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """torchreid's eval_func (metrics/rank.py, eval_market1501) as it is written, a plain loop over queries,
    with a stable sort so that ties keep gallery order. Returns (cmc_curve, per-query AP, skipped queries).
    Also the reference of bench/ranking.py."""
    num_q, num_g = distmat.shape
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, skipped = [], [], 0
    for q_idx in range(num_q):
        q_pid, q_camid = q_pids[q_idx], q_camids[q_idx]
        order = indices[q_idx]
        remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
        keep = np.invert(remove)
        raw_cmc = matches[q_idx][keep]
        if not np.any(raw_cmc):
            skipped += 1
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = [x / (i + 1.0) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * raw_cmc
        all_ap.append(tmp_cmc.sum() / num_rel)
    return np.asarray(all_cmc, dtype=np.float64).mean(0), np.asarray(all_ap), skipped


def random_problem(seed: int, num_q: int = 40, num_g: int = 300, levels: int = 6):
    """Integer distances (many ties, some infinite), distractors (0) in the gallery and queries whose
    identity is absent from the gallery or seen only by their own camera."""
    rng = np.random.default_rng(seed)
    g_pids = rng.integers(0, 16, num_g)  # 0: distractors
    g_cams = rng.integers(1, 5, num_g)
    q_pids = rng.integers(1, 21, num_q)  # 16..20: nobody in the gallery
    q_cams = rng.integers(1, 5, num_q)
    q_pids[0], q_cams[0] = 15, 1
    g_cams[g_pids == 15] = 1  # identity 15 only in camera 1: query 0 has no true match
    dist = rng.integers(0, levels, (num_q, num_g)).astype(np.float64)
    dist[rng.random(dist.shape) < 0.02] = np.inf
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [7, 256])
def test_matches_torchreid_loop_on_tied_distances(seed, chunk_size):
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(seed)
    cmc_curve, average_precision, skipped = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams)
    result = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk_size)
    assert skipped > 0 and result.skipped_queries == skipped
    assert result.num_query == len(average_precision) == len(dist) - skipped
    np.testing.assert_allclose(result.average_precision, average_precision, rtol=1e-12)
    np.testing.assert_allclose(result.cmc_curve, cmc_curve, rtol=1e-12)
    assert result.mAP == pytest.approx(average_precision.mean(), rel=1e-12)
    assert result.cmc == {rank: pytest.approx(cmc_curve[rank - 1]) for rank in (1, 5, 10, 20)}


def test_matches_torchreid_loop_on_float32_distances_without_ties():
    rng = np.random.default_rng(3)
    _, q_pids, g_pids, q_cams, g_cams = random_problem(3)
    dist = rng.random((len(q_pids), len(g_pids)), dtype=np.float32)
    cmc_curve, average_precision, _ = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams)
    result = evaluate_ranking(torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams)
    np.testing.assert_allclose(result.average_precision, average_precision, rtol=1e-12)
    np.testing.assert_allclose(result.cmc_curve, cmc_curve, rtol=1e-12)


def test_hand_computed_example():
    g_pids = np.array([1, 2, 1, 0, 1, 3])
    g_cams = np.array([1, 2, 2, 3, 3, 1])
    q_pids = np.array([1, 2, 4, 3, 2])
    q_cams = np.array([1, 1, 1, 2, 3])
    dist = np.array([
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # entry 0 same camera, dropped; matches 2, 4 at ranks 2, 4
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # match 1 at rank 5
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # identity 4 is not in the gallery: skipped
        [1.0, 1.0, 1.0, 0.0, 1.0, 1.0],  # tie: 3, then 0, 1, 2, 4, 5 in gallery order; match 5 at rank 6
        [2.0, 1.0, 1.0, 1.0, 0.0, 1.0],  # tie: 4, then 1, 2, 3, 5; match 1 at rank 2
    ])
    result = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, ranks=(1, 2, 5, 10))
    expected_ap = [(1 / 2 + 2 / 4) / 2, 1 / 5, 1 / 6, 1 / 2]
    np.testing.assert_allclose(result.average_precision, expected_ap)
    assert result.mAP == pytest.approx(np.mean(expected_ap))
    assert result.cmc == pytest.approx({1: 0.0, 2: 2 / 4, 5: 3 / 4, 10: 1.0})
    assert result.num_query == 4 and result.skipped_queries == 1
    assert len(result.cmc_curve) == 50 and result.cmc_curve[5] == 1.0


def test_numpy_and_torch_inputs_give_one_result():
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(4)
    from_numpy = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams)
    from_torch = evaluate_ranking(torch.from_numpy(dist), *(torch.from_numpy(a) for a in
                                                             (q_pids, g_pids, q_cams, g_cams)))
    read_only = dist.copy()
    read_only.flags.writeable = False
    from_read_only = evaluate_ranking(read_only, q_pids, g_pids, q_cams, g_cams)
    for result in (from_torch, from_read_only):
        assert isinstance(result, RankingResult)
        assert result.mAP == from_numpy.mAP and result.cmc == from_numpy.cmc
        np.testing.assert_array_equal(result.average_precision, from_numpy.average_precision)


def test_every_query_skipped_is_an_error():
    dist = np.zeros((2, 3))
    with pytest.raises(ValueError, match="none of the 2 queries has a true match"):
        evaluate_ranking(dist, np.array([1, 2]), np.array([1, 2, 3]), np.array([1, 1]), np.array([1, 1, 2]))


def test_nan_distance_is_an_error():
    dist = np.zeros((2, 3))
    dist[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN.*query 1, gallery entry 2"):
        evaluate_ranking(dist, np.array([1, 2]), np.array([1, 2, 3]), np.array([1, 1]), np.array([2, 2, 2]))


def test_identities_of_the_wrong_length_are_refused():
    with pytest.raises(ValueError, match="g_pids"):
        evaluate_ranking(np.zeros((2, 3)), np.array([1, 2]), np.array([1, 2]), np.array([1, 1]),
                         np.array([2, 2, 2]))


# a tiny test split: identity 1 in cameras 1 and 2, identity 2 only in two query tracklets (cameras 1 and 3),
# a junk and a distractor tracklet
IDENTITIES = np.array([1, 1, 1, 2, 2, -1, 0])
CAMERAS = np.array([1, 2, 1, 1, 3, 1, 2])
IS_QUERY = np.array([True, False, False, True, True, False, False])


def test_official_gallery_keeps_the_queries_and_drops_junk():
    queries, gallery = query_gallery_split(IDENTITIES, CAMERAS, IS_QUERY, "official")
    np.testing.assert_array_equal(queries, [0, 3, 4])
    np.testing.assert_array_equal(gallery, [0, 1, 2, 3, 4, 6])


def test_torchreid_gallery_leaves_the_queries_out():
    queries, gallery = query_gallery_split(IDENTITIES, CAMERAS, IS_QUERY, "torchreid")
    np.testing.assert_array_equal(queries, [0, 3, 4])
    np.testing.assert_array_equal(gallery, [1, 2, 6])


@pytest.mark.parametrize("protocol, skipped", [("official", 0), ("torchreid", 2)])
def test_protocols_rank_a_tiny_split(protocol, skipped):
    queries, gallery = query_gallery_split(IDENTITIES, CAMERAS, IS_QUERY, protocol)
    # tracklets on a line: distance = how far apart their positions are
    dist = np.abs(queries[:, None] - gallery[None, :]).astype(np.float64)
    result = evaluate_ranking(dist, IDENTITIES[queries], IDENTITIES[gallery], CAMERAS[queries],
                              CAMERAS[gallery])
    assert result.skipped_queries == skipped and result.num_query == 3 - skipped
    if protocol == "official":
        # query 0: itself and 2 (its camera) dropped, 1 first. Query 3: 2 and 4 tie at distance 1, and 2 comes
        # first in gallery order. Query 4: 3 first
        np.testing.assert_allclose(result.average_precision, [1.0, 0.5, 1.0])
    else:
        # query 0 ranks 1 (distance 1) before 6; only identity 2's queries had no match left
        np.testing.assert_allclose(result.average_precision, [1.0])


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="'market'.*official, torchreid"):
        query_gallery_split(IDENTITIES, CAMERAS, IS_QUERY, "market")
