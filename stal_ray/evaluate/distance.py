"""Test-time tracklet distances: Eq. 8's d_l, the global d_g and d_l + α·d_g, per attention switch."""

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from stal_ray.config_schema import DISTANCE_MODES
from stal_ray.objective import normalize_part_scores

MODES = DISTANCE_MODES  # the paper's test switches (config_schema.py says what each is)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"distance mode {mode!r} is invalid: use one of {', '.join(MODES)}")


@dataclass
class TrackletFeatures:
    """One row per tracklet (float CPU tensors), everything the test distances of every mode need."""

    g: Tensor  # (N, Dg) global feature, mean of g_t over all frames
    f_attended: Tensor  # (N, R, D) Eq. 9 with the full scores a^{r,t}
    f_temporal: Tensor  # (N, R, D) Eq. 9 with per-frame scores only (scores averaged over parts)
    f_mean: Tensor  # (N, R, D) plain average of f^{r,t} over frames
    part_scores: Tensor  # (N, R) ā^r, mean over frames of the scores (any positive scale; normalised here)

    def __post_init__(self):
        shapes = {field.name: tuple(getattr(self, field.name).shape) for field in fields(self)}
        n = shapes["g"][0] if len(shapes["g"]) == 2 else None
        part_shape = shapes["f_attended"]
        consistent = (
            n is not None
            and len(part_shape) == 3
            and part_shape[0] == n
            and shapes["f_temporal"] == shapes["f_mean"] == part_shape
            and shapes["part_scores"] == part_shape[:2]
        )
        if not consistent:
            raise ValueError(f"TrackletFeatures needs g (N, Dg), f_attended, f_temporal and f_mean (N, R, D) "
                             f"and part_scores (N, R) with one N, R and D; got {shapes}")
        if (self.part_scores < 0).any():
            # Eq. 8 weighs parts by attention, which is positive; sqrt(an_i² an_j² ·) below relies on it
            raise ValueError("part_scores must be >= 0 (attention scores)")

    def __len__(self) -> int:
        return self.g.shape[0]

    def __getitem__(self, index) -> "TrackletFeatures":
        """Rows by a slice, an int (kept as one row), an int array or a bool mask (numpy or torch)."""
        if isinstance(index, (int, np.integer)):
            index = slice(index, index + 1 if index != -1 else None)
        elif not isinstance(index, slice):
            index = torch.as_tensor(np.asarray(index) if not isinstance(index, Tensor) else index)
        return TrackletFeatures(**{field.name: getattr(self, field.name)[index] for field in fields(self)})

    def parts(self, mode: str, part_norm: str = "l2") -> tuple[Tensor, Tensor]:
        """Part features f (N, R, D) and Eq. 8's weights an (N, R), ā / ||ā|| under model.part_norm, for a
        mode.

        global and local use stal's parts, so that their d_l is the one the fused stal distance adds up.
        """
        check_mode(mode)
        uniform = torch.ones_like(self.part_scores)  # all scores 1
        if mode == "tan":
            return self.f_temporal, normalize_part_scores(uniform, part_norm)
        if mode == "san":
            return self.f_mean, normalize_part_scores(self.part_scores, part_norm)
        if mode == "baseline":
            return self.f_mean, normalize_part_scores(uniform, part_norm)
        return self.f_attended, normalize_part_scores(self.part_scores, part_norm)


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _augmented(f: Tensor, an: Tensor, gallery: bool, device: torch.device) -> Tensor:
    """(R, N, D + 2): [an² f, an² ||f||², an²] (query side) or [−2 an² f, an², an² ||f||²] (gallery side)."""
    f = f.to(device).transpose(0, 1)
    r, n, d = f.shape
    w = an.to(device).T.square()[..., None]  # (R, N, 1)
    square = torch.linalg.vector_norm(f, dim=-1, keepdim=True).square_()
    out = torch.empty(r, n, d + 2, dtype=f.dtype, device=device)
    # written in place: the (R, N, D) block is the big one, and cat would copy it once more
    if gallery:
        torch.mul(f, -2 * w, out=out[..., :d])
        out[..., d : d + 1], out[..., d + 1 :] = w, w * square
    else:
        torch.mul(f, w, out=out[..., :d])
        out[..., d : d + 1], out[..., d + 1 :] = w * square, w
    return out


def _weighted_distances(f_q: Tensor, an_q: Tensor, f_g: Tensor, an_g: Tensor, chunk_size: int,
                        device: torch.device) -> Tensor:
    """Eq. 8: Σ_r an_q^r an_g^r ||f_q^r − f_g^r||, f (N, R, D), an (N, R) -> (Nq, Ng) on the CPU.

    One batched product per chunk of query rows gives an_q² an_g² ||f_q − f_g||² directly: the query side
    [an_q² f_q, an_q² ||f_q||², an_q²] times the gallery side [−2 an_g² f_g, an_g², an_g² ||f_g||²]. Folding
    the norms and weights into two extra columns leaves only clamp, sqrt and the sum over parts as passes
    over the (R, chunk, Ng) block; since an >= 0, sqrt(an_q² an_g² ·) = an_q an_g sqrt(·).
    """
    gallery_side = _augmented(f_g, an_g, True, device).transpose(1, 2)  # (R, D + 2, Ng)
    out = torch.empty(len(f_q), len(f_g), dtype=f_q.dtype)
    for start in range(0, len(f_q), chunk_size):
        rows = slice(start, start + chunk_size)
        squared = torch.bmm(_augmented(f_q[rows], an_q[rows], False, device), gallery_side)
        squared.clamp_min_(0).sqrt_()  # rounding can make a zero distance slightly negative
        if device.type == "cpu":
            torch.sum(squared, 0, out=out[rows])
        else:
            out[rows] = squared.sum(0).cpu()
    return out


def _check_shapes(query: TrackletFeatures, gallery: TrackletFeatures) -> None:
    for name in ("f_attended", "g"):
        q, g = getattr(query, name), getattr(gallery, name)
        if q.shape[1:] != g.shape[1:] or q.dtype != g.dtype:
            raise ValueError(f"query {name} {tuple(q.shape)} {q.dtype} and gallery {name} {tuple(g.shape)} "
                             f"{g.dtype} differ in their per-tracklet shape or dtype; extract both with the "
                             "same model")


def _full_precision(features: TrackletFeatures) -> TrackletFeatures:
    """bf16/fp16 features as fp32: the distances' matrix-product form cancels to noise in half precision."""
    if features.g.dtype not in (torch.float16, torch.bfloat16):
        return features
    return TrackletFeatures(**{f.name: getattr(features, f.name).float() for f in fields(features)})


def _distances(query: TrackletFeatures, gallery: TrackletFeatures, mode: str, local: bool, global_: bool,
               chunk_size: int, device, part_norm: str) -> tuple[Tensor | None, Tensor | None]:
    check_mode(mode)
    _check_shapes(query, gallery)
    query, gallery = _full_precision(query), _full_precision(gallery)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = _default_device(device)
    d_l = d_g = None
    if local:
        f_q, an_q = query.parts(mode, part_norm)
        f_g, an_g = gallery.parts(mode, part_norm)
        d_l = _weighted_distances(f_q, an_q, f_g, an_g, chunk_size, device)
    if global_:
        # d_g is Eq. 8 with a single part of weight 1
        ones_q, ones_g = query.g.new_ones(len(query), 1), gallery.g.new_ones(len(gallery), 1)
        d_g = _weighted_distances(query.g[:, None], ones_q, gallery.g[:, None], ones_g, chunk_size, device)
    return d_l, d_g


def branch_distances(query: TrackletFeatures, gallery: TrackletFeatures, mode: str = "stal", *,
                     chunk_size: int = 512, device=None, part_norm: str = "l2") -> tuple[Tensor, Tensor]:
    """(d_l, d_g), each (Nq, Ng) on the CPU in the features' dtype (fp32 at least): d_l by Eq. 8 with the
    mode's parts and weights (part_norm: the model's model.part_norm), d_g = ||g_i − g_j||. Computed on
    `device` (default: cuda if available), chunk_size query rows at a time."""
    return _distances(query, gallery, mode, True, True, chunk_size, device, part_norm)


def fuse(d_l: Tensor, d_g: Tensor, mode: str, alpha: float) -> Tensor:
    """The test distance of a mode: d_g for global, d_l for local, else d_l + α·d_g (α the fusion rate)."""
    check_mode(mode)
    if mode == "global":
        return d_g
    if mode == "local":
        return d_l
    return d_l + alpha * d_g


def fused_distance(query: TrackletFeatures, gallery: TrackletFeatures, mode: str = "stal", alpha: float = 0.3,
                   *, chunk_size: int = 512, device=None, part_norm: str = "l2") -> Tensor:
    """fuse(branch_distances(...)), computing only the branches the mode uses."""
    d_l, d_g = _distances(query, gallery, mode, mode != "global", mode != "local", chunk_size, device,
                          part_norm)
    return fuse(d_l, d_g, mode, alpha)
