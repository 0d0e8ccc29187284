"""The study's measurements: pure functions of extracted features and unit scores, one per figure."""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stal_ray.core.skeleton import PART_NAMES
from stal_ray.evaluate.distance import branch_distances, fuse
from stal_ray.evaluate.features import FeatureSet
from stal_ray.evaluate.ranking import RankingResult, ap_rule, evaluate_ranking, query_gallery_split
from stal_ray.objective import euclidean_distance
from stal_ray.study.units import UnitScores

ATTENTION_MODES = ("baseline", "tan", "san", "stal")  # §IV-C1, Table II's rows


class Ranker:
    """Query/gallery split of one FeatureSet under a protocol, and ranking of any distance over it."""

    def __init__(self, feature_set: FeatureSet, protocol: str = "official",
                 ranks: Sequence[int] = (1, 5, 10, 20), part_norm: str = "l2"):
        self.feature_set, self.ranks, self.ap = feature_set, tuple(ranks), ap_rule(protocol)
        self.part_norm = part_norm
        self.query, self.gallery = query_gallery_split(feature_set.identity, feature_set.camera,
                                                       feature_set.is_query, protocol)
        self.ids = (feature_set.identity[self.query], feature_set.identity[self.gallery],
                    feature_set.camera[self.query], feature_set.camera[self.gallery])
        self._branches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def rank(self, distance: torch.Tensor) -> RankingResult:
        return evaluate_ranking(distance, *self.ids, ranks=self.ranks, ap=self.ap)

    def branches(self, attention: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_l, d_g) of the queries to the gallery under an attention mode, computed once."""
        if attention not in self._branches:
            self._branches[attention] = branch_distances(self.feature_set.features[self.query],
                                                         self.feature_set.features[self.gallery], attention,
                                                         part_norm=self.part_norm)
        return self._branches[attention]

    def mode(self, mode: str, alpha: float) -> RankingResult:
        """A distance mode of the evaluation (stal, baseline, tan, san, global, local) at fusion rate α."""
        d_l, d_g = self.branches("stal" if mode in ("global", "local") else mode)
        return self.rank(fuse(d_l, d_g, mode, alpha))


def attention_ablation(ranker: Ranker, alpha: float) -> dict[str, RankingResult]:
    """§IV-C1: the same trained model ranked without attention, with temporal or spatial only, and both."""
    return {mode: ranker.mode(mode, alpha) for mode in ATTENTION_MODES}


def per_part(ranker: Ranker) -> dict[str, RankingResult]:
    """Fig. 7: each body part's attention-aggregated feature (Eq. 9) alone, then all parts weighted (d_l)."""
    f = ranker.feature_set.features.f_attended
    results = {name: ranker.rank(euclidean_distance(f[ranker.query, r], f[ranker.gallery, r]))
               for r, name in enumerate(PART_NAMES)}
    results["all parts (d_l)"] = ranker.mode("local", 0.0)
    return results


def fusion_rates(ranker: Ranker, rates: Sequence[float]) -> dict[float, RankingResult]:
    """Fig. 8: d_l + α·d_g for every α; d_l and d_g computed once."""
    d_l, d_g = ranker.branches("stal")
    return {float(alpha): ranker.rank(fuse(d_l, d_g, "stal", float(alpha))) for alpha in rates}


def sequence_lengths(feature_sets: Mapping[str, FeatureSet], alpha: float, protocol: str = "official",
                     part_norm: str = "l2") -> tuple[list[str], np.ndarray]:
    """Fig. 11: rank-1 of queries of length L_q against galleries of length L_g, every pair of the
    extractions given (label -> FeatureSet of the same tracklets). Returns (labels, (L_q, L_g) rank-1)."""
    labels = list(feature_sets)
    rankers = {label: Ranker(feature_sets[label], protocol, ranks=(1,), part_norm=part_norm)
               for label in labels}
    first = rankers[labels[0]]
    for label, ranker in rankers.items():
        if not np.array_equal(ranker.feature_set.tracklet, first.feature_set.tracklet):
            raise ValueError(f"sequence length {label}: another set of tracklets than {labels[0]}")
    grid = np.zeros((len(labels), len(labels)))
    for i, query_label in enumerate(labels):
        query = feature_sets[query_label].features[first.query]
        for j, gallery_label in enumerate(labels):
            d_l, d_g = branch_distances(query, feature_sets[gallery_label].features[first.gallery], "stal",
                                        part_norm=part_norm)
            grid[i, j] = first.rank(fuse(d_l, d_g, "stal", alpha)).cmc[1]
    return labels, grid


@dataclass
class OcclusionSummary:
    """Attention of hidden and visible units, as relative scores (1 = the tracklet's average unit).

    Parts differ in how often they are hidden (an occluder hides limbs, rarely the head) and STAN also
    learns how much each part is worth, so the all-units means mix the two; the within-part figures
    compare a hidden unit only with visible units of the same part."""

    hidden_mean: float
    visible_mean: float
    hidden_units: int
    visible_units: int
    # Σ_r n_hidden_r · (hidden mean_r / visible mean_r) / Σ_r n_hidden_r: < 1 when hidden units of a part
    # score lower than its visible ones
    within_part_ratio: float
    # (tracklet, part) pairs with hidden and visible units, and among them those whose hidden units score
    # lower on average
    pairs_compared: int
    pairs_lower: int
    # per part: (visible mean, hidden mean, hidden units), NaN where the part is never hidden
    by_part: dict[str, tuple[float, float, int]]
    # 5th and 95th percentiles of the raw sigmoid scores: how far from uniform (0.5) the map is
    raw_percentiles: tuple[float, float]
    # temporal attention: a frame's score (mean over its parts, what `tan` weighs frames by) in frames with
    # at least half of the parts hidden over that in frames with none hidden; NaN without both kinds
    frame_ratio: float = float("nan")


def occlusion_summary(units: UnitScores) -> OcclusionSummary:
    """Do hidden units get lower attention than visible ones? Over all units, per part and per pair."""
    hidden, score = units.hidden, units.score

    def mean(values: np.ndarray) -> float:
        return float(values.mean()) if len(values) else float("nan")

    by_part = {name: (mean(score[(units.part == r) & ~hidden]), mean(score[(units.part == r) & hidden]),
                      int(((units.part == r) & hidden).sum())) for r, name in enumerate(PART_NAMES)}
    weighted = [(count, h / v) for v, h, count in by_part.values() if count and v > 0]
    ratio = (sum(c * q for c, q in weighted) / sum(c for c, _ in weighted)) if weighted else float("nan")
    compared = lower = 0
    for tracklet, part in set(zip(units.tracklet[hidden].tolist(), units.part[hidden].tolist(), strict=True)):
        rows = (units.tracklet == tracklet) & (units.part == part)
        if (rows & ~hidden).any():
            compared += 1
            lower += score[rows & hidden].mean() < score[rows & ~hidden].mean()
    low, high = np.percentile(units.raw, [5, 95]) if len(units.raw) else (float("nan"), float("nan"))
    frame_ratio = float("nan")
    if len(score):
        _, frame, parts = np.unique(np.stack([units.tracklet, units.frame]), axis=1, return_inverse=True,
                                    return_counts=True)
        frame = frame.reshape(-1)
        frame_score = np.bincount(frame, weights=score) / parts
        frame_hidden = np.bincount(frame, weights=hidden) / parts
        occluded, clean = frame_hidden >= 0.5, frame_hidden == 0
        if occluded.any() and clean.any():
            frame_ratio = float(frame_score[occluded].mean() / frame_score[clean].mean())
    return OcclusionSummary(hidden_mean=mean(score[hidden]), visible_mean=mean(score[~hidden]),
                            hidden_units=int(hidden.sum()), visible_units=int((~hidden).sum()),
                            within_part_ratio=float(ratio), pairs_compared=compared, pairs_lower=int(lower),
                            by_part=by_part, raw_percentiles=(float(low), float(high)),
                            frame_ratio=frame_ratio)


def paired_with(results: Mapping[str, RankingResult], reference: str) -> dict[str, tuple[int, int]]:
    """Per mode, the queries whose average precision is higher and lower than under `reference` (same
    queries, same order): how many of the queries a difference in mAP rests on."""
    base = np.asarray(results[reference].average_precision)
    out = {}
    for mode, result in results.items():
        ap = np.asarray(result.average_precision)
        out[mode] = (int((ap > base + 1e-9).sum()), int((ap < base - 1e-9).sum()))
    return out


def most_occluded(units: UnitScores, count: int) -> list[int]:
    """Up to `count` tracklets with the largest share of hidden units (Fig. 12's examples), ties by id."""
    tracklets, inverse = np.unique(units.tracklet, return_inverse=True)
    share = np.bincount(inverse, weights=units.hidden) / np.bincount(inverse)
    order = np.lexsort((tracklets, -share))
    return [int(tracklets[i]) for i in order[:count] if share[i] > 0]
