"""Training augmentation beyond the paper (issue 22; the paper uses none, §IV-A), in the decoding tasks.

Four switches of config.data, each off by default: horizontal flip, pad-and-random-crop, colour jitter and
random erasing (Zhong et al., "Random erasing data augmentation", AAAI 2020), the first three as in Luo et
al.'s "Bag of tricks" (CVPR-W 2019) for images. A video clip gets ONE draw for all of its T frames: the same
flip, crop offset, colour and erased rectangle, so the sequence stays a sequence and an erased rectangle is
an occluder that stays put, as a real one does in a short clip, which STAL's attention should learn to
down-weight.

Keypoints travel with the frames and follow them: mirrored (x -> W - x, in pixels whose edges are 0 and W,
as model.parts reads them) with left and right joints swapped, shifted with the crop, and a joint that the
crop moves out of the frame or the erased rectangle covers gets confidence 0, as a hidden joint has.

Every clip's draw comes from (stream seed, epoch, identity, group, clip) alone, never from which task decodes
it or in what order, so the same group gets the same augmentation in every run (with or without
train.deterministic). The work is numpy on the decoded uint8 batch: parameters drawn per group, the flip
one fancy-indexed copy for the batch, the crop a slice copy per clip in place, colour a per-clip lookup
table, erasing a slice fill.
"""

from dataclasses import dataclass

import numpy as np

from stal_ray.config_schema import stream_seed
from stal_ray.core import skeleton

MIRRORED_JOINTS = np.array(skeleton.MIRRORED_JOINTS)  # the joint order after a left-right flip
# Zhong et al.'s random erasing: area 2-40% of the frame, aspect ratio (height / width) 0.3 to 1/0.3
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = (0.3, 1 / 0.3)
# uniform numbers drawn per clip, whichever switches are on, so each switch's draws do not depend on others
_DRAWS = 16


@dataclass(frozen=True)
class Augmentation:
    """The data.* augmentation switches for one epoch; call it on a decoded batch. Build it with
    `from_config`, which gives None when every switch is off (the paper's training, bit-identical)."""

    flip: bool = False
    crop_padding: int = 0
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    seed: int = 0
    epoch: int = 0

    @classmethod
    def from_config(cls, config, epoch: int) -> "Augmentation | None":
        data = config.data
        augmentation = cls(flip=data.flip, crop_padding=data.crop_padding, color_jitter=data.color_jitter,
                           random_erasing=data.random_erasing, seed=stream_seed(config), epoch=epoch)
        return augmentation if augmentation.active else None

    @property
    def active(self) -> bool:
        return self.flip or self.crop_padding > 0 or self.color_jitter > 0 or self.random_erasing > 0

    def draws(self, identities: np.ndarray, groups: np.ndarray, clips_per_group: int) -> np.ndarray:
        """(rows · K, _DRAWS) uniform numbers in [0, 1), from (seed, epoch, identity, group) per row."""
        return np.concatenate([
            np.random.default_rng([self.seed, self.epoch, int(identity), int(group), 22]).random(
                (clips_per_group, _DRAWS))
            for identity, group in zip(identities.tolist(), groups.tolist(), strict=True)
        ]) if len(identities) else np.zeros((0, _DRAWS))

    def __call__(self, clips, keypoints: np.ndarray, identities: np.ndarray,
                 groups: np.ndarray) -> tuple:
        """clips uint8 (rows, K, T, H, W, 3), keypoints (rows, K, T, 14, 3) in its pixels, and each row's
        identity and group number -> both augmented (new arrays, or the inputs changed in place). clips may
        be a torch tensor on any device (data.consumer's nvJPEG path): the same operations run there (the
        colour jitter's clip mean summed in another order, so a level may differ by one)."""
        shape, joint_shape = tuple(clips.shape), keypoints.shape
        rows, k = shape[:2]
        height, width = shape[-3:-1]
        u = self.draws(np.asarray(identities), np.asarray(groups), k)
        clips = clips.reshape(rows * k, *shape[2:])
        if isinstance(clips, np.ndarray) and not clips.flags.writeable:
            clips = clips.copy()
        keypoints = keypoints.reshape(rows * k, *joint_shape[2:]).copy()
        seen = keypoints[..., 2] > 0
        x, y = keypoints[..., 0], keypoints[..., 1]  # views
        torch_pixels = not isinstance(clips, np.ndarray)
        if self.flip:
            flipped = np.flatnonzero(u[:, 0] < 0.5)
            if torch_pixels:
                clips[flipped] = clips[flipped].flip(3)
            else:
                clips[flipped] = clips[flipped][:, :, :, ::-1]
            x[flipped] = np.where(seen[flipped], width - x[flipped], x[flipped])
            keypoints[flipped] = keypoints[flipped][:, :, MIRRORED_JOINTS]
            seen = keypoints[..., 2] > 0
        if self.crop_padding > 0:
            pad = self.crop_padding
            shifts = np.floor(u[:, 1:3] * (2 * pad + 1)).astype(np.int64) - pad  # (dy, dx) in [-pad, pad]
            for clip in np.flatnonzero(shifts.any(axis=1)):
                _shift(clips[clip], *shifts[clip])
            y += np.where(seen, shifts[:, None, None, 0], 0)
            x += np.where(seen, shifts[:, None, None, 1], 0)
            outside = (x < 0) | (x > width) | (y < 0) | (y > height)
            keypoints[..., 2] = np.where(seen & outside, 0.0, keypoints[..., 2])
            seen = keypoints[..., 2] > 0
        if self.color_jitter > 0:
            (_jitter_torch if torch_pixels else _jitter)(clips, u[:, 3:8], self.color_jitter)
        if self.random_erasing > 0:
            boxes = _erase_boxes(u[:, 9:13], height, width)
            colours = np.floor(u[:, 13:16] * 256).astype(np.uint8)
            for clip in np.flatnonzero(u[:, 8] < self.random_erasing):
                top, left, bottom, right = boxes[clip]
                clips[clip, :, top:bottom, left:right] = _like(clips, colours[clip])
                covered = (x[clip] >= left) & (x[clip] <= right) & (y[clip] >= top) & (y[clip] <= bottom)
                keypoints[clip, ..., 2] = np.where(covered, 0.0, keypoints[clip, ..., 2])
        return clips.reshape(shape), keypoints.reshape(joint_shape)


def _like(clips, values: np.ndarray):
    """values as an array of clips' kind: numpy, or a torch tensor on clips' device."""
    if isinstance(clips, np.ndarray):
        return values
    import torch

    return torch.from_numpy(values).to(clips.device)


def _shift(clip: np.ndarray, dy: int, dx: int) -> None:
    """Pad-and-crop of one clip (T, H, W, 3), in place: its frames moved by (dy, dx), zeros where they
    leave room (a crop of the frames padded with zeros, at offset (pad - dy, pad - dx))."""
    height, width = clip.shape[1:3]
    target = (slice(max(dy, 0), height + min(dy, 0)), slice(max(dx, 0), width + min(dx, 0)))
    source = (slice(max(-dy, 0), height + min(-dy, 0)), slice(max(-dx, 0), width + min(-dx, 0)))
    moved = clip[:, source[0], source[1]]
    # numpy copies overlapping views safely; torch (data.consumer on a GPU) needs the copy made first
    clip[:, target[0], target[1]] = moved if isinstance(clip, np.ndarray) else moved.clone()
    rows = slice(0, dy) if dy > 0 else slice(height + dy, height)
    columns = slice(0, dx) if dx > 0 else slice(width + dx, width)
    clip[:, rows] = 0
    clip[:, :, columns] = 0


def _jitter(clips: np.ndarray, u: np.ndarray, strength: float) -> None:
    """Colour jitter in place, one lookup table per clip and channel: brightness b and contrast c in
    [1 - s, 1 + s] and a gain g per channel in [1 - s/2, 1 + s/2] (a camera's colour cast), all affine:
    v -> g·b·(m + c·(v - m)), m the clip's mean intensity."""
    flat = clips.reshape(len(clips), -1)
    mean = flat[:, ::max(1, flat.shape[1] // 4096)].mean(axis=1)  # a sample of ~4096 values per clip
    tables = _jitter_tables(mean, u, strength)
    for clip in range(len(clips)):
        for channel in range(3):  # a take per channel: 3x faster than one gather over (pixel, channel)
            np.take(tables[clip, channel], clips[clip, ..., channel], out=clips[clip, ..., channel])


def _jitter_tables(mean: np.ndarray, u: np.ndarray, strength: float) -> np.ndarray:
    """(N, 3, 256) uint8 lookup tables of _jitter from each clip's mean intensity and its draws."""
    brightness = 1 + strength * (2 * u[:, 0] - 1)
    contrast = 1 + strength * (2 * u[:, 1] - 1)
    gains = 1 + strength / 2 * (2 * u[:, 2:5] - 1)  # (N, 3)
    values = np.arange(256, dtype=np.float32)
    level = mean[:, None] + contrast[:, None] * (values[None, :] - mean[:, None])  # (N, 256)
    tables = brightness[:, None, None] * gains[:, :, None] * level[:, None, :]  # (N, 3, 256)
    return np.clip(np.rint(tables), 0, 255).astype(np.uint8)


def _erase_boxes(u: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 4) rectangles (top, left, bottom, right) of ERASE_AREA of the frame and ERASE_ASPECT, clipped
    to it, at a uniform position (Zhong et al. redraw a rectangle that does not fit; here it is clipped)."""
    area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[:, 0])
    aspect = np.exp(np.log(ERASE_ASPECT[0]) + (np.log(ERASE_ASPECT[1]) - np.log(ERASE_ASPECT[0])) * u[:, 1])
    box_height = np.clip(np.rint(np.sqrt(area * aspect)), 1, height).astype(np.int64)
    box_width = np.clip(np.rint(np.sqrt(area / aspect)), 1, width).astype(np.int64)
    top = np.floor(u[:, 2] * (height - box_height + 1)).astype(np.int64)
    left = np.floor(u[:, 3] * (width - box_width + 1)).astype(np.int64)
    return np.stack([top, left, top + box_height, left + box_width], axis=1)


def _jitter_torch(clips, u: np.ndarray, strength: float) -> None:
    """_jitter on a torch tensor, on its device: the same tables, one gather for the batch."""
    import torch

    flat = clips.reshape(len(clips), -1)
    mean = flat[:, ::max(1, flat.shape[1] // 4096)].double().mean(dim=1).cpu().numpy()
    tables = _jitter_tables(mean, u, strength)
    tables = torch.from_numpy(tables.reshape(-1)).to(clips.device)  # (N·3·256,)
    base = (torch.arange(len(clips), device=clips.device) * 768).view(-1, *([1] * (clips.dim() - 1)))
    channel = torch.arange(3, device=clips.device) * 256
    clips.copy_(tables[base + channel + clips.long()])
