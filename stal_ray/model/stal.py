"""The STAL network (§III-A, Fig. 2): global branch with RAN, local part branch, STAN; one typed output."""

from dataclasses import dataclass

import torch
from torch import nn

from stal_ray.config import NO_PRETRAINED
from stal_ray.core.skeleton import NUM_JOINTS, NUM_PARTS
from stal_ray.model.attention import STAN, normalize_scores
from stal_ray.model.backbones import build_backbone
from stal_ray.model.blocks import PartLinear
from stal_ray.model.parts import PoseSource, part_boxes, roi_pool
from stal_ray.model.pretrained import load_pretrained
from stal_ray.model.ran import ResidualAttention


@dataclass
class STALOutput:
    """What one forward pass of B clips of T frames gives (R = 6 parts)."""

    g: torch.Tensor  # (B, D_g) global feature, frame features g_t average-pooled over time
    g_frames: torch.Tensor  # (B, T, D_g) frame features g_t (a tracklet's g averages them over all chunks)
    f: torch.Tensor  # (B, T, R, D) local features f^{r,t} (Eq. 1)
    a: torch.Tensor  # (B, T, R) attention scores a^{r,t}, summing to 1 over T×R
    scores: torch.Tensor  # (B, T, R) positive sigmoid scores before the L1 normalisation (a = scores / sum)
    joints: torch.Tensor  # (B, T, 14, 3) the joints the part boxes came from, pixels
    part_boxes: torch.Tensor  # (B, T, R, 4) Eq. 7 boxes, (x_min, y_min, x_max, y_max) pixels
    global_logits: torch.Tensor | None  # (B, C) identity logits of g (Eq. 5); None without classifiers
    part_logits: torch.Tensor | None  # (B, T, R, C) identity logits of every f^{r,t} (Eq. 6)
    image_size: tuple[int, int]  # (H, W) of the frames


class STAL(nn.Module):
    def __init__(
        self,
        backbone: str = "tiny",
        num_classes: int = 0,
        seq_len: int = 8,
        image_size: tuple[int, int] = (224, 224),
        feature_dim: int = 1024,
        pose_source: str = "learned",
        attention: str = "stal",
        part_size: int = 8,
        stan_batchnorm: bool = True,
        stan_fc: str = "frame",
        residual_attention: bool = True,
        bnneck: bool = False,
        ran_after: str = "4b",
    ):
        super().__init__()
        self.seq_len, self.image_size, self.part_size = seq_len, tuple(image_size), part_size
        self.backbone = build_backbone(backbone)
        # decoded uint8 frames -> this model's input; model.pt carries it (model.export)
        self.preprocess = self.backbone.preprocess
        channels = self.backbone.low_channels
        # without RAN (the §IV-C2 ablation) the global branch reads the low-level map as it is
        # model.ran_after: how many of the high-level stages run before RAN (4c: BN-Inception's first)
        self.stages_before_ran = _stages_before_ran(ran_after, backbone)
        low_shape = self._dry_run_shape()
        ran_shape = self._dry_run_shape(self.stages_before_ran) if self.stages_before_ran else low_shape
        ran_channels = ran_shape[1]
        self.ran = ResidualAttention(ran_channels) if residual_attention else nn.Identity()
        self.pose = PoseSource(pose_source, channels)
        self.part_networks = self.backbone.part_networks(NUM_PARTS, feature_dim)
        self.stan = STAN(channels, low_shape[-2:], seq_len, NUM_PARTS, attention,
                         batchnorm=stan_batchnorm, fc=stan_fc)
        self.global_classifier = self.part_classifiers = None
        if num_classes > 0:
            self.global_classifier = nn.Linear(self.backbone.global_dim, num_classes)
            # one classifier per part, shared over frames (Eq. 6)
            self.part_classifiers = PartLinear(NUM_PARTS, feature_dim, num_classes)
        # BNNeck (beyond the paper; Luo et al., "Bag of tricks", CVPR-W 2019): the classifiers read batch-
        # normalised features, the triplets and the test distances the features before it
        self.global_neck = self.part_neck = None
        if num_classes > 0 and bnneck:
            self.global_neck = _neck(self.backbone.global_dim)
            self.part_neck = _neck(NUM_PARTS * feature_dim)  # each part's D channels normalised on their own

    @classmethod
    def from_config(cls, config, num_classes: int) -> "STAL":
        model, data = config.model, config.data
        stal = cls(
            backbone=model.backbone,
            num_classes=num_classes,
            seq_len=data.seq_len,
            image_size=(data.height, data.width),
            feature_dim=model.feature_dim,
            pose_source=model.pose_source,
            attention=model.attention,
            part_size=model.part_size,
            stan_batchnorm=model.stan_batchnorm,
            stan_fc=model.stan_fc,
            residual_attention=model.residual_attention,
            bnneck=model.bnneck,
            ran_after=model.ran_after,
        )
        if model.pretrained and model.pretrained != NO_PRETRAINED:
            stal.load_pretrained(model.pretrained)
        return stal

    def load_pretrained(self, path_or_url: str):
        """ImageNet weights into the backbone, and from there into every part-specific network."""
        report = load_pretrained(self.backbone, path_or_url)
        if report.missing:
            raise ValueError(f"model.pretrained = {path_or_url} does not fit backbone "
                             f"{type(self.backbone).__name__}: {report}")
        self.part_networks.init_from_backbone(self.backbone)
        return report

    @torch.no_grad()
    def _dry_run_shape(self, high_stages: int = 0) -> tuple[int, ...]:
        """Shape (1, C, h, w) of the low-level map after the first `high_stages` high-level stages, from one
        frame of the input size (eval mode: a dry run must not touch BatchNorm statistics)."""
        was_training = self.backbone.training
        self.backbone.eval()
        x = self.backbone.high[:high_stages](self.backbone.low(torch.zeros(1, 3, *self.image_size)))
        self.backbone.train(was_training)
        return tuple(x.shape)

    def _global_branch(self, low: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) low-level maps -> (N, D_g): the high-level stages with RAN before stage
        stages_before_ran (0: on the low-level map itself)."""
        x = low
        for index, stage in enumerate(self.backbone.high):
            if index == self.stages_before_ran:
                x = self.ran(x)
            x = stage(x)
        return x

    def forward(self, clips: torch.Tensor, keypoints: torch.Tensor | None = None) -> STALOutput:
        """clips (B, T, 3, H, W) frames as self.preprocess makes them; keypoints (B, T, 14, 3) pixels or
        None."""
        expected = (self.seq_len, 3, *self.image_size)
        if clips.dim() != 5 or tuple(clips.shape[1:]) != expected:
            shape = ", ".join(map(str, expected))
            raise ValueError(f"STAL expects clips of shape (B, {shape}), got {tuple(clips.shape)}")
        b, t = clips.shape[:2]
        low = self.backbone.low(clips.flatten(0, 1))  # (B·T, C, h, w)
        g_frames = self._global_branch(low).view(b, t, -1)  # (B, T, D_g)
        g = g_frames.mean(1)  # (B, D_g)

        if keypoints is not None:
            if tuple(keypoints.shape) != (b, t, NUM_JOINTS, 3):
                expected = (b, t, NUM_JOINTS, 3)
                raise ValueError(f"keypoints must have shape {expected}, got {tuple(keypoints.shape)}")
            keypoints = keypoints.flatten(0, 1)
        joints = self.pose(low, self.image_size, keypoints)  # (B·T, 14, 3)
        boxes = part_boxes(joints, self.image_size)  # (B·T, R, 4)
        part_maps = roi_pool(low, boxes, self.image_size, self.part_size)  # (B·T, R, C, S, S)
        f = self.part_networks(part_maps).view(b, t, NUM_PARTS, -1)  # (B, T, R, D)
        scores = self.stan.raw_scores(low.view(b, t, *low.shape[1:]))  # (B, T, R)

        global_logits = part_logits = None
        if self.global_classifier is not None:
            parts = f.flatten(0, 1)  # (B·T, R, D)
            if self.global_neck is not None:
                global_logits = self.global_classifier(self.global_neck(g))
                parts = self.part_neck(parts.flatten(1)).view_as(parts)
            else:
                global_logits = self.global_classifier(g)
            part_logits = self.part_classifiers(parts).view(b, t, NUM_PARTS, -1)
        return STALOutput(
            g=g,
            g_frames=g_frames,
            f=f,
            a=normalize_scores(scores),
            scores=scores,
            joints=joints.view(b, t, NUM_JOINTS, 3),
            part_boxes=boxes.view(b, t, NUM_PARTS, 4),
            global_logits=global_logits,
            part_logits=part_logits,
            image_size=self.image_size,
        )


def _stages_before_ran(ran_after: str, backbone: str) -> int:
    if ran_after == "4b":
        return 0
    if ran_after == "4c" and backbone == "bninception":
        return 1  # inception4c, the first high-level stage (608 channels in this BN-Inception)
    raise ValueError(f"model.ran_after = {ran_after!r} is invalid for backbone {backbone!r}: use '4b', or "
                     "'4c' with bninception")


def _neck(channels: int) -> nn.BatchNorm1d:
    """BNNeck's BatchNorm, its shift frozen at 0 (Luo et al.: a bias would keep the classes' features apart
    from the origin the triplets measure around)."""
    neck = nn.BatchNorm1d(channels)
    neck.bias.requires_grad_(False)
    return neck
