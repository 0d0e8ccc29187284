"""Tiny iLIDS-VID and PRID-2011 releases in the layouts as shipped (stal_ray.data.synthetic.layouts), with
noise frames: small, fast, and every frame distinct."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from stal_ray.data.synthetic.layouts import write_ilidsvid_release, write_prid_release

FRAME_SIZE = (8, 16)  # width, height: small, the real frames are 64x128


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (FRAME_SIZE[1], FRAME_SIZE[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def make_ilidsvid(root: Path, persons=(1, 2, 4, 7, 9, 12), frames: int = 3, first_frame: int = 101,
                  splits: int = 10) -> np.ndarray:
    """An iLIDS-VID release under root with `persons` (numbers with gaps) in both cameras; returns ls_set."""
    sequences = {(person, camera): [noise_png(person * 1000 + frame)
                                    for frame in range(first_frame, first_frame + frames + person % 2)]
                 for person in persons for camera in (1, 2)}  # lengths differ
    return write_ilidsvid_release(root, sequences, first_frame=first_frame, splits=splits)


def make_prid(root: Path, lengths_a: dict[int, int], lengths_b: dict[int, int]) -> None:
    """A PRID-2011 multi-shot release under root: person -> frame count per camera."""
    write_prid_release(root, {(letter, person): [noise_png(person * 1000 + frame + (letter == "b") * 500)
                                                 for frame in range(1, count + 1)]
                              for letter, lengths in (("a", lengths_a), ("b", lengths_b))
                              for person, count in lengths.items()})
