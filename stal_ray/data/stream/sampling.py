"""Clip sampling: restricted random sampling of T frames, and one identity row cut into groups of K clips.

Pure numpy, no Ray, so the Ray Data stage that calls it (data.pipeline) and its tests stay simple.
"""

import math

import numpy as np


def restricted_random_sample(num_frames: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """T sorted frame indices in [0, num_frames): the tracklet cut into T equal chunks, one random frame of
    each (restricted random sampling); a tracklet shorter than T repeats its frames in order."""
    if num_frames < 1 or seq_len < 1:
        raise ValueError(f"need num_frames >= 1 and seq_len >= 1, got {num_frames}, {seq_len}")
    if num_frames < seq_len:
        return np.arange(seq_len) * num_frames // seq_len
    bounds = np.linspace(0, num_frames, seq_len + 1).astype(np.int64)
    return rng.integers(bounds[:-1], bounds[1:])


def sequence_of_length(num_frames: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` sorted frame indices of a tracklet, as the paper's sequence-length test picks them (§IV-D4):
    a tracklet longer than `length` gives `length` random frames; a shorter one all of its frames plus
    random repeats of them up to `length`."""
    if num_frames < 1 or length < 1:
        raise ValueError(f"need num_frames >= 1 and length >= 1, got {num_frames}, {length}")
    if num_frames >= length:
        return np.sort(rng.choice(num_frames, length, replace=False))
    return np.sort(np.concatenate([np.arange(num_frames), rng.integers(0, num_frames, length - num_frames)]))


def _allocate(frames: np.ndarray, clips: int, cap: int | None) -> np.ndarray:
    """Clips per tracklet, proportional to its frames (largest remainder), at most `cap` each when given."""
    # one clip per tracklet first, so an epoch sees every tracklet; the rest in proportion to frames
    base = 1 if clips >= len(frames) else 0
    share = (clips - base * len(frames)) * frames / frames.sum()
    counts = np.floor(share).astype(np.int64)
    for index in np.argsort(counts - share)[: clips - base * len(frames) - counts.sum()]:
        counts[index] += 1
    counts += base
    if cap is not None:
        # A tracklet with more clips than there are groups would put two of its clips in one group.
        while (counts > cap).any():
            over = int(np.argmax(counts))
            counts[over] -= 1
            room = np.flatnonzero(counts < cap)
            counts[room[np.argmin(counts[room] / frames[room])]] += 1
    return counts


def _tracklet_clips(num_frames: int, clips: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """(clips, T) indices into one tracklet: each clip a restricted random sample, and the clips take
    different frames of every chunk, so `clips` ≈ num_frames / T of them use each frame about once."""
    if num_frames < seq_len:
        return np.tile(restricted_random_sample(num_frames, seq_len, rng), (clips, 1))
    bounds = np.linspace(0, num_frames, seq_len + 1).astype(np.int64)
    out = np.empty((clips, seq_len), dtype=np.int64)
    for chunk in range(seq_len):
        members = np.arange(bounds[chunk], bounds[chunk + 1])
        rounds = math.ceil(clips / len(members))
        out[:, chunk] = np.concatenate([rng.permutation(members) for _ in range(rounds)])[:clips]
    return out


def identity_groups(tracklet_of_frame: np.ndarray, clips_per_identity: int, seq_len: int,
                    rng: np.random.Generator, max_groups: int | None = None) -> list[np.ndarray]:
    """One identity's frames (tracklet_of_frame[i]: tracklet of its frame i) cut into groups of K clips.

    Returns about frames / (K·T) groups (at least 1, and enough for one clip of every tracklet), at most
    `max_groups` when given (then the clips are spread over the tracklets in proportion to their frames,
    and the rng, new every epoch, picks which frames), each a (K, T) array of sorted frame indices per clip.
    The K clips of a group come from K different tracklets where the identity has K of them; every frame is
    used about once per epoch. An identity with one tracklet still gives K clips, of disjoint frames where
    the tracklet has enough.
    """
    tracklet_of_frame = np.asarray(tracklet_of_frame)
    k = clips_per_identity
    if k < 1 or seq_len < 1 or len(tracklet_of_frame) == 0:
        raise ValueError(f"need K >= 1, T >= 1 and frames, got K={k}, T={seq_len}, "
                         f"{len(tracklet_of_frame)} frames")
    tracklets, first = np.unique(tracklet_of_frame, return_index=True)
    tracklets = tracklets[np.argsort(first)]
    positions = [np.flatnonzero(tracklet_of_frame == t) for t in tracklets]
    frames = np.array([len(p) for p in positions])
    # enough groups for one clip of every tracklet, else short tracklets of a person would never be seen
    groups = max(1, round(len(tracklet_of_frame) / (k * seq_len)), math.ceil(len(tracklets) / k))
    if max_groups is not None:
        groups = min(groups, max_groups)
    counts = _allocate(frames, groups * k, cap=groups if len(tracklets) >= k else None)
    clips = [positions[t][_tracklet_clips(frames[t], counts[t], seq_len, rng)] if counts[t] else None
             for t in range(len(tracklets))]
    taken = np.zeros(len(tracklets), dtype=np.int64)
    remaining = counts.copy()
    out = []
    for _ in range(groups):
        # The K tracklets with the most clips left: with no tracklet holding more clips than groups left,
        # this keeps every later group able to take K different tracklets.
        order = np.lexsort((rng.random(len(tracklets)), -remaining))
        picks = [t for t in order[:k] if remaining[t] > 0]
        remaining[picks] -= 1
        while len(picks) < k:  # fewer than K tracklets: the same tracklet gives several clips
            t = int(np.argmax(remaining))
            picks.append(t)
            remaining[t] -= 1
        group = []
        for t in picks:
            group.append(clips[t][taken[t]])
            taken[t] += 1
        out.append(np.stack(group))
    return out
