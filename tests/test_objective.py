"""The objective: Eq. 8 and 9 against plain references and gradcheck, triplet mining, Eq. 5 and 6."""

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from stal_ray.model.stal import STALOutput
from stal_ray.objective import (
    STALObjective,
    aggregate_temporal,
    consistency_loss,
    global_distance,
    local_distance,
    psi_distance,
    softmax_loss,
    spatial_scores,
    triplet_loss,
)

B, T, R, D = 5, 4, 6, 7


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def clip_features(generator, dtype=torch.float32):
    f = torch.randn(B, T, R, D, dtype=dtype, generator=generator)
    a = torch.rand(B, T, R, dtype=dtype, generator=generator) + 0.1
    return f, a / a.sum(dim=(1, 2), keepdim=True)


def test_aggregation_matches_eq9_written_out(generator):
    f, a = clip_features(generator)
    out = aggregate_temporal(f, a)
    for i, r in itertools.product(range(B), range(R)):
        expected = sum(a[i, t, r] * f[i, t, r] for t in range(T)) / sum(a[i, t, r] for t in range(T))
        assert torch.allclose(out[i, r], expected, atol=1e-5)


@pytest.mark.parametrize("part_norm", ["l1", "l2"])
def test_psi_matches_eq8_written_out(generator, part_norm):
    f, a = clip_features(generator)
    d_l = local_distance(f, a, f, a, part_norm)
    f_r = aggregate_temporal(f, a)
    a_bar = a.mean(1)

    def norm_of(i):  # ||ā_i||: L2 by default, L1 as Eq. 12 differentiates it (README)
        if part_norm == "l1":
            return sum(a_bar[i, r] for r in range(R))
        return sum(a_bar[i, r] ** 2 for r in range(R)) ** 0.5

    for i, j in itertools.product(range(B), range(B)):
        norm = norm_of(i) * norm_of(j)
        expected = sum(a_bar[i, r] * a_bar[j, r] / norm * (f_r[i, r] - f_r[j, r]).norm() for r in range(R))
        assert d_l[i, j].item() == pytest.approx(float(expected), abs=1e-4)


def test_average_pooling_is_the_equal_score_special_case(generator):
    f, _ = clip_features(generator)
    equal = torch.full((B, T, R), 1.0 / (T * R))
    assert torch.allclose(aggregate_temporal(f, equal), f.mean(1), atol=1e-6)
    # with equal scores every part weighs an_i^r an_j^r = 1/R
    pooled = f.mean(1)
    expected = sum(torch.cdist(pooled[:, r], pooled[:, r]) for r in range(R)) / R
    assert torch.allclose(local_distance(f, equal, f, equal), expected, atol=1e-5)


def test_eq9_gradcheck(generator):
    f, a = clip_features(generator, torch.float64)
    assert torch.autograd.gradcheck(aggregate_temporal, (f.requires_grad_(), a.requires_grad_()))


def test_eq8_gradcheck(generator):
    f, a = clip_features(generator, torch.float64)
    f_i, f_j = f[:3].clone(), f[3:].clone()
    a_i, a_j = a[:3].clone(), a[3:].clone()

    def psi(f_i, a_i, f_j, a_j):
        return psi_distance(f_i.mean(1), spatial_scores(a_i), f_j.mean(1), spatial_scores(a_j))

    inputs = tuple(x.requires_grad_() for x in (f_i, a_i, f_j, a_j))
    assert torch.autograd.gradcheck(psi, inputs)
    assert torch.autograd.gradcheck(local_distance, inputs)


def test_distance_gradients_are_finite_on_the_diagonal(generator):
    f, a = clip_features(generator)
    f.requires_grad_(True)
    g = torch.randn(B, D, requires_grad=True)
    (local_distance(f, a, f, a).sum() + global_distance(g, g).sum()).backward()
    assert torch.isfinite(f.grad).all() and torch.isfinite(g.grad).all()


def reference_triplets(distance, labels, margin, mining):
    losses = []
    for i in range(len(labels)):
        positives = [j for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        negatives = [k for k in range(len(labels)) if labels[k] != labels[i]]
        if not positives or not negatives:
            continue
        if mining == "batch_hard":
            hardest = max(distance[i, j] for j in positives) - min(distance[i, k] for k in negatives)
            losses.append(max(0.0, float(hardest) + margin))
        else:
            for j, k in itertools.product(positives, negatives):
                losses.append(max(0.0, float(distance[i, j] - distance[i, k]) + margin))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("mining", ["batch_hard", "all"])
def test_triplet_loss_matches_a_plain_loop(generator, mining):
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # identity 3 has no positive: not an anchor
    x = torch.randn(len(labels), 3, generator=generator)
    distance = global_distance(x, x)
    loss = triplet_loss(distance, labels, margin=0.5, mining=mining)
    assert loss.item() == pytest.approx(reference_triplets(distance, labels, 0.5, mining), abs=1e-5)


def test_triplet_loss_without_positives_says_what_the_batch_needs():
    with pytest.raises(ValueError, match="clips_per_identity"):
        triplet_loss(torch.rand(4, 4), torch.tensor([0, 1, 2, 3]), margin=1.0)


def test_consistency_averages_every_part_and_frame(generator):
    logits = torch.randn(B, T, R, 9, generator=generator)
    labels = torch.randint(0, 9, (B,), generator=generator)
    expected = torch.stack(
        [F.cross_entropy(logits[:, t, r], labels) for t in range(T) for r in range(R)]
    ).mean()
    assert torch.allclose(consistency_loss(logits, labels), expected, atol=1e-6)


def smoothed_cross_entropy(logits, labels, epsilon):
    """−Σ_c q_c log p_c with q = (1 − ε)·one-hot + ε/C (Szegedy et al. 2016; Luo et al. 2019), written out."""
    classes = logits.shape[-1]
    q = (1 - epsilon) * F.one_hot(labels, classes).to(logits.dtype) + epsilon / classes
    return -(q * logits.log_softmax(-1)).sum(-1).mean()


def test_label_smoothing_of_the_softmax_and_consistency_terms(generator):
    logits = torch.randn(B, 9, generator=generator, dtype=torch.float64)
    part_logits = torch.randn(B, T, R, 9, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 9, (B,), generator=generator)
    smoothed = softmax_loss(logits, labels, 0.1)
    assert smoothed.item() == pytest.approx(smoothed_cross_entropy(logits, labels, 0.1).item(), rel=1e-12)
    assert smoothed.item() == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item())
    assert smoothed.item() != pytest.approx(softmax_loss(logits, labels).item())  # the paper's, ε = 0
    expected = torch.stack([smoothed_cross_entropy(part_logits[:, t, r], labels, 0.1)
                            for t in range(T) for r in range(R)]).mean()
    assert consistency_loss(part_logits, labels, 0.1).item() == pytest.approx(expected.item(), rel=1e-12)


def test_objective_takes_label_smoothing_from_the_config(generator):
    from stal_ray.config import load_config

    out, labels = bf16_batch(generator)
    plain = STALObjective.from_config(load_config())(out, labels)
    smoothed = STALObjective.from_config(load_config(None, ["train.label_smoothing=0.2"]))(out, labels)
    want = F.cross_entropy(out.global_logits.float(), labels, label_smoothing=0.2)
    assert smoothed.softmax.item() == pytest.approx(want.item(), rel=1e-6)
    assert smoothed.softmax.item() != pytest.approx(plain.softmax.item())
    assert smoothed.triplet_global.item() == plain.triplet_global.item()  # triplets are untouched
    with pytest.raises(ValueError, match="train.label_smoothing = 1.0 is invalid"):
        STALObjective(label_smoothing=1.0)


def test_an_all_zero_score_map_gives_zero_weights_not_nan(generator):
    f, a = clip_features(generator)
    a[1] = 0  # every sigmoid score of one clip underflowed
    f.requires_grad_(True)
    d_l = local_distance(f, a, f, a)
    assert torch.isfinite(d_l).all() and (d_l[1] == 0).all() and (d_l[:, 1] == 0).all()
    d_l.sum().backward()
    assert torch.isfinite(f.grad).all()
    assert (spatial_scores(a)[1] == 0).all() and torch.isfinite(aggregate_temporal(f, a)).all()


def bf16_batch(generator, p=8, k=4):
    """A STALOutput of P×K = 32 clips in bf16 as a trained model gives them: features far from the origin
    (a shared offset), identities apart, clips of one identity near neighbours. The matrix-product form of
    the distance (||x||² + ||y||² - 2xy) loses such distances to cancellation."""
    labels = torch.arange(p).repeat_interleave(k)
    dim, t, classes = 256, 4, p

    def near(shape_tail):
        shared = 20 * torch.randn(*shape_tail, generator=generator)
        identity = torch.randn(p, *shape_tail, generator=generator).repeat_interleave(k, 0)
        return shared + identity + 0.02 * torch.randn(p * k, *shape_tail, generator=generator)

    scores = torch.rand(p * k, t, R, generator=generator) + 0.5
    out = STALOutput(
        g=near((dim,)), g_frames=torch.zeros(p * k, t, dim), f=near((t, R, dim)),
        a=scores / scores.sum((1, 2), keepdim=True), scores=scores, joints=torch.zeros(p * k, t, 14, 3),
        part_boxes=torch.zeros(p * k, t, R, 4),
        global_logits=torch.randn(p * k, classes, generator=generator),
        part_logits=torch.randn(p * k, t, R, classes, generator=generator), image_size=(64, 32))
    as_bf16 = dataclasses.replace(out, **{name: getattr(out, name).bfloat16()
                                          for name in ("g", "f", "a", "global_logits", "part_logits")})
    return as_bf16, labels


def test_objective_on_bf16_outputs_matches_an_fp64_reference(generator):
    out, labels = bf16_batch(generator)
    # the reference: the very same bf16 values, every operation in fp64
    exact = dataclasses.replace(out, **{name: getattr(out, name).double()
                                        for name in ("g", "f", "a", "global_logits", "part_logits")})
    objective = STALObjective(margin_global=1.2, margin_local=0.8)  # the paper's margins
    terms, reference = objective(out, labels), objective(exact, labels)
    assert terms.total.dtype == torch.float32
    for name in ("triplet_global", "triplet_local", "softmax", "consistency", "total"):
        got, want = getattr(terms, name).item(), getattr(reference, name).item()
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), name
    # and the fp64 terms are Eq. 4 written out
    want = reference_triplets(global_distance(exact.g, exact.g), labels, 1.2, "batch_hard")
    assert reference.triplet_global.item() == pytest.approx(want, abs=1e-9)
    # near neighbours stay resolved: every positive pair is far closer than any negative
    d_g = global_distance(out.g.float(), out.g.float())
    same = labels[:, None] == labels[None, :]
    assert d_g[same].max() < d_g[~same].min() / 5
