"""Recording sessions: identity numbers that follow the order people were recorded in, as in MARS.

MARS numbers its identities in the order its six cameras recorded them (Zheng et al., ECCV 2016), so
neighbouring numbers were filmed together: the same hour's light, the same cameras, often the same season's
clothes. A data set whose identities are drawn independently hides what a sampler that draws batches from
neighbouring numbers costs (issue 36: batches of shard neighbours). With `session_identities = n > 0`, the
generator cuts identities 1, 2, ... (training, then test, as MARS numbers them) into sessions of n consecutive
numbers; a session has

- its light: a per-channel gain on every frame, on top of the camera's cast (the time of day);
- its cameras: its identities are only seen by a subset of the cameras (those running that day);
- its palette: its identities' clothes are pulled towards two session colours (a season, a uniform), so that
  neighbours look alike and a batch of neighbours holds hard negatives that a random batch seldom does.

0 (the default) draws every identity independently, the bytes of releases written before sessions existed.
"""

from dataclasses import dataclass, replace

import numpy as np

# How far an identity's clothes move towards its session's palette (0: not at all, 1: one uniform): close
# enough that neighbours share a look, far enough that each stays recognisable.
PALETTE_PULL = 0.25


@dataclass(frozen=True)
class Session:
    light: np.ndarray  # per-channel gain on every frame
    upper: tuple[int, int, int]
    lower: tuple[int, int, int]

    def dress(self, look):
        """The identity's Appearance with its upper and lower clothes pulled towards the session's."""
        return replace(look, upper=_pull(look.upper, self.upper), lower=_pull(look.lower, self.lower))


def session_of(identity: int, session_identities: int) -> int | None:
    """0-based session of a person's number (None: no sessions, or junk and distractors, numbers <= 0)."""
    if session_identities <= 0 or identity <= 0:
        return None
    return (identity - 1) // session_identities


def session(seed: int, index: int) -> Session:
    """Session `index`'s light and palette, drawn from (seed, index) alone."""
    rng = np.random.default_rng([seed, 5, index])
    return Session(
        light=rng.uniform(0.8, 1.25, 3),
        upper=tuple(int(v) for v in rng.integers(0, 256, 3)),
        lower=tuple(int(v) for v in rng.integers(0, 256, 3)),
    )


def session_cameras(seed: int, index: int, cameras: int) -> np.ndarray:
    """The 0-based cameras running in session `index`: half of them (at least two, when there are two)."""
    rng = np.random.default_rng([seed, 6, index])
    return np.sort(rng.choice(cameras, min(cameras, max(2, (cameras + 1) // 2)), replace=False))


def _pull(colour, towards) -> tuple[int, int, int]:
    mixed = (1 - PALETTE_PULL) * np.asarray(colour, float) + PALETTE_PULL * np.asarray(towards, float)
    return tuple(int(v) for v in np.round(mixed))
