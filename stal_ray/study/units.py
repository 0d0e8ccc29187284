"""Attention per spatial-temporal unit (frame t, part r) of every test tracklet, with whether the data's
keypoints say the part is hidden: the ground truth the occlusion figures compare STAN's scores against."""

from dataclasses import dataclass

import numpy as np
import ray.data

from stal_ray.core.skeleton import PART_JOINTS
from stal_ray.evaluate.features import ChunkFeatures, FeatureSet, TrackletSums, chunk_stream

# joint indices (0-based) of each body part, in PART_NAMES order
_PART_JOINTS = tuple(np.asarray(joints) - 1 for _, joints in PART_JOINTS)


def hidden_parts(keypoints: np.ndarray) -> np.ndarray:
    """(..., 14, 3) keypoints -> (..., R) bool: every joint of the part has confidence 0 (not visible).

    Eq. 7 builds a part's box from its visible joints, so a part with one visible joint is still boxed on
    the body; a part with none falls back to the canonical box, on whatever hides it.
    """
    visible = np.asarray(keypoints)[..., 2] > 0
    return np.stack([~visible[..., joints].any(-1) for joints in _PART_JOINTS], axis=-1)


class OcclusionChunks(ChunkFeatures):
    """ChunkFeatures plus `hidden` (B, T, R): hidden_parts of each frame, False where a chunk has no
    keypoints (nothing is known to be hidden there; `has_keypoints` says which)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = super().__call__(batch)
        known = np.asarray(batch["has_keypoints"], dtype=bool)
        result["hidden"] = hidden_parts(batch["keypoints"]) & known[:, None, None]
        result["has_keypoints"] = known
        return result


@dataclass
class UnitScores:
    """One entry per real (not padded) unit of every tracklet of persons (junk and distractors left out)."""

    tracklet: np.ndarray  # (U,) int64
    frame: np.ndarray  # (U,) int64, position in the tracklet's frames (all-frames extraction)
    part: np.ndarray  # (U,) int64, index into PART_NAMES
    score: np.ndarray  # (U,) float, the unit's sigmoid score over its tracklet's mean: 1 = average
    raw: np.ndarray  # (U,) float, the sigmoid score itself, in (0, 1)
    hidden: np.ndarray  # (U,) bool, hidden_parts
    has_keypoints: bool  # the data set carries keypoints: `hidden` means something

    def tracklet_map(self, tracklet: int) -> tuple[np.ndarray, np.ndarray]:
        """(frames, R) scores and hidden flags of one tracklet, frames in order."""
        rows = self.tracklet == tracklet
        frames, parts = self.frame[rows].max() + 1, self.part[rows].max() + 1
        scores, hidden = np.zeros((frames, parts)), np.zeros((frames, parts), dtype=bool)
        scores[self.frame[rows], self.part[rows]] = self.score[rows]
        hidden[self.frame[rows], self.part[rows]] = self.hidden[rows]
        return scores, hidden


def extract_with_units(dataset: ray.data.Dataset, model_path: str, **stream_options
                       ) -> tuple[FeatureSet, UnitScores]:
    """The tracklet features (as extract_features) and the unit scores of an evaluation_dataset over all of
    each tracklet's frames, from one pass of the model."""
    totals, chunks = TrackletSums(), []
    stream = chunk_stream(dataset, model_path, udf=OcclusionChunks, **stream_options)
    for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
        totals.add(batch)
        persons = np.asarray(batch["identity"]) > 0
        chunks.append({name: np.asarray(batch[name])[persons] for name in
                       ("tracklet", "chunk", "frames", "scores", "hidden", "has_keypoints")})
    return totals.result(), unit_scores(chunks)


def unit_scores(chunks: list[dict[str, np.ndarray]]) -> UnitScores:
    """The UnitScores of OcclusionChunks' chunks (persons only): one row per real (not padding) frame and
    part, its score relative to its tracklet's mean score."""
    if not sum(len(c["tracklet"]) for c in chunks):
        raise ValueError("the test split has no tracklet of a person (only junk and distractors)")
    merged = {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}
    count, seq_len, parts = merged["scores"].shape
    real = np.arange(seq_len)[None, :] < merged["frames"][:, None]  # (C, T) not padding
    chunk, step, part = np.nonzero(np.broadcast_to(real[..., None], (count, seq_len, parts)))
    tracklet = merged["tracklet"][chunk].astype(np.int64)
    raw = merged["scores"][chunk, step, part].astype(np.float64)
    # relative to the tracklet's mean score: STAN's scale is per clip, the comparison is within a tracklet
    _, inverse, sizes = np.unique(tracklet, return_inverse=True, return_counts=True)
    score = raw / (np.bincount(inverse, weights=raw) / sizes)[inverse]
    return UnitScores(tracklet=tracklet, frame=merged["chunk"][chunk] * seq_len + step, part=part,
                      score=score, raw=raw, hidden=merged["hidden"][chunk, step, part],
                      has_keypoints=bool(merged["has_keypoints"].any()))
