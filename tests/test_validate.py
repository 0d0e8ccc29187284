"""The α sweep of validation: one pair of branch distances ranked for every fusion rate, equal to ranking
each fused distance on its own; the best α and the metric names Tune and TensorBoard see."""

import numpy as np
import pytest
import torch
from test_distance import frame_level, tracklet_features

from stal_ray.evaluate.distance import fused_distance
from stal_ray.evaluate.features import FeatureSet
from stal_ray.evaluate.ranking import RankingResult, ap_rule, evaluate_ranking, query_gallery_split
from stal_ray.evaluate.validate import fusion_sweep, sweep_metrics


def feature_set(n: int = 40, seed: int = 0) -> FeatureSet:
    rng = np.random.default_rng(seed)
    identity = rng.integers(1, 8, n)
    camera = rng.integers(1, 4, n)
    is_query = np.zeros(n, dtype=bool)
    is_query[: n // 4] = True
    return FeatureSet(features=tracklet_features(*frame_level(n, seed=seed, dtype=torch.float32)),
                      tracklet=np.arange(n), identity=identity, camera=camera, is_query=is_query,
                      num_frames=np.full(n, 5), corrupt_frames=np.zeros(n, dtype=np.int64))


@pytest.mark.parametrize("protocol", ["official", "torchreid"])
def test_sweep_equals_ranking_each_fused_distance(protocol):
    features = feature_set()
    results = fusion_sweep(features, [0.0, 0.3, 1.0], protocol=protocol)
    q, g = query_gallery_split(features.identity, features.camera, features.is_query, protocol)
    for alpha, result in results.items():
        distance = fused_distance(features.features[q], features.features[g], "stal", alpha)
        expected = evaluate_ranking(distance, features.identity[q], features.identity[g], features.camera[q],
                                    features.camera[g], ap=ap_rule(protocol))
        assert result.mAP == pytest.approx(expected.mAP) and result.cmc == pytest.approx(expected.cmc)
        # the protocol's AP rule: the official code's trapezoid or torchreid's step
        assert result.ap == ap_rule(protocol) and (result.mAP < result.mAP_step) == (protocol == "official")


def ranking(m_ap: float, rank1: float) -> RankingResult:
    return RankingResult(mAP=m_ap, cmc={1: rank1}, cmc_curve=np.array([rank1]), num_query=3,
                         skipped_queries=0, average_precision=np.zeros(3))


def test_best_alpha_has_the_highest_map_and_the_smaller_alpha_wins_a_tie():
    metrics = sweep_metrics({0.0: ranking(0.5, 0.4), 0.3: ranking(0.7, 0.6), 0.6: ranking(0.7, 0.9)})
    assert metrics["val_alpha"] == 0.3 and metrics["val_mAP"] == 0.7 and metrics["val_rank1"] == 0.6
    assert metrics["val_mAP_a0"] == 0.5 and metrics["val_rank1_a0.6"] == 0.9
