"""The arithmetic of feature extraction, free of Ray and of files: the partial sums of Eq. 9 over one T-frame
chunk (chunk_sums, in the actors of features.py) and their totals per tracklet (TrackletSums, in the driver),
into a FeatureSet of TrackletFeatures (one row per tracklet).

A tracklet longer than T is scored chunk by chunk, and STAN's L1 normalisation is per clip, so the chunks'
`a` are on different scales. Eq. 9 (Σ_t a f / Σ_t a) and Eq. 8's an = ā / ||ā|| are invariant to one common
scale, so the sums use the unnormalised sigmoid scores (STALOutput.scores), whose scale every chunk shares:
Σ over chunks of the partial sums is then exactly Eq. 9 over all of the tracklet's frames. Padded frames
(beyond a chunk's `valid`) are left out of every sum.
"""

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from stal_ray.evaluate.distance import TrackletFeatures
from stal_ray.objective import safe_divisor

# What chunk_sums gives per chunk; score_sum (Σ_t s_{t,r}, for ā^r) is den_attended, so it is not repeated.
SUM_FIELDS = ("g_sum", "num_attended", "den_attended", "num_temporal", "den_temporal", "f_sum", "frames")
METADATA_FIELDS = ("tracklet", "identity", "camera", "is_query")


def chunk_sums(out, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Partial sums of one STALOutput of B chunks over each chunk's `valid` (B,) first frames, s = scores:

    g_sum (B, Dg) Σ_t g_t; num_attended (B, R, D) Σ_t s_{t,r} f_{t,r} and den_attended (B, R) Σ_t s_{t,r}
    (Eq. 9); num_temporal (B, R, D) Σ_t s̄_t f_{t,r} and den_temporal (B,) Σ_t s̄_t, s̄_t = mean_r s_{t,r}
    (the temporal attention alone); f_sum (B, R, D) Σ_t f_{t,r} (plain average); frames (B,) = valid.
    """
    t = out.scores.shape[1]
    mask = (torch.arange(t, device=valid.device)[None, :] < valid[:, None]).to(out.scores.dtype)  # (B, T)
    s = out.scores * mask[..., None]  # (B, T, R)
    s_bar = out.scores.mean(2) * mask  # (B, T)
    return {
        "g_sum": torch.einsum("bt,btd->bd", mask, out.g_frames),
        "num_attended": torch.einsum("btr,btrd->brd", s, out.f),
        "den_attended": s.sum(1),
        "num_temporal": torch.einsum("bt,btrd->brd", s_bar, out.f),
        "den_temporal": s_bar.sum(1),
        "f_sum": torch.einsum("bt,btrd->brd", mask, out.f),
        "frames": valid.to(torch.int64),
    }


@dataclass
class FeatureSet:
    """Per-tracklet features (rows sorted by tracklet) and what the report needs besides them."""

    features: TrackletFeatures
    tracklet: np.ndarray  # (N,) int64
    identity: np.ndarray  # (N,) int64; -1 junk, 0 distractor
    camera: np.ndarray  # (N,) int64
    is_query: np.ndarray  # (N,) bool
    num_frames: np.ndarray  # (N,) int64, real frames aggregated
    corrupt_frames: np.ndarray  # (N,) int64, frames that did not decode (padding repeats included)
    # tracklet -> (n_frames, R) attention scores normalised over the tracklet's whole map, for Fig. 12
    sample_scores: dict[int, np.ndarray] = field(default_factory=dict)
    # tracklet -> uint8 (k, H, W, 3) frames at report.shown_frames(n_frames) positions, when fetched
    sample_frames: dict[int, np.ndarray] = field(default_factory=dict)
    # what produced it (model fingerprint, data URI, settings): a later run reuses it only when these match
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tracklet)


class TrackletSums:
    """Running per-tracklet totals of chunk_sums rows, arriving in any order and in any batching. A chunk
    (tracklet, chunk number) that arrives again, e.g. computed again after a lost node, is added once."""

    def __init__(self):
        self.frames = 0  # real frames added
        self.repeated = 0  # chunks that arrived again, left out
        self._seen: set[tuple[int, int]] = set()
        self._slot: dict[int, int] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._meta: dict[str, np.ndarray] = {}
        self._corrupt = np.zeros(0, dtype=np.int64)
        self._scores: list[tuple[np.ndarray, ...]] = []  # per batch: tracklet, chunk, valid, scores

    @property
    def tracklets(self) -> int:
        return len(self._slot)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        batch = self._first_arrivals(batch)
        tracklets = np.asarray(batch["tracklet"], dtype=np.int64)
        if not len(tracklets):
            return
        self.frames += int(np.sum(batch["frames"]))
        unique, first, inverse = np.unique(tracklets, return_index=True, return_inverse=True)
        new = [(i, t) for i, t in enumerate(unique.tolist()) if t not in self._slot]
        for _, tracklet in new:
            self._slot[tracklet] = len(self._slot)
        self._grow(batch, len(self._slot))
        if new:
            rows, slots_new = first[[i for i, _ in new]], [self._slot[t] for _, t in new]
            for name in METADATA_FIELDS:
                self._meta[name][slots_new] = np.asarray(batch[name])[rows]
        slots = np.array([self._slot[t] for t in unique.tolist()])[inverse]
        index = torch.from_numpy(slots)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            for name in SUM_FIELDS:
                self._sums[name].index_add_(0, index, torch.from_numpy(np.asarray(batch[name])).to(
                    self._sums[name].dtype))
        np.add.at(self._corrupt, slots, np.asarray(batch["corrupt_frames"], dtype=np.int64))
        self._scores.append((tracklets, np.asarray(batch["chunk"], dtype=np.int64),
                             np.asarray(batch["frames"], dtype=np.int64), np.asarray(batch["scores"])))

    def _first_arrivals(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch less the chunks added before (or twice in it)."""
        seen = self._seen
        keys = zip(np.asarray(batch["tracklet"]).tolist(), np.asarray(batch["chunk"]).tolist(), strict=True)
        first = np.array([key not in seen and not seen.add(key) for key in keys], dtype=bool)
        if first.all():
            return batch
        self.repeated += int((~first).sum())
        return {name: np.asarray(value)[first] for name, value in batch.items()}

    def _grow(self, batch: dict[str, np.ndarray], needed: int) -> None:
        """Room for `needed` tracklets, doubling: the number of tracklets is unknown until the stream ends."""
        capacity = len(self._corrupt)
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, 64)
        for name in SUM_FIELDS:
            value = np.asarray(batch[name])
            dtype = torch.int64 if name == "frames" else torch.float32
            grown = torch.zeros((capacity, *value.shape[1:]), dtype=dtype)
            if name in self._sums:
                grown[:len(self._sums[name])] = self._sums[name]
            self._sums[name] = grown
        for name in METADATA_FIELDS:
            grown = np.zeros(capacity, dtype=bool if name == "is_query" else np.int64)
            if name in self._meta:
                grown[:len(self._meta[name])] = self._meta[name]
            self._meta[name] = grown
        corrupt = np.zeros(capacity, dtype=np.int64)
        corrupt[:len(self._corrupt)] = self._corrupt
        self._corrupt = corrupt

    def result(self, keep_scores_for: int = 0) -> FeatureSet:
        """Eq. 9 over all frames of each tracklet, rows sorted by tracklet. Call it once: it consumes the
        totals (on MARS they are ~1 GB, and each is divided in place instead of copied)."""
        n = len(self._slot)
        if n == 0:
            raise ValueError("no evaluation chunks were extracted: the data set's test split is empty")
        if not self._sums:
            raise RuntimeError("TrackletSums.result() was called before: it consumes the totals")
        order = np.argsort(self._meta["tracklet"][:n], kind="stable")
        index = torch.from_numpy(order)
        sums = {name: self._sums.pop(name)[:n][index] for name in SUM_FIELDS}
        frames = sums.pop("frames")
        count = frames.to(torch.float32)
        den_attended = sums.pop("den_attended")
        features = TrackletFeatures(
            g=sums.pop("g_sum").div_(count[:, None]),
            f_attended=sums.pop("num_attended").div_(safe_divisor(den_attended)[..., None]),
            f_temporal=sums.pop("num_temporal").div_(safe_divisor(sums.pop("den_temporal"))[:, None, None]),
            f_mean=sums.pop("f_sum").div_(count[:, None, None]),
            part_scores=den_attended / count[:, None],  # ā^r, mean over frames of s_{t,r}
        )
        meta = {name: self._meta[name][:n][order] for name in METADATA_FIELDS}
        feature_set = FeatureSet(features=features, num_frames=frames.numpy(),
                                 corrupt_frames=self._corrupt[:n][order], **meta)
        chosen = sample_tracklets(feature_set, keep_scores_for)
        feature_set.sample_scores = self._sample_scores(chosen)
        return feature_set

    def _sample_scores(self, chosen: list[int]) -> dict[int, np.ndarray]:
        if not chosen:
            return {}
        tracklet, chunk, valid, scores = (np.concatenate(parts) for parts in zip(*self._scores, strict=True))
        out = {}
        for t in chosen:
            rows = np.flatnonzero(tracklet == t)
            rows = rows[np.argsort(chunk[rows])]
            s = np.concatenate([scores[row, :valid[row]] for row in rows]).astype(np.float64)
            out[t] = (s / s.sum()).astype(np.float32)  # the tracklet's whole T×R map sums to 1, as STAN's
        return out


def sample_tracklets(feature_set: FeatureSet, count: int) -> list[int]:
    """Up to `count` tracklets for the attention figure, like the paper's Fig. 12: pairs of one person seen by
    two cameras (a query and a gallery tracklet of its identity from another camera), then any others."""
    if count <= 0:
        return []
    chosen: list[int] = []
    real = feature_set.identity > 0
    for position in np.flatnonzero(feature_set.is_query & real):
        if len(chosen) + 2 > count:
            break
        identity, camera = feature_set.identity[position], feature_set.camera[position]
        others = np.flatnonzero((feature_set.identity == identity) & (feature_set.camera != camera))
        if len(others):
            chosen += [int(feature_set.tracklet[position]), int(feature_set.tracklet[others[0]])]
    for tracklet in feature_set.tracklet.tolist():
        if len(chosen) >= count:
            break
        if tracklet not in chosen:
            chosen.append(tracklet)
    return chosen
