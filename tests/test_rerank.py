"""Test k-reciprocal re-ranking: against a plain transcription of Zhong et al.'s algorithm on the assembled
(N, N) matrix, that it ranks better where neighbourhoods carry the identity, and the errors."""

import numpy as np
import pytest
import torch

from stal_ray.evaluate.distance import TrackletFeatures, fused_distance
from stal_ray.evaluate.ranking import evaluate_ranking
from stal_ray.evaluate.rerank import k_reciprocal_distance, reranked_distance, self_distance


def reference_rerank(q_g, q_q, g_g, k1, k2, lambda_value):
    """The algorithm written out set by set, one probe at a time, on the whole (N, N) matrix (float64)."""
    d = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float64) ** 2
    d = d / d.max(1, keepdims=True)
    n, nq = len(d), len(q_g)
    rank = np.argsort(d, 1, kind="stable")

    def reciprocal(p, k):
        return {q for q in rank[p, : k + 1] if p in rank[q, : k + 1]}

    v = np.zeros((n, n))
    for p in range(n):
        r = reciprocal(p, k1)
        expanded = set(r)
        for q in r:
            r_half = reciprocal(q, int(np.around(k1 / 2)))
            if len(r_half & r) > 2 / 3 * len(r_half):
                expanded |= r_half
        members = sorted(expanded)
        weight = np.exp(-d[p, members])
        v[p, members] = weight / weight.sum()
    if k2 != 1:
        v = np.stack([v[rank[p, :k2]].mean(0) for p in range(n)])
    out = np.zeros((nq, n - nq))
    for p in range(nq):
        for g in range(nq, n):
            jaccard = 1 - np.minimum(v[p], v[g]).sum() / np.maximum(v[p], v[g]).sum()
            out[p, g - nq] = (1 - lambda_value) * jaccard + lambda_value * d[p, g]
    return out


def euclidean_blocks(nq, ng, dim=8, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    q, g = torch.randn(nq, dim, generator=generator, dtype=dtype), torch.randn(ng, dim, generator=generator,
                                                                               dtype=dtype)
    return torch.cdist(q, g), torch.cdist(q, q), torch.cdist(g, g)


@pytest.mark.parametrize("k1, k2, lambda_value", [(20, 6, 0.3), (5, 1, 0.0), (7, 3, 1.0), (3, 9, 0.5)])
def test_equals_plain_reference(k1, k2, lambda_value):
    q_g, q_q, g_g = euclidean_blocks(13, 47, seed=k1)
    expected = reference_rerank(q_g.numpy(), q_q.numpy(), g_g.numpy(), k1, k2, lambda_value)
    # small chunks: rows cross several chunks of both parts
    ours = k_reciprocal_distance(q_g, q_q, g_g, k1, k2, lambda_value, chunk_size=5)
    assert ours.shape == (13, 47) and ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)


def test_fewer_tracklets_than_k1_and_k2():
    q_g, q_q, g_g = euclidean_blocks(2, 4, seed=5)
    expected = reference_rerank(q_g.numpy(), q_q.numpy(), g_g.numpy(), 20, 6, 0.3)
    ours = k_reciprocal_distance(q_g, q_q, g_g, 20, 6, 0.3)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)


def test_float32_and_one_jaccard_step_per_query(monkeypatch):
    """float32 distances (what evaluation passes) and Jaccard sums split into the smallest steps agree too."""
    import stal_ray.evaluate.rerank as rerank

    q_g, q_q, g_g = euclidean_blocks(9, 30, seed=3)
    expected = reference_rerank(q_g.numpy(), q_q.numpy(), g_g.numpy(), 20, 6, 0.3)
    monkeypatch.setattr(rerank, "_JACCARD_PAIRS", 1)
    ours = k_reciprocal_distance(q_g.float(), q_q.float(), g_g.float())
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-6)


def clustered(identities: int, per_identity: int, spread: float, seed: int, dim: int = 16):
    """Points around one centre per identity, shuffled; identity labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    labels = np.repeat(np.arange(identities), per_identity)
    points = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return torch.from_numpy(points), labels


def test_improves_map_when_gallery_neighbourhoods_carry_the_identity():
    """Each identity's gallery tracklets lie on a chain (consecutive ones close, the far end far from the
    query), as a walk through viewpoints does; a query is near one end. Plain distance ranks the far end of
    its own chain below other identities' near ends; the k-reciprocal neighbourhoods follow the chain."""
    rng = np.random.default_rng(0)
    identities, steps, dim = 12, 8, 32
    queries, gallery, q_pids, g_pids = [], [], [], []
    for identity in range(identities):
        start, direction = rng.normal(size=dim), rng.normal(size=dim)
        direction /= np.linalg.norm(direction)
        # steps of length 1: the chain's far end lies ~8 from the query, other identities' starts ~8 too
        chain = start + np.arange(steps)[:, None] * direction + 0.15 * rng.normal(size=(steps, dim))
        gallery.append(chain)
        queries.append(start - direction + 0.15 * rng.normal(size=dim))
        g_pids += [identity] * steps
        q_pids.append(identity)
    q, g = torch.from_numpy(np.stack(queries)), torch.from_numpy(np.concatenate(gallery))
    q_pids, g_pids = np.array(q_pids), np.array(g_pids)
    q_cams, g_cams = np.zeros(len(q_pids), int), np.ones(len(g_pids), int)
    plain = torch.cdist(q, g)
    reranked = k_reciprocal_distance(plain, torch.cdist(q, q), torch.cdist(g, g), k1=6, k2=3)
    before = evaluate_ranking(plain, q_pids, g_pids, q_cams, g_cams).mAP
    after = evaluate_ranking(reranked, q_pids, g_pids, q_cams, g_cams).mAP
    assert before < 0.9 and after > before + 0.1, (before, after)


def features(n: int, seed: int) -> TrackletFeatures:
    generator = torch.Generator().manual_seed(seed)
    f = torch.randn(n, 3, 4, generator=generator)
    return TrackletFeatures(g=torch.randn(n, 5, generator=generator), f_attended=f, f_temporal=f.flip(1),
                            f_mean=f * 0.5, part_scores=torch.rand(n, 3, generator=generator) + 0.1)


@pytest.mark.parametrize("mode", ["stal", "tan", "global", "local"])
def test_self_distance_is_the_fused_distance_in_row_chunks(mode):
    x = features(11, 0)
    whole = fused_distance(x, x, mode, 0.3, part_norm="l2")
    chunked = self_distance(x, mode, 0.3, part_norm="l2", rows=4)
    assert torch.equal(chunked.diagonal(), torch.zeros(11))
    off_diagonal = ~torch.eye(11, dtype=torch.bool)
    torch.testing.assert_close(chunked[off_diagonal], whole[off_diagonal])


def test_reranked_distance_uses_the_modes_own_distances():
    query, gallery = features(6, 1), features(25, 2)
    q_g = fused_distance(query, gallery, "san", 0.5)
    q_q, g_g = self_distance(query, "san", 0.5), self_distance(gallery, "san", 0.5)
    expected = k_reciprocal_distance(q_g, q_q, g_g, k1=5, k2=2, lambda_value=0.4)
    ours = reranked_distance(q_g, query, gallery, "san", 0.5, k1=5, k2=2, lambda_value=0.4)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("shapes, match", [
    (((3, 4), (3, 3), (5, 5)), "g_g"),
    (((3, 4), (4, 4), (4, 4)), "q_q"),
    (((0, 4), (0, 0), (4, 4)), "at least one query"),
])
def test_bad_block_shapes_are_refused(shapes, match):
    with pytest.raises(ValueError, match=match):
        k_reciprocal_distance(*(torch.zeros(s) for s in shapes))


@pytest.mark.parametrize("kwargs", [dict(k1=0), dict(k2=0), dict(lambda_value=1.5), dict(chunk_size=0)])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(ValueError, match="re-ranking needs k1 >= 1"):
        k_reciprocal_distance(*euclidean_blocks(2, 3), **kwargs)
