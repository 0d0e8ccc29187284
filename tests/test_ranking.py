"""CMC, mAP and mINP: the vectorised ranking against torchreid's per-query loop (step AP, with fast-reid's
INP) and against a transcription of the official MARS evaluation code (trapezoid AP) on the real MARS index
tables, hand-computed examples, tied distances, the query/gallery split of both protocols and the errors."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from stal_ray.evaluate.ranking import RankingResult, ap_rule, evaluate_ranking, query_gallery_split
from stal_ray.evaluate.reference import official_evaluation, reference_evaluate

# the real index tables, as conftest.REAL_MARS_INFO
REAL_MARS_INFO = Path(__file__).parent / "data" / "mars_info"


def real_mars_test_split():
    """Identities, cameras and the query flags of MARS's 12,180 test tracklets (the real index tables)."""
    if not REAL_MARS_INFO.is_dir():
        pytest.skip(f"the real MARS index files are not at {REAL_MARS_INFO}")
    table = scipy.io.loadmat(REAL_MARS_INFO / "tracks_test_info.mat")["track_test_info"].astype(np.int64)
    queries = scipy.io.loadmat(REAL_MARS_INFO / "query_IDX.mat")["query_IDX"].ravel().astype(np.int64) - 1
    is_query = np.zeros(len(table), bool)
    is_query[queries] = True
    return table[:, 2], table[:, 3], is_query


@pytest.mark.parametrize("distances", ["random", "tied"])
def test_official_protocol_matches_the_official_mars_code_on_the_real_index(distances):
    identities, cameras, is_query = real_mars_test_split()
    queries, gallery = query_gallery_split(identities, cameras, is_query, "official")
    queries = queries[::10]  # 198 of the 1980 queries, spread over the identities: the loops are slow
    rng = np.random.default_rng(21)
    if distances == "random":
        dist = rng.random((len(queries), len(identities)))
    else:  # 4 levels over 12,180 tracklets: thousands of ties per query, true matches among them
        dist = rng.integers(0, 4, (len(queries), len(identities))).astype(np.float64)
    official_ap, official_cmc = official_evaluation(dist, identities, identities[queries], cameras,
                                                    cameras[queries])
    result = evaluate_ranking(dist[:, gallery], identities[queries], identities[gallery], cameras[queries],
                              cameras[gallery], ap=ap_rule("official"))
    assert result.ap == "trapezoid" and result.skipped_queries == 0 and result.num_query == len(queries)
    np.testing.assert_allclose(result.average_precision, official_ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.cmc_curve, official_cmc, rtol=0, atol=1e-12)
    assert result.mAP == pytest.approx(official_ap.mean(), abs=1e-12)
    # the step rule (torchreid's) over the same ranking is the other number, never below the official one
    _, step_ap, _, _ = reference_evaluate(dist[:, gallery], identities[queries], identities[gallery],
                                          cameras[queries], cameras[gallery])
    assert result.mAP_step == pytest.approx(step_ap.mean(), abs=1e-12)
    assert np.all(step_ap >= official_ap - 1e-12) and result.mAP_step > result.mAP


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
    cmc_curve, average_precision, skipped, inp = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams)
    result = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk_size)
    assert skipped > 0 and result.skipped_queries == skipped
    assert result.num_query == len(average_precision) == len(dist) - skipped
    np.testing.assert_allclose(result.average_precision, average_precision, rtol=1e-12)
    np.testing.assert_allclose(result.inverse_negative_penalty, inp, rtol=1e-12)
    np.testing.assert_allclose(result.cmc_curve, cmc_curve, rtol=1e-12)
    assert result.ap == "step" and result.mAP == result.mAP_step
    assert result.mAP == pytest.approx(average_precision.mean(), rel=1e-12)
    assert result.mINP == pytest.approx(inp.mean(), rel=1e-12)
    assert result.cmc == {rank: pytest.approx(cmc_curve[rank - 1]) for rank in (1, 5, 10, 20)}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk_size", [7, 256])
def test_trapezoid_ap_matches_the_official_code_on_tied_distances(seed, chunk_size):
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(seed)
    g_pids[::17] = -1  # junk entries: the official code skips them, the official split drops them
    official_ap, official_cmc = official_evaluation(dist, g_pids, q_pids, g_cams, q_cams)
    kept = g_pids != -1
    result = evaluate_ranking(dist[:, kept], q_pids, g_pids[kept], q_cams, g_cams[kept],
                              chunk_size=chunk_size, ap="trapezoid")
    answered = ~np.isnan(official_ap)  # the official code's AP of a query with no true match is 0/0
    assert result.skipped_queries == (~answered).sum() > 0
    np.testing.assert_allclose(result.average_precision, official_ap[answered], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.cmc_curve * len(result.average_precision),
                               official_cmc * len(dist), rtol=0, atol=1e-9)


def test_matches_torchreid_loop_on_float32_distances_without_ties():
    rng = np.random.default_rng(3)
    _, q_pids, g_pids, q_cams, g_cams = random_problem(3)
    dist = rng.random((len(q_pids), len(g_pids)), dtype=np.float32)
    cmc_curve, average_precision, _, inp = reference_evaluate(dist, q_pids, g_pids, q_cams, g_cams)
    result = evaluate_ranking(torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams)
    np.testing.assert_allclose(result.average_precision, average_precision, rtol=1e-12)
    np.testing.assert_allclose(result.inverse_negative_penalty, inp, rtol=1e-12)
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
    # INP: the matches over the rank of the last one
    np.testing.assert_allclose(result.inverse_negative_penalty, [2 / 4, 1 / 5, 1 / 6, 1 / 2])
    assert result.mINP == pytest.approx(np.mean([2 / 4, 1 / 5, 1 / 6, 1 / 2]))
    # trapezoid: per match, the mean of the precision one entry above it (0 before the first match) and at it
    trapezoid = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, ranks=(1, 2, 5, 10), ap="trapezoid")
    expected_trapezoid = [((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2, 1 / 10, 1 / 12, 1 / 4]
    np.testing.assert_allclose(trapezoid.average_precision, expected_trapezoid)
    assert trapezoid.mAP == pytest.approx(np.mean(expected_trapezoid)) and trapezoid.ap == "trapezoid"
    assert trapezoid.mAP_step == result.mAP and trapezoid.cmc == result.cmc and trapezoid.mINP == result.mINP


def test_a_match_ranked_first_has_precision_one_before_it():
    # matches at ranks 1 and 3: trapezoid ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2, step (1 + 2 / 3) / 2
    dist = np.array([[0.1, 0.2, 0.3, 0.4]])
    ids = dict(q_pids=np.array([1]), g_pids=np.array([1, 2, 1, 3]), q_cams=np.array([1]),
               g_cams=np.array([2, 2, 2, 2]))
    result = evaluate_ranking(dist, **ids, ap="trapezoid")
    assert result.mAP == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)
    assert result.mAP_step == pytest.approx((1 + 2 / 3) / 2) and result.mINP == pytest.approx(2 / 3)


def test_tied_distances_rank_in_gallery_order_on_every_input_kind():
    # every distance equal: each query's ranking is the gallery order with its own-camera entries removed
    g_pids = np.array([3, 1, 2, 1, 0, 1, 2])
    g_cams = np.array([1, 1, 2, 3, 1, 2, 1])
    q_pids, q_cams = np.array([1, 2, 1]), np.array([1, 1, 3])
    dist = np.zeros((3, 7))
    result = evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, ap="trapezoid")
    # query 0 (1, camera 1): 3, 2, 1*, 0, 1*, 2 -> matches at 3 and 5; query 1 (2, camera 1): 3, 1, 2*, 1,
    # 0, 1 -> match at 3; query 2 (1, camera 3): 3, 1*, 2, 0, 1*, 2 -> matches at 2 and 5
    np.testing.assert_allclose(result.inverse_negative_penalty, [2 / 5, 1 / 3, 2 / 5])
    assert result.cmc_curve[:3].tolist() == [0.0, 1 / 3, 1.0]
    expected = [((0 + 1 / 3) / 2 + (1 / 4 + 2 / 5) / 2) / 2, (0 + 1 / 3) / 2,
                ((0 + 1 / 2) / 2 + (1 / 4 + 2 / 5) / 2) / 2]
    np.testing.assert_allclose(result.average_precision, expected)
    for variant in (dist.astype(np.float32), torch.zeros(3, 7, dtype=torch.int64), torch.zeros(3, 7)):
        for chunk_size in (1, 2, 256):
            again = evaluate_ranking(variant, q_pids, g_pids, q_cams, g_cams, ap="trapezoid",
                                     chunk_size=chunk_size)
            np.testing.assert_array_equal(again.average_precision, result.average_precision)
            np.testing.assert_array_equal(again.cmc_curve, result.cmc_curve)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ranks_tied_distances_as_the_cpu_does():
    identities, cameras, is_query = real_mars_test_split()
    queries, gallery = query_gallery_split(identities, cameras, is_query, "official")
    dist = torch.from_numpy(np.random.default_rng(5).integers(0, 3, (len(queries), len(gallery))))
    ids = (identities[queries], identities[gallery], cameras[queries], cameras[gallery])
    on_cpu = evaluate_ranking(dist.float(), *ids, ap="trapezoid")
    on_cuda = evaluate_ranking(dist.float().cuda(), *ids, ap="trapezoid")
    np.testing.assert_array_equal(on_cuda.average_precision, on_cpu.average_precision)
    np.testing.assert_array_equal(on_cuda.cmc_curve, on_cpu.cmc_curve)
    assert on_cuda.mINP == on_cpu.mINP and on_cuda.mAP_step == on_cpu.mAP_step


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


def test_unknown_ap_rule_is_refused():
    with pytest.raises(ValueError, match="'area'.*step, trapezoid"):
        evaluate_ranking(np.zeros((1, 2)), np.array([1]), np.array([1, 2]), np.array([1]), np.array([2, 2]),
                         ap="area")


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
                              CAMERAS[gallery], ap=ap_rule(protocol))
    assert result.skipped_queries == skipped and result.num_query == 3 - skipped
    if protocol == "official":
        # query 0: itself and 2 (its camera) dropped, 1 first. Query 3: 2 and 4 tie at distance 1, and 2 comes
        # first in gallery order: its match 4 is second, trapezoid AP (0 + 1/2) / 2. Query 4: 3 first
        assert result.ap == "trapezoid"
        np.testing.assert_allclose(result.average_precision, [1.0, 0.25, 1.0])
        assert result.mAP_step == pytest.approx(2.5 / 3)
    else:
        # query 0 ranks 1 (distance 1) before 6; only identity 2's queries had no match left
        assert result.ap == "step"
        np.testing.assert_allclose(result.average_precision, [1.0])


def test_unknown_protocol_is_refused():
    with pytest.raises(ValueError, match="'market'.*official, torchreid"):
        query_gallery_split(IDENTITIES, CAMERAS, IS_QUERY, "market")
    with pytest.raises(ValueError, match="'market'.*official, torchreid"):
        ap_rule("market")
