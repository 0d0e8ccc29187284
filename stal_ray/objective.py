"""The STAL objective (Eq. 3-9): attention-aware distances, triplet, softmax and consistency terms."""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stal_ray.config import MINING, PART_NORMS, TRAINED_BRANCHES


def safe_divisor(x: torch.Tensor) -> torch.Tensor:
    """x (>= 0) kept away from 0, so that an all-zero score map gives zero weights, never NaN."""
    return x.clamp_min(torch.finfo(x.dtype).tiny)


def aggregate_temporal(f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Eq. 9: f^r = Σ_t a^{r,t} f^{r,t} / Σ_t a^{r,t}. f (B, T, R, D), a (B, T, R) -> (B, R, D)."""
    return torch.einsum("btr,btrd->brd", a, f) / safe_divisor(a.sum(1))[..., None]


def normalize_part_scores(a_bar: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Eq. 8's an^r = ā^r / ||ā||, ā (..., R) >= 0 -> (..., R). norm "l2": the Euclidean norm (the default:
    with the paper's margins it trains better, README "Choices the paper leaves open"); "l1": Σ_r ā^r, the
    form whose gradient Eq. 12 gives, (1 - an^r) / ||ā||."""
    if norm == "l2":
        return a_bar / safe_divisor(torch.linalg.vector_norm(a_bar, dim=-1, keepdim=True))
    if norm == "l1":
        return a_bar / safe_divisor(a_bar.sum(-1, keepdim=True))
    raise ValueError(f"model.part_norm = {norm!r} is invalid: use one of {', '.join(PART_NORMS)}")


def spatial_scores(a: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Eq. 8's weights: ā^r = mean_t a^{r,t}, returned as an^r = ā^r / ||ā||. a (B, T, R) -> (B, R)."""
    return normalize_part_scores(a.mean(1), norm)


def euclidean_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise ||x_i - y_j||: (..., N, D), (..., M, D) -> (..., N, M), exactly: cdist's matrix-product
    form (||x||² + ||y||² - 2xy, taken for more than 25 rows) loses near neighbours to cancellation."""
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def full_precision(out):
    """A STALOutput with its half-precision (bf16/fp16) tensors as fp32: the objective's distances, their
    differences and the softmax terms round to noise in bf16 (8 bits of mantissa)."""
    def widen(value):
        if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
            return value.float()
        return value
    return dataclasses.replace(out, **{f.name: widen(getattr(out, f.name)) for f in dataclasses.fields(out)})


def psi_distance(
    f_i: torch.Tensor, an_i: torch.Tensor, f_j: torch.Tensor, an_j: torch.Tensor
) -> torch.Tensor:
    """Eq. 8: ψ(i, j) = Σ_r an_i^r an_j^r ||f_i^r - f_j^r||. f (N, R, D), an (N, R) -> (N_i, N_j)."""
    per_part = euclidean_distance(f_i.transpose(0, 1), f_j.transpose(0, 1))  # (R, N_i, N_j)
    return torch.einsum("ir,jr,rij->ij", an_i, an_j, per_part)


def local_distance(
    f_i: torch.Tensor, a_i: torch.Tensor, f_j: torch.Tensor, a_j: torch.Tensor, norm: str = "l2"
) -> torch.Tensor:
    """d_l (Eq. 2) from frame-level part features f (N, T, R, D) and their scores a (N, T, R)."""
    f_i, an_i = aggregate_temporal(f_i, a_i), spatial_scores(a_i, norm)
    f_j, an_j = aggregate_temporal(f_j, a_j), spatial_scores(a_j, norm)
    return psi_distance(f_i, an_i, f_j, an_j)


def global_distance(g_i: torch.Tensor, g_j: torch.Tensor) -> torch.Tensor:
    """d_g(i, j) = ||g_i - g_j|| on temporally pooled global features (N, D)."""
    return euclidean_distance(g_i, g_j)


def triplet_loss(
    distance: torch.Tensor, labels: torch.Tensor, margin: float, mining: str = "batch_hard"
) -> torch.Tensor:
    """One term of Eq. 4, mean over the mined triplets of [d(i, j) - d(i, k) + m]_+ inside a P×K batch.

    `batch_hard` takes, per anchor, the farthest positive and the nearest negative; `all` every valid triplet.
    """
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    anchors = positive.any(1) & negative.any(1)
    if not anchors.any():
        raise ValueError(
            f"no valid triplet in a batch with labels {labels.tolist()}: a batch needs at least 2 identities "
            "and 2 clips of one identity (data.identities_per_batch >= 2, data.clips_per_identity >= 2)"
        )
    if mining == "batch_hard":
        hardest_positive = distance.masked_fill(~positive, float("-inf")).amax(1)
        hardest_negative = distance.masked_fill(~negative, float("inf")).amin(1)
        return F.relu(hardest_positive - hardest_negative + margin)[anchors].mean()
    if mining == "all":
        valid = positive[:, :, None] & negative[:, None, :]  # (anchor, positive, negative)
        return F.relu(distance[:, :, None] - distance[:, None, :] + margin)[valid].mean()
    raise ValueError(f"train.mining = {mining!r} is invalid: use one of {', '.join(MINING)}")


def softmax_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 5, as the negative log-likelihood of the identity of g: logits (B, C). label_smoothing ε > 0
    (beyond the paper; Luo et al. 2019) targets (1 − ε) on the identity plus ε/C on every class."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def consistency_loss(part_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
                     ) -> torch.Tensor:
    """Eq. 6: every f^{r,t} alone must predict the clip's identity. part_logits (B, T, R, C).

    Averaged (not summed) over r and t so that it weighs as much as Eq. 5 whatever T and R are.
    label_smoothing as in softmax_loss.
    """
    b, t, r, _ = part_logits.shape
    return F.cross_entropy(part_logits.flatten(0, 2), labels.repeat_interleave(t * r),
                           label_smoothing=label_smoothing)


def keypoint_loss(joints: torch.Tensor, keypoints: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """Confidence-weighted squared error of learned joints against given ones, in crop fractions."""
    height, width = image_size
    scale = joints.new_tensor([width, height])
    error = ((joints[..., :2] - keypoints[..., :2]) / scale).pow(2).sum(-1)
    confidence = keypoints[..., 2].clamp(min=0)
    return (confidence * error).sum() / confidence.sum().clamp(min=1e-6)


@dataclass
class ObjectiveTerms:
    """Each term of Eq. 3 separately (for logging) and their weighted sum."""

    triplet_global: torch.Tensor
    triplet_local: torch.Tensor
    softmax: torch.Tensor
    consistency: torch.Tensor
    keypoint: torch.Tensor
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in vars(self).items()}


class STALObjective(nn.Module):
    """Eq. 3: L_tri (Eq. 4, global + λ·local) + L_cls (Eq. 5) + C_cons (Eq. 6) [+ keypoint supervision].

    `branches` "global" keeps only the global branch's terms (d_g triplet, softmax), "local" only the local
    branch's (λ·d_l triplet, consistency): each branch trained alone, as in the ablation of §IV-C2. Every
    term is still computed and logged.
    """

    def __init__(
        self,
        margin_global: float = 1.2,
        margin_local: float = 0.8,
        local_weight: float = 0.3,
        mining: str = "batch_hard",
        keypoint_weight: float = 0.0,
        branches: str = "both",
        part_norm: str = "l2",
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"train.label_smoothing = {label_smoothing!r} is invalid: must be in [0, 1)")
        self.label_smoothing = label_smoothing
        if part_norm not in PART_NORMS:
            raise ValueError(f"model.part_norm = {part_norm!r} is invalid: use one of "
                             f"{', '.join(PART_NORMS)}")
        self.part_norm = part_norm
        if mining not in MINING:
            raise ValueError(f"train.mining = {mining!r} is invalid: use one of {', '.join(MINING)}")
        if branches not in TRAINED_BRANCHES:
            allowed = ", ".join(TRAINED_BRANCHES)
            raise ValueError(f"train.branches = {branches!r} is invalid: use one of {allowed}")
        self.branches = branches
        self.margin_global, self.margin_local = margin_global, margin_local
        self.local_weight, self.mining, self.keypoint_weight = local_weight, mining, keypoint_weight

    @classmethod
    def from_config(cls, config) -> "STALObjective":
        train = config.train
        return cls(
            margin_global=train.margin_global,
            margin_local=train.margin_local,
            local_weight=train.local_weight,
            mining=train.mining,
            keypoint_weight=config.model.keypoint_supervision or 0.0,  # null: unresolved, none
            branches=train.branches,
            part_norm=config.model.part_norm,
            label_smoothing=train.label_smoothing,
        )

    def forward(self, out, labels: torch.Tensor, keypoints: torch.Tensor | None = None) -> ObjectiveTerms:
        """out: a STALOutput of a P×K batch; labels (B,) identity indices; keypoints (B, T, 14, 3) or None.
        Every term is computed in fp32 at least, whatever precision the model ran in."""
        out = full_precision(out)
        if keypoints is not None and keypoints.dtype in (torch.float16, torch.bfloat16):
            keypoints = keypoints.float()
        triplet_global = triplet_loss(global_distance(out.g, out.g), labels, self.margin_global, self.mining)
        d_l = local_distance(out.f, out.a, out.f, out.a, self.part_norm)
        triplet_local = triplet_loss(d_l, labels, self.margin_local, self.mining)
        softmax = softmax_loss(out.global_logits, labels, self.label_smoothing)
        consistency = consistency_loss(out.part_logits, labels, self.label_smoothing)
        keypoint = out.g.new_zeros(())
        if self.keypoint_weight > 0 and keypoints is not None:
            keypoint = keypoint_loss(out.joints, keypoints, out.image_size)
        global_terms = triplet_global + softmax  # Eq. 4's first sum, Eq. 5
        local_terms = self.local_weight * triplet_local + consistency  # Eq. 4's second sum, Eq. 6
        total = self.keypoint_weight * keypoint
        if self.branches in ("both", "global"):
            total = total + global_terms
        if self.branches in ("both", "local"):
            total = total + local_terms
        return ObjectiveTerms(triplet_global, triplet_local, softmax, consistency, keypoint, total)
