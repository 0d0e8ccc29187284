"""k-reciprocal re-ranking (Zhong, Zheng, Cao and Li, "Re-ranking person re-identification with k-reciprocal
encoding", CVPR 2017) of the fused query × gallery distance, an evaluation option beyond the STAL paper.

For every probe p of the N = Nq + Ng tracklets: the k-reciprocal set R(p, k1) (p's k1 nearest that also have
p among their k1 nearest), expanded by the R(q, k1/2) of its members q that share more than 2/3 of theirs
with R(p, k1): R*(p, k1). p's vector V_p holds exp(−d(p, g)) on R*(p, k1), summing to 1; local query expansion
replaces V_p by the mean V over p's k2 nearest. The Jaccard distance d_J(p, g) = 1 − Σ min(V_p, V_g) /
Σ max(V_p, V_g), and the re-ranked distance d* = (1 − λ)·d_J + λ·d, with d the squared distance divided by
its row's maximum. The defaults k1 = 20, k2 = 6, λ = 0.3 are the paper's (and torchreid's).

The reference code builds the (N, N) distance and V densely, several times over; here the (N, N) matrix is
never assembled: its rows are read from the three blocks a chunk at a time, only each row's k1 + 1 nearest are
kept, and V (a few hundred entries a row) is sparse, so the Jaccard sums go over its non-zero entries only.
"""

import numpy as np
import scipy.sparse
import torch
from torch import Tensor

from stal_ray.evaluate.distance import TrackletFeatures, fused_distance

# k1, k2, λ of the paper (§4.2, "parameters")
K1, K2, LAMBDA = 20, 6, 0.3
# (query, gallery-entry) pairs whose min(V_p, V_g) one Jaccard step holds (~40 bytes each)
_JACCARD_PAIRS = 1 << 22


class _Rows:
    """Rows of the (N, N) matrix [[q_q, q_g], [q_gᵀ, g_g]], squared and divided by each row's maximum, read
    from the blocks without assembling it (queries first, then the gallery)."""

    def __init__(self, q_g: Tensor, q_q: Tensor, g_g: Tensor):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.nq, self.n = len(q_g), len(q_g) + len(g_g)
        self.row_max = torch.empty(self.n, dtype=q_g.dtype)

    def raw(self, start: int, stop: int) -> Tensor:
        """Squared distances of rows [start, stop), which lie all in the query or all in the gallery part."""
        if stop <= self.nq:
            rows = torch.cat([self.q_q[start:stop], self.q_g[start:stop]], 1)
        else:
            start, stop = start - self.nq, stop - self.nq
            rows = torch.cat([self.q_g[:, start:stop].T, self.g_g[start:stop]], 1)
        return rows.square_()

    def chunks(self, chunk_size: int):
        for part_start, part_stop in ((0, self.nq), (self.nq, self.n)):
            for start in range(part_start, part_stop, chunk_size):
                yield start, min(start + chunk_size, part_stop)

    def lookup(self, i: Tensor, j: Tensor) -> Tensor:
        """Normalised squared distances of the pairs (i[k], j[k]); row_max must be filled in."""
        nq, out = self.nq, torch.empty(i.shape, dtype=self.q_g.dtype)
        query_i, query_j = i < nq, j < nq
        for mask, block, rows, cols in (
            (query_i & query_j, self.q_q, i, j),
            (query_i & ~query_j, self.q_g, i, j - nq),
            (~query_i & query_j, self.q_g, j, i - nq),  # q_gᵀ
            (~query_i & ~query_j, self.g_g, i - nq, j - nq),
        ):
            out[mask] = block[rows[mask], cols[mask]]
        return out.square_().div_(self.row_max[i])


def _check_blocks(q_g: Tensor, q_q: Tensor, g_g: Tensor) -> None:
    nq, ng = q_g.shape
    if q_q.shape != (nq, nq) or g_g.shape != (ng, ng):
        raise ValueError(f"re-ranking needs q_g (Nq, Ng), q_q (Nq, Nq) and g_g (Ng, Ng); got q_g "
                         f"{tuple(q_g.shape)}, q_q {tuple(q_q.shape)}, g_g {tuple(g_g.shape)}")
    if nq == 0 or ng == 0:
        raise ValueError(f"re-ranking needs at least one query and one gallery tracklet; got {nq} x {ng}")


def _nearest(rows: _Rows, k: int, chunk_size: int) -> Tensor:
    """(N, k) indices of each row's k nearest, nearest first; fills rows.row_max on the way."""
    nearest = torch.empty(rows.n, k, dtype=torch.int64)
    for start, stop in rows.chunks(chunk_size):
        squared = rows.raw(start, stop)
        rows.row_max[start:stop] = squared.max(1).values
        squared.div_(rows.row_max[start:stop, None])
        nearest[start:stop] = squared.topk(k, 1, largest=False, sorted=True).indices
    return nearest


def _reciprocal(nearest: Tensor, probes: Tensor) -> Tensor:
    """(len(probes), k) mask of R(p, k): nearest[p, a] is reciprocal when p is among its own k nearest."""
    return (nearest[nearest[probes]] == probes[:, None, None]).any(-1)


def _encoding(rows: _Rows, nearest: Tensor, half: Tensor, half_reciprocal: Tensor, start: int,
              stop: int) -> tuple[Tensor, Tensor, Tensor]:
    """V of probes [start, stop) as (row, column, value): exp(−d) on R*(p, k1), normalised to sum 1."""
    probes = torch.arange(start, stop)
    forward = nearest[probes]  # (c, k1 + 1)
    reciprocal = _reciprocal(nearest, probes)  # R(p, k1) as a mask over forward
    # each member q of R(p, k1) brings R(q, k1/2) when more than 2/3 of it lies in R(p, k1)
    candidates, candidate_mask = half[forward], half_reciprocal[forward]  # (c, k1 + 1, k1/2 + 1)
    in_set = ((candidates[..., None] == forward[:, None, None, :]) & reciprocal[:, None, None, :]).any(-1)
    shared = (in_set & candidate_mask).sum(-1)
    accepted = reciprocal & (3 * shared > 2 * candidate_mask.sum(-1))
    expanded = torch.zeros(stop - start, rows.n, dtype=torch.bool)
    row_of = torch.arange(stop - start)[:, None]
    expanded[row_of.expand_as(forward)[reciprocal], forward[reciprocal]] = True
    taken = accepted[..., None] & candidate_mask
    expanded[row_of[..., None].expand_as(candidates)[taken], candidates[taken]] = True
    row, column = expanded.nonzero(as_tuple=True)
    weight = torch.exp(-rows.lookup(row + start, column).double())
    total = torch.zeros(stop - start, dtype=torch.float64).index_add_(0, row, weight)
    return row + start, column, weight / total[row]


def _jaccard(v: scipy.sparse.csr_matrix, nq: int, out: np.ndarray) -> np.ndarray:
    """out (Nq, Ng) = d_J = 1 − Σ min / (2 − Σ min), summed over the non-zero entries of V only (each row of V
    sums to 1, so Σ max = 2 − Σ min)."""
    queries = v[:nq]
    gallery = v[nq:].tocsc()  # column k: the gallery entries g with V_g[k] != 0
    ng = gallery.shape[0]
    column_counts = np.diff(gallery.indptr)
    pairs_per_query = (queries != 0).astype(np.int64) @ column_counts
    start = 0
    while start < nq:
        # as many queries as keep the step within _JACCARD_PAIRS pairs (at least one)
        fitting = np.searchsorted(np.cumsum(pairs_per_query[start:]), _JACCARD_PAIRS, "right")
        stop = start + max(1, int(fitting))
        chunk = queries[start:stop].tocoo()
        begin = gallery.indptr[chunk.col]
        counts = gallery.indptr[chunk.col + 1] - begin
        entry = np.repeat(np.arange(len(counts)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + begin[entry]
        smaller = np.minimum(chunk.data[entry], gallery.data[offsets])
        flat = chunk.row[entry].astype(np.int64) * ng + gallery.indices[offsets]
        temp_min = np.bincount(flat, smaller, (stop - start) * ng).reshape(stop - start, ng)
        out[start:stop] = 1 - temp_min / (2 - temp_min)
        start = stop
    return out


def k_reciprocal_distance(q_g: Tensor, q_q: Tensor, g_g: Tensor, k1: int = K1, k2: int = K2,
                          lambda_value: float = LAMBDA, *, chunk_size: int = 1024) -> Tensor:
    """Re-ranked (Nq, Ng) distance d* from the query × gallery, query × query and gallery × gallery distances
    (symmetric, as distances are), as torchreid's re_ranking computes it, chunk_size rows at a time."""
    if k1 < 1 or k2 < 1 or not 0 <= lambda_value <= 1 or chunk_size < 1:
        raise ValueError(f"re-ranking needs k1 >= 1, k2 >= 1, 0 <= lambda <= 1 and chunk_size >= 1; got "
                         f"k1={k1}, k2={k2}, lambda={lambda_value}, chunk_size={chunk_size}")
    q_g, q_q, g_g = (torch.as_tensor(x) for x in (q_g, q_q, g_g))
    dtype = torch.promote_types(q_g.dtype, torch.float32)
    q_g, q_q, g_g = (x.to(dtype) for x in (q_g, q_q, g_g))
    _check_blocks(q_g, q_q, g_g)
    rows = _Rows(q_g, q_q, g_g)
    n = rows.n
    ranked = _nearest(rows, min(max(k1 + 1, k2), n), chunk_size)
    nearest = ranked[:, : k1 + 1]
    half = nearest[:, : int(np.around(k1 / 2)) + 1]
    half_reciprocal = _reciprocal(half, torch.arange(n))  # R(q, k1/2) of every q, as a mask over half
    pieces = [_encoding(rows, nearest, half, half_reciprocal, start, stop)
              for start, stop in rows.chunks(256)]  # 256 probes: a (256, k1 + 1, k1/2 + 1, k1 + 1) mask
    row, column, value = (torch.cat(x).numpy() for x in zip(*pieces, strict=True))
    v = scipy.sparse.csr_matrix((value, (row, column)), shape=(n, n))
    if k2 != 1:  # local query expansion: V_p becomes the mean V of p's k2 nearest
        expansion = ranked[:, :k2]
        v = scipy.sparse.csr_matrix(
            (np.full(expansion.numel(), 1.0 / expansion.shape[1]),
             (np.repeat(np.arange(n), expansion.shape[1]), expansion.reshape(-1).numpy())), shape=(n, n)) @ v
    jaccard = torch.empty(q_g.shape, dtype=dtype)
    _jaccard(v.tocsr(), rows.nq, jaccard.numpy())  # written in place, in the distances' dtype
    original = q_g.square().div_(rows.row_max[: rows.nq, None])
    return jaccard.mul_(1 - lambda_value).add_(original, alpha=lambda_value)


def self_distance(features: TrackletFeatures, mode: str, alpha: float, *, part_norm: str = "l1",
                  rows: int = 2048, device=None) -> Tensor:
    """(N, N) fused distance of a set of tracklets to itself, filled `rows` rows at a time so that only one
    (N, N) matrix is ever held (fused_distance of the whole set would hold its two branches as well)."""
    out = None
    for start in range(0, len(features), rows):
        block = fused_distance(features[start : start + rows], features, mode, alpha, part_norm=part_norm,
                               device=device)
        if out is None:
            out = torch.empty(len(features), len(features), dtype=block.dtype)
        out[start : start + rows] = block
    return out.fill_diagonal_(0)  # d(x, x) = 0; the matrix-product form leaves rounding noise there


def reranked_distance(q_g: Tensor, query: TrackletFeatures, gallery: TrackletFeatures, mode: str,
                      alpha: float, *, part_norm: str = "l1", k1: int = K1, k2: int = K2,
                      lambda_value: float = LAMBDA, device=None) -> Tensor:
    """k_reciprocal_distance of a mode's fused q_g, its q_q and g_g computed by the same distance."""
    q_q = self_distance(query, mode, alpha, part_norm=part_norm, device=device)
    g_g = self_distance(gallery, mode, alpha, part_norm=part_norm, device=device)
    return k_reciprocal_distance(q_g, q_q, g_g, k1, k2, lambda_value)
