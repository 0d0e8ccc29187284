"""Validation during training: the model in memory on the held-out validation split, ranked for a grid of
fusion rates α (d = d_l + α·d_g) from one set of extracted features (the paper's Fig. 8 sweep)."""

import math
from collections.abc import Iterable, Sequence

import numpy as np
import ray.data
import torch

from stal_ray.evaluate.chunks import FeatureSet, TrackletSums
from stal_ray.evaluate.distance import branch_distances, fuse
from stal_ray.evaluate.features import ChunkFeatures
from stal_ray.evaluate.ranking import RankingResult, ap_rule, evaluate_ranking, query_gallery_split


def features_in_memory(model: torch.nn.Module, dataset: ray.data.Dataset, *,
                       batch_size: int = 32) -> FeatureSet:
    """Tracklet features of an evaluation_dataset or validation_dataset with a model held by this process
    (a training worker's, on its device); the model is put in eval mode and back in its previous mode."""
    was_training = model.training
    model.eval()
    chunk_features, totals = ChunkFeatures.of_model(model), TrackletSums()
    try:
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            totals.add(chunk_features(batch))
    finally:
        model.train(was_training)
    return totals.result()


def fusion_sweep(feature_set: FeatureSet, fusion_rates: Iterable[float], *, protocol: str = "official",
                 ranks: Sequence[int] = (1, 5, 10, 20), part_norm: str = "l2") -> dict[float, RankingResult]:
    """CMC and mAP (the protocol's AP rule) of the stal distance for every α in fusion_rates; d_l and d_g are
    computed once."""
    query_index, gallery_index = query_gallery_split(feature_set.identity, feature_set.camera,
                                                     feature_set.is_query, protocol)
    features = feature_set.features
    d_l, d_g = branch_distances(features[query_index], features[gallery_index], "stal", part_norm=part_norm)
    ids = (feature_set.identity[query_index], feature_set.identity[gallery_index],
           feature_set.camera[query_index], feature_set.camera[gallery_index])
    return {float(alpha): evaluate_ranking(fuse(d_l, d_g, "stal", float(alpha)), *ids, ranks=tuple(ranks),
                                           ap=ap_rule(protocol))
            for alpha in fusion_rates}


def alpha_key(alpha: float) -> str:
    """How a fusion rate appears in metric names: val_mAP_a0.3."""
    return f"a{alpha:g}"


def sweep_metrics(results: dict[float, RankingResult]) -> dict[str, float]:
    """Flat metrics for Ray Train/Tune and TensorBoard: val_mAP_a<α>, val_rank1_a<α> for every α, and the best
    α (highest mAP; the smaller α on a tie) as val_alpha with its val_mAP and val_rank1."""
    metrics: dict[str, float] = {}
    for alpha, result in results.items():
        metrics[f"val_mAP_{alpha_key(alpha)}"] = result.mAP
        metrics[f"val_rank1_{alpha_key(alpha)}"] = result.cmc.get(1, math.nan)
    best = max(sorted(results), key=lambda alpha: (results[alpha].mAP, -alpha))
    metrics.update(val_mAP=results[best].mAP, val_rank1=results[best].cmc.get(1, math.nan), val_alpha=best,
                   val_queries=results[best].num_query)
    return metrics


def validate(model: torch.nn.Module, dataset: ray.data.Dataset, fusion_rates: Iterable[float], *,
             protocol: str = "official", batch_size: int = 32, part_norm: str = "l2") -> dict[str, float]:
    """sweep_metrics of the model on a validation_dataset (the evaluation protocol, α grid)."""
    feature_set = features_in_memory(model, dataset, batch_size=batch_size)
    if not np.any(feature_set.is_query):
        raise ValueError("the validation split has no query tracklet: nothing to rank")
    return sweep_metrics(fusion_sweep(feature_set, fusion_rates, protocol=protocol, ranks=(1,),
                                      part_norm=part_norm))
