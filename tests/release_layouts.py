"""Tiny iLIDS-VID and PRID-2011 releases in the layouts as shipped: PNG frames, the split file."""

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

FRAME_SIZE = (8, 16)  # width, height: small, the real frames are 64x128


def write_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (FRAME_SIZE[1], FRAME_SIZE[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "PNG")


def make_ilidsvid(root: Path, persons=(1, 2, 4, 7, 9, 12), frames: int = 3, first_frame: int = 101,
                  splits: int = 10) -> np.ndarray:
    """An iLIDS-VID release under root with `persons` (numbers with gaps) in both cameras; returns ls_set."""
    for person in persons:
        for camera in (1, 2):
            folder = root / "i-LIDS-VID" / "sequences" / f"cam{camera}" / f"person{person:03d}"
            for frame in range(first_frame, first_frame + frames + person % 2):  # lengths differ
                write_png(folder / f"cam{camera}_person{person:03d}_{frame:05d}.png", person * 1000 + frame)
    rng = np.random.default_rng(0)
    ls_set = np.stack([rng.permutation(len(persons)) + 1 for _ in range(splits)]).astype(np.float64)
    split_file = root / "train-test people splits" / "train_test_splits_ilidsvid.mat"
    split_file.parent.mkdir(parents=True)
    scipy.io.savemat(split_file, {"ls_set": ls_set})
    return ls_set


def make_prid(root: Path, lengths_a: dict[int, int], lengths_b: dict[int, int]) -> None:
    """A PRID-2011 multi-shot release under root: person -> frame count per camera."""
    for letter, lengths in (("a", lengths_a), ("b", lengths_b)):
        for person, count in lengths.items():
            folder = root / "prid_2011" / "multi_shot" / f"cam_{letter}" / f"person_{person:04d}"
            for frame in range(1, count + 1):
                write_png(folder / f"{frame:04d}.png", person * 1000 + frame + (letter == "b") * 500)
