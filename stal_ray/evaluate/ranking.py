"""CMC, mAP and mINP under the MARS protocol, like torchreid's metrics/rank.py but vectorised over queries.

Two rules for a query's average precision (AP), both over the same ranking of its gallery:
* step (torchreid, fast-reid): the mean of the precision at each true match;
* trapezoid (the official MARS evaluation code, utils/compute_AP.m): precision integrated over recall with
  the trapezoid rule, i.e. the mean over true matches of the average of the precision at the entry ranked
  just above the match (1 for the top entry) and the precision at the match. It is never above the step AP.
Under protocol "official" a result's mAP follows the official code (trapezoid), under "torchreid" the step
rule (AP_RULE_OF); the step mAP is kept beside it either way (RankingResult.mAP_step).
"""

from dataclasses import dataclass

import numpy as np
import torch

from stal_ray.config import PROTOCOLS
from stal_ray.data.releases.base import JUNK

AP_RULES = ("step", "trapezoid")
# the AP rule each protocol's reference code uses
AP_RULE_OF = {"official": "trapezoid", "torchreid": "step"}


def query_gallery_split(identities, cameras, is_query,
                        protocol: str = "official") -> tuple[np.ndarray, np.ndarray]:
    """Indices into the test tracklets of the queries and of the gallery.

    official (the MARS authors' code, also AP3D's): the gallery is every tracklet that is not junk, the
    queries included; a query then meets itself, which evaluate_ranking drops with the other same-identity
    same-camera entries. torchreid: the same gallery without the queries. Distractors (0) stay in both.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is invalid: use one of {', '.join(PROTOCOLS)}")
    identities, cameras, is_query = (np.asarray(a).ravel() for a in (identities, cameras, is_query))
    if not len(identities) == len(cameras) == len(is_query):
        raise ValueError(f"identities, cameras and is_query differ in length: {len(identities)}, "
                         f"{len(cameras)}, {len(is_query)}")
    is_query = is_query.astype(bool)
    gallery = identities != JUNK
    if protocol == "torchreid":
        gallery &= ~is_query
    return np.flatnonzero(is_query), np.flatnonzero(gallery)


def ap_rule(protocol: str) -> str:
    """The AP rule of a protocol's reference code: "trapezoid" for official, "step" for torchreid."""
    if protocol not in AP_RULE_OF:
        raise ValueError(f"protocol {protocol!r} is invalid: use one of {', '.join(PROTOCOLS)}")
    return AP_RULE_OF[protocol]


@dataclass
class RankingResult:
    mAP: float  # mean AP by the rule `ap`
    cmc: dict[int, float]  # rank -> fraction of evaluated queries with a true match within that rank
    cmc_curve: np.ndarray  # (max_rank,) the same for ranks 1..max_rank
    num_query: int  # queries evaluated
    skipped_queries: int  # queries with no true match left in their gallery
    average_precision: np.ndarray  # per evaluated query, in query order, by the rule `ap`
    ap: str = "step"  # the AP rule of mAP and average_precision (AP_RULES)
    mAP_step: float | None = None  # mean AP by the step rule (torchreid's); mAP itself when ap is "step"
    # fast-reid's mean inverse negative penalty: per query, its true matches over the rank of the last one
    mINP: float = float("nan")
    inverse_negative_penalty: np.ndarray | None = None  # per evaluated query
    # (Nq,) bool: the queries evaluated (those with a true match), to which the per-query arrays belong
    evaluated: np.ndarray | None = None

    def __post_init__(self):
        if self.mAP_step is None and self.ap == "step":
            self.mAP_step = self.mAP


def _as_tensor(values, name: str, length: int | None = None) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        tensor = values
    else:
        array = np.asarray(values)
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    if length is not None and (tensor.ndim != 1 or len(tensor) != length):
        raise ValueError(f"{name} must hold one entry per row/column of dist ({length}), got shape "
                         f"{tuple(tensor.shape)}")
    return tensor


def evaluate_ranking(dist, q_pids, g_pids, q_cams, g_cams, ranks=(1, 5, 10, 20), *, max_rank: int = 50,
                     chunk_size: int = 256, ap: str = "step") -> RankingResult:
    """CMC at `ranks`, mAP (by the rule `ap`, see the module's docstring), step mAP and mINP of a (Nq, Ng)
    distance matrix (numpy or torch, on any device).

    For each query, gallery entries of its identity and camera are dropped; a query with no true match left
    is skipped (the official code has none such among MARS's queries). Gallery entries are ranked by distance
    with a stable sort: tied distances keep gallery order, as MATLAB's sort in the official code and numpy's
    stable argsort do, so the result never depends on the device or the chunk size. Nothing is sorted but
    the true matches: a query's AP and CMC need only how many kept entries precede each of them, which binary
    searches of every gallery entry into the query's sorted matches give for all queries of a chunk at once,
    in the same time however many distances tie.
    """
    if ap not in AP_RULES:
        raise ValueError(f"ap {ap!r} is invalid: use one of {', '.join(AP_RULES)}")
    dist = _as_tensor(dist, "dist")
    if dist.ndim != 2:
        raise ValueError(f"dist must be a (queries, gallery) matrix, got shape {tuple(dist.shape)}")
    num_q, num_g = dist.shape
    if num_q == 0:
        raise ValueError(f"dist has no queries (shape {tuple(dist.shape)}): there is nothing to rank")
    device = dist.device
    q_pids, q_cams = (_as_tensor(a, name, num_q).to(device) for a, name in ((q_pids, "q_pids"),
                                                                            (q_cams, "q_cams")))
    g_pids, g_cams = (_as_tensor(a, name, num_g).to(device) for a, name in ((g_pids, "g_pids"),
                                                                            (g_cams, "g_cams")))
    ranks = [int(rank) for rank in ranks]
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be integers >= 1, got {ranks}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if dist.is_floating_point() and torch.isnan(dist).any():
        row, column = (int(i) for i in torch.nonzero(torch.isnan(dist))[0])
        raise ValueError(f"dist holds NaN (first at query {row}, gallery entry {column}): it has no ranking")
    max_rank = max(max_rank, *ranks)

    chunks = [_rank_matches(dist[rows].contiguous(), q_pids[rows], g_pids, q_cams[rows], g_cams)
              for rows in (slice(start, start + chunk_size) for start in range(0, num_q, chunk_size))]
    first_match, step, trapezoid, inverse_negative_penalty = (torch.cat(parts).cpu().numpy()
                                                              for parts in zip(*chunks, strict=True))
    evaluated = first_match >= 0
    if not evaluated.any():
        raise ValueError(f"none of the {num_q} queries has a true match in the gallery (same identity, "
                         "other camera): there is nothing to rank; check the query/gallery split and the "
                         "identities")
    first_match = first_match[evaluated]
    cmc_curve = (first_match[:, None] < np.arange(1, max_rank + 1)).mean(0)
    average_precision = (trapezoid if ap == "trapezoid" else step)[evaluated]
    return RankingResult(
        mAP=float(average_precision.mean()),
        cmc={rank: float(cmc_curve[rank - 1]) for rank in ranks},
        cmc_curve=cmc_curve,
        num_query=int(evaluated.sum()),
        skipped_queries=int((~evaluated).sum()),
        average_precision=average_precision,
        ap=ap,
        mAP_step=float(step[evaluated].mean()),
        mINP=float(inverse_negative_penalty[evaluated].mean()),
        inverse_negative_penalty=inverse_negative_penalty[evaluated],
        evaluated=evaluated,
    )


def _rank_matches(dist, q_pids, g_pids, q_cams, g_cams) -> tuple[torch.Tensor, ...]:
    """For a chunk of queries: the 0-based rank of the first true match (-1 if none), the step and the
    trapezoid AP and the inverse negative penalty (float64; 0 for a query without a match)."""
    num_q, num_g = dist.shape
    device = dist.device
    same_identity = q_pids[:, None] == g_pids[None, :]
    match = same_identity & (q_cams[:, None] != g_cams[None, :])
    num_matches = match.sum(1)
    most = int(num_matches.max()) if num_q else 0
    if most == 0:
        zeros = torch.zeros(num_q, dtype=torch.float64, device=device)
        return torch.full((num_q,), -1, device=device), zeros, zeros, zeros

    # each query's true matches in ranking order (distance, then gallery position), then at least one pad
    # that sorts after every distance and every gallery position
    row, column = torch.nonzero(match, as_tuple=True)  # row-major: gallery order within a row
    by_distance = torch.sort(dist[row, column], stable=True).indices
    by_row = by_distance[torch.sort(row[by_distance], stable=True).indices]
    row, column = row[by_row], column[by_row]
    slot = torch.arange(len(row), device=device) - (torch.cumsum(num_matches, 0) - num_matches)[row]
    pad = float("inf") if dist.is_floating_point() else torch.iinfo(dist.dtype).max
    thresholds = dist.new_full((num_q, most + 1), pad)
    thresholds[row, slot] = dist[row, column]
    positions = torch.full((num_q, most + 1), num_g, device=device)
    positions[row, slot] = column

    # preceding[j]: how many of its query's true matches rank before gallery entry j. A binary search counts
    # those at a smaller distance (`left`); an entry tied with matches also follows those earlier in the
    # gallery, which a second binary search counts on keys (first slot of the match's distance, position):
    # unique, ordered as the matches are, and one pass whatever the number of ties
    left = torch.searchsorted(thresholds, dist, side="left")  # in 0..most: the last pad is never less
    tied = dist == thresholds.gather(1, left)
    stride = num_g + 1
    match_keys = torch.searchsorted(thresholds, thresholds, side="left") * stride + positions
    entry_keys = left * stride + torch.where(tied, torch.arange(num_g, device=device), -1)
    preceding = torch.searchsorted(match_keys, entry_keys, side="left")

    # the k-th match is preceded by k matches and by the other identities' entries j with preceding[j] <= k;
    # entries of the query's identity in its own camera are out of the ranking, its matches counted by k
    histogram = torch.zeros(num_q, most + 1, dtype=torch.int64, device=device)
    histogram.scatter_add_(1, preceding, (~same_identity).to(torch.int64))
    k = torch.arange(most, device=device)
    rank = k + torch.cumsum(histogram, 1)[:, :most]  # 0-based, among the kept entries
    valid = k < num_matches[:, None]
    count = num_matches.clamp_min(1)
    k, rank = k.to(torch.float64), rank.to(torch.float64)
    precision = (k + 1) / (rank + 1)  # at the k-th match
    step = (precision * valid).sum(1) / count
    # the official code's trapezoid: recall rises by 1/matches at each match, and the precision before it is
    # the precision at the kept entry ranked just above (k matches in `rank` entries), 1 at the top
    before = torch.where(rank > 0, k / rank.clamp_min(1), 1.0)
    trapezoid = ((before + precision) / 2 * valid).sum(1) / count
    # fast-reid's INP: all matches over the 1-based rank of the last (hardest) one
    last = rank.gather(1, (num_matches - 1).clamp_min(0)[:, None]).squeeze(1)
    inverse_negative_penalty = torch.where(num_matches > 0, num_matches / (last + 1), 0.0)
    first = torch.where(num_matches > 0, rank[:, 0].long(), -1)
    return first, step, trapezoid, inverse_negative_penalty
