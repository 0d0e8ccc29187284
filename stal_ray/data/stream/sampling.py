"""Clip sampling: restricted random sampling of T frames, one identity row cut into groups of K clips, and
the epoch's plan: which groups, of which identities, in which order (docs/sampling.md).

Pure numpy, no Ray, so the Ray Data stage that calls it (data.pipeline), bench/sampler.py and the tests
stay simple.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stal_ray.config_schema import MIXING, WEIGHTING


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


def group_count(frames: int, tracklets: int, clips_per_identity: int, seq_len: int,
                max_groups: int | None = None) -> int:
    """Groups of K clips an identity of `frames` frames in `tracklets` tracklets gives per epoch when
    identities weigh by frames: about frames / (K·T), at least 1 and enough for one clip of every tracklet,
    at most `max_groups` when given."""
    groups = max(1, round(frames / (clips_per_identity * seq_len)), math.ceil(tracklets / clips_per_identity))
    return groups if max_groups is None else min(groups, max_groups)


def rotation(tracklets: int, clips: int, epoch: int, seed: Sequence[int] = ()) -> np.ndarray:
    """The `clips` tracklets (of `tracklets`, clips < tracklets) that get one clip each in `epoch`.

    Epochs run in cycles of m = ceil(tracklets / clips): cycle c = epoch // m draws a permutation of the
    tracklets from (seed, c), and epoch c·m + j takes its entries j·clips .. (j+1)·clips - 1, wrapping to
    the start. The m slices of a cycle cover m·clips >= tracklets entries, so every tracklet gets a clip in
    every cycle: within the first m epochs, and within any 2m - 1 consecutive epochs (which hold a whole
    cycle). Which tracklets, and with which partners, changes from cycle to cycle."""
    if not 0 < clips < tracklets:
        raise ValueError(f"rotation needs 0 < clips < tracklets, got {clips}, {tracklets}")
    cycle, step = divmod(epoch, math.ceil(tracklets / clips))
    order = np.random.default_rng([*seed, cycle]).permutation(tracklets)
    return order[np.arange(step * clips, (step + 1) * clips) % tracklets]


def identity_groups(tracklet_of_frame: np.ndarray, clips_per_identity: int, seq_len: int,
                    rng: np.random.Generator, max_groups: int | None = None, *, groups: int | None = None,
                    epoch: int = 0, seed: Sequence[int] = ()) -> list[np.ndarray]:
    """One identity's frames (tracklet_of_frame[i]: tracklet of its frame i) cut into groups of K clips.

    Returns group_count(...) groups (about frames / (K·T), at least 1, enough for one clip of every
    tracklet, at most `max_groups`), or exactly `groups` when given (identity-balanced weighting), each a
    (K, T) array of sorted frame indices per clip. The clips are spread over the tracklets in proportion to
    their frames (every tracklet at least one) and the rng, new every epoch, picks which frames; when there
    are fewer clips than tracklets (a large identity under the cap), each tracklet of `rotation(...,
    epoch, seed)` gets one clip, so every tracklet is seen within a bounded number of epochs. The K clips
    of a group come from K different tracklets where the identity has K of them; every frame is used
    about once per epoch when uncapped. An identity with one tracklet still gives K clips, of disjoint
    frames where the tracklet has enough.
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
    if groups is None:
        groups = group_count(len(tracklet_of_frame), len(tracklets), k, seq_len, max_groups)
    if groups * k < len(tracklets):
        # fewer clips than tracklets: one clip each for a rotating subset (the same proportional split every
        # epoch would drop the same short tracklets every epoch)
        counts = np.zeros(len(tracklets), dtype=np.int64)
        counts[rotation(len(tracklets), groups * k, epoch, seed)] = 1
    else:
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


@dataclass
class EpochPlan:
    """An epoch's groups in the order the stream emits them: group i is identity[i]'s group number
    group[i], its K clips' frames positions[i] (K, T) (indices into that identity's row), read and cut by
    read task window[i] (windows are consecutive runs of the plan)."""
    identity: np.ndarray
    group: np.ndarray
    positions: np.ndarray
    window: np.ndarray

    def __len__(self) -> int:
        return len(self.identity)


def identity_order(identities: Sequence[int], *, seed: int, epoch: int) -> np.ndarray:
    """The epoch's random permutation of the training identities, from (seed, epoch) alone: whatever order
    the rows sit in the files."""
    return np.random.default_rng([seed, epoch, 1]).permutation(np.sort(np.asarray(identities, np.int64)))


def neighbour_windows(identities: Sequence[int], window: int, *, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's windows of `window` identities that are neighbours in identity order (cyclic, from a random
    offset), in a random order: each batch's P identities come from a stretch of consecutive numbers, which on
    MARS were recorded together (docs/sampling.md), while the stretches' boundaries and order change every
    epoch."""
    ordered = np.sort(np.asarray(identities, np.int64))
    rng = np.random.default_rng([seed, epoch, 3])
    rolled = np.roll(ordered, -int(rng.integers(len(ordered)))) if len(ordered) else ordered
    windows = [rolled[start:start + window] for start in range(0, len(rolled), window)]
    return [windows[i] for i in rng.permutation(len(windows))]


def interleave(counts: np.ndarray, identities_per_batch: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into `counts` (groups of each identity of a window), one per group, in an order whose runs
    of P hold P distinct identities: each run draws P identities without replacement, in proportion to the
    groups they have left (torchreid's RandomIdentitySampler draws them uniformly among those left, which
    leaves the largest identities alone at the end). What is left once fewer than P identities have groups
    follows round-robin (the batcher holds such a group back until a batch lacks its identity)."""
    remaining = np.asarray(counts, dtype=np.int64).copy()
    out: list[int] = []
    p = identities_per_batch
    while np.count_nonzero(remaining) >= p:
        picks = rng.choice(len(remaining), p, replace=False, p=remaining / remaining.sum())
        remaining[picks] -= 1
        out.extend(picks.tolist())
    while remaining.any():
        left = np.flatnonzero(remaining)
        remaining[left] -= 1
        out.extend(left.tolist())
    return np.array(out, dtype=np.int64)


def epoch_plan(tracklets: Mapping[int, np.ndarray], *, clips_per_identity: int, seq_len: int,
               identities_per_batch: int, seed: int, epoch: int, max_groups: int | None = None,
               weighting: str = "frames", mixing: str = "global", window: int | None = None,
               stored_order: Sequence[int] | None = None) -> EpochPlan:
    """The epoch's groups (identity_groups of every identity, from its tracklet_of_frame in `tracklets`)
    and their order.

    weighting: "frames" — an identity gives group_count(...) groups (about frames / (K·T), at most
    max_groups); "identities" — every identity gives the same number, the mean of the "frames" counts, so
    an epoch holds about as many groups either way.
    mixing: "global" — identities in identity_order (a permutation of all of them from seed and epoch),
    cut into windows of `window` identities (default 4·P); a window's groups interleaved so that its
    batches draw P of its identities at a time; "neighbours" — the same, but each window holds consecutive
    identity numbers (neighbour_windows: a random offset and window order per epoch); "shards" — the old
    stream: identities in `stored_order` (the rows as the shuffled files hold them), each identity's groups
    in a row, windows of `window` identities read in turn.
    Groups are seeded by (seed, epoch, identity), as the stream always seeded them; the interleaving by
    (seed, epoch, window)."""
    if weighting not in WEIGHTING or mixing not in MIXING:
        raise ValueError(f"weighting must be one of {WEIGHTING} and mixing one of {MIXING}, "
                         f"got {weighting!r}, {mixing!r}")
    k, p = clips_per_identity, identities_per_batch
    window = window or 4 * p
    if mixing == "neighbours":
        windows_of = neighbour_windows(list(tracklets), window, seed=seed, epoch=epoch)
    else:
        order = (identity_order(list(tracklets), seed=seed, epoch=epoch) if mixing == "global" else
                 np.asarray(list(stored_order if stored_order is not None else sorted(tracklets)), np.int64))
        windows_of = [order[start:start + window] for start in range(0, len(order), window)]
    shared = None
    if weighting == "identities":
        counts = [group_count(len(t), len(np.unique(t)), k, seq_len, max_groups) for t in tracklets.values()]
        shared = max(1, round(float(np.mean(counts))))
    identity, group, positions, windows = [], [], [], []
    for number, members in enumerate(windows_of):
        cut = []
        for person in members.tolist():
            rng = np.random.default_rng([seed, epoch, person])
            cut.append(identity_groups(tracklets[person], k, seq_len, rng, max_groups, groups=shared,
                                       epoch=epoch, seed=(seed, person)))
        counts = np.array([len(c) for c in cut])
        if mixing != "shards":
            picks = interleave(counts, p, np.random.default_rng([seed, epoch, number, 2]))
        else:
            picks = np.repeat(np.arange(len(members)), counts)
        taken = np.zeros(len(members), dtype=np.int64)
        for pick in picks.tolist():
            identity.append(int(members[pick]))
            group.append(int(taken[pick]))
            positions.append(cut[pick][taken[pick]])
            taken[pick] += 1
        windows += [number] * len(picks)
    return EpochPlan(identity=np.array(identity, dtype=np.int64), group=np.array(group, dtype=np.int64),
                     positions=np.array(positions, dtype=np.int64).reshape(-1, k, seq_len),
                     window=np.array(windows, dtype=np.int64))
