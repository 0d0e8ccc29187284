"""Synthetic releases in the iLIDS-VID and PRID-2011 layouts as shipped (PNG sequences, split file).

`write_ilidsvid_release` and `write_prid_release` lay out given PNG frames exactly as the readers
(stal_ray/data/releases/ilidsvid.py, prid.py) expect; `write_layout` fills them with the learnable pedestrians
of stal_ray/data/synthetic/render.py, one sequence per person and camera (cameras 1 and 2, or A and B):

* ilidsvid: persons numbered with gaps (every fifth number left out, as the real release skips numbers),
  frame numbers from 1, and `ls_set` with 10 seeded permutations of the sorted person folders;
* prid2011: numbered as the release is: `persons` seen by both cameras with at least prid.MIN_FRAMES frames
  each (the persons the protocol keeps) and PRID_SHORT with fewer frames, all in the shared range
  1..prid.SHARED_PERSONS, then single-camera persons from prid.SHARED_PERSONS + 1 in both camera folders under
  the same numbers (PRID_A_ONLY in A, PRID_B_ONLY in B) who are different people, as in the release (385
  persons in A, 749 in B, only 1..200 the same people).

`python -m stal_ray.data.synthetic.generator OUT --layout ilidsvid|prid2011` writes one.
"""

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from stal_ray.data.releases import ilidsvid, prid
from stal_ray.data.releases.registry import REGISTRY
from stal_ray.data.synthetic.render import STYLES, Track, check_arguments, render

SPLITS = REGISTRY["ilidsvid"].splits
PRID_SHORT, PRID_A_ONLY, PRID_B_ONLY = 2, 2, 3


def write_ilidsvid_release(root: str | Path, sequences: Mapping[tuple[int, int], Sequence[bytes]], *,
                           first_frame: int = 1, splits: int = SPLITS, seed: int = 0) -> np.ndarray:
    """An iLIDS-VID release under `root`: (person, camera 1|2) -> PNG bytes of its frames; every person in
    both cameras. Returns ls_set, `splits` seeded permutations of 1..persons (float64, as shipped)."""
    root = Path(root)
    for (person, camera), frames in sequences.items():
        folder = root / ilidsvid.SEQUENCES / f"cam{camera}" / f"person{person:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for number, png in enumerate(frames, start=first_frame):
            (folder / f"cam{camera}_person{person:03d}_{number:05d}.png").write_bytes(png)
    persons = len({person for person, _ in sequences})
    rng = np.random.default_rng(seed)
    ls_set = np.stack([rng.permutation(persons) + 1 for _ in range(splits)]).astype(np.float64)
    split_file = root / ilidsvid.SPLIT_FILE
    split_file.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(split_file, {ilidsvid.SPLIT_VARIABLE: ls_set})
    return ls_set


def write_prid_release(root: str | Path, sequences: Mapping[tuple[str, int], Sequence[bytes]]) -> None:
    """A PRID-2011 multi-shot release under `root`: (camera letter a|b, person) -> PNG bytes of its frames."""
    for (letter, person), frames in sequences.items():
        folder = Path(root) / prid.SEQUENCES / f"cam_{letter}" / f"person_{person:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for number, png in enumerate(frames, start=1):
            (folder / f"{number:04d}.png").write_bytes(png)


def write_layout(out: str, layout: str, *, persons: int = 20, frames_per_tracklet: tuple[int, int] = (8, 16),
                 height: int = 64, width: int = 32, occlusion: float = 0.2, seed: int = 0,
                 style: str = "default", occluders: str = "boxes") -> str:
    """A synthetic release in `layout` (ilidsvid or prid2011) under `out` (new or empty); returns its path.
    `persons`: persons in both cameras that the protocol keeps (even, so the splits halve them); PRID-2011's
    have at least prid.MIN_FRAMES frames whatever frames_per_tracklet says. `style` (the pedestrians' and
    cameras' look) and `occluders` as for stal_ray.data.synthetic.generator.write_synthetic_release."""

    if style not in STYLES:
        raise ValueError(f"style = {style!r} is invalid: use one of {', '.join(STYLES)}")
    if layout not in WRITERS:
        raise ValueError(f"layout must be one of {', '.join(WRITERS)} here (mars: "
                         f"write_synthetic_release), got {layout!r}")
    if persons < 2 or persons % 2 or persons > 798:
        raise ValueError(f"persons must be even, >= 2 (the splits halve them) and <= 798 (3-digit iLIDS-VID "
                         f"person numbers with gaps), got {persons}")
    if layout == "prid2011" and persons + PRID_SHORT > prid.SHARED_PERSONS:
        raise ValueError(f"persons must be <= {prid.SHARED_PERSONS - PRID_SHORT} for prid2011 (with "
                         f"{PRID_SHORT} short sequences, in the release's shared range "
                         f"1..{prid.SHARED_PERSONS}), got {persons}")
    check_arguments(persons, 1, 2, (1, 1), tuple(frames_per_tracklet), height, width, occlusion, 0, 0,
                    occluders)
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; the synthetic release needs a new or empty folder")
    rng = np.random.default_rng([seed, 5])

    def sequence(person: int, camera: int, frames: int) -> list[bytes]:
        track = Track("train", person, camera, camera, frames)  # number: its own noise per camera
        jpegs, _ = render(track, seed, (height, width), occlusion, style=style, occluders=occluders)
        return [_png(jpeg) for jpeg in jpegs]

    WRITERS[layout](root, persons, tuple(frames_per_tracklet), rng, sequence, seed)
    return str(root)


# sequence(person, camera, frames): the PNG frames of one sequence of the synthetic pedestrian `person`
SequenceOf = Callable[[int, int, int], list[bytes]]


def _ilidsvid_layout(root: Path, persons: int, frames: tuple[int, int], rng: np.random.Generator,
                     sequence: SequenceOf, seed: int) -> None:
    low, high = frames
    numbers = [n for n in range(1, 2 * persons + 1) if n % 5][:persons]  # gaps, as in the release
    write_ilidsvid_release(root, {(p, c): sequence(p, c, int(rng.integers(low, high + 1)))
                                  for p in numbers for c in (1, 2)}, seed=seed)


def _prid_layout(root: Path, persons: int, frames: tuple[int, int], rng: np.random.Generator,
                 sequence: SequenceOf, seed: int) -> None:
    low, high = max(frames[0], prid.MIN_FRAMES), max(frames[1], prid.MIN_FRAMES)
    shared = range(1, persons + PRID_SHORT + 1)  # the last PRID_SHORT too short for the protocol
    sequences = {}
    for person in shared:
        for letter, camera in prid.CAMERAS.items():
            short = person > persons
            count = prid.MIN_FRAMES - 1 - camera if short else int(rng.integers(low, high + 1))
            sequences[letter, person] = sequence(person, camera, count)
    # beyond the shared range each camera numbers its own people: cam_a/person_0201 is not cam_b/person_0201
    looks = iter(range(persons + PRID_SHORT + 1, persons + PRID_SHORT + PRID_A_ONLY + PRID_B_ONLY + 1))
    for letter, count in (("a", PRID_A_ONLY), ("b", PRID_B_ONLY)):
        for person in range(prid.SHARED_PERSONS + 1, prid.SHARED_PERSONS + count + 1):
            length = int(rng.integers(low, high + 1))
            sequences[letter, person] = sequence(next(looks), prid.CAMERAS[letter], length)
    write_prid_release(root, sequences)


# the layouts write_layout writes, by data set name (stal_ray.data.releases.registry); MARS's is
# stal_ray.data.synthetic.generator.write_synthetic_release
WRITERS: dict[str, Callable[..., None]] = {"ilidsvid": _ilidsvid_layout, "prid2011": _prid_layout}
LAYOUTS = ("mars", *WRITERS)


def _png(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(jpeg)) as image:
        image.convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()
