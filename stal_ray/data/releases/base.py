"""What every release reader returns: typed tracklets of a train and a test split, and the error that names
the file, the row and the fix. MARS, iLIDS-VID and PRID-2011 (and the synthetic layouts) all read into
these."""

import io
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import scipy.io

SPLITS = ("train", "test")
JUNK, DISTRACTOR = -1, 0  # MARS's identity labels that are not persons


class ReleaseFormatError(ValueError):
    """A release that cannot be read: the message names the file, the row (1-based) and what to fix."""


@dataclass(frozen=True)
class Tracklet:
    split: str  # "train" or "test"
    row: int  # 0-based row in the split's track table
    identity: int  # person id; -1 junk, 0 distractor
    camera: int  # 1..6
    frames: tuple[str, ...]  # paths relative to the release root, in name-list order
    is_query: bool = False  # test tracklets listed in query_IDX


@dataclass
class Release:
    root: str
    train: list[Tracklet]
    test: list[Tracklet]
    keypoints_path: str | None  # info/keypoints.parquet under root if present, else None
    _fs: Any = field(default=None, init=False, repr=False, compare=False)

    def _filesystem(self) -> tuple[Any, str]:
        # resolved lazily so a release made by hand (or unpickled elsewhere) needs only `root`
        if self._fs is None:
            self._fs = fsspec.core.url_to_fs(self.root)
        return self._fs

    def read_frame(self, path: str) -> bytes:
        """Raw JPEG bytes of a frame, by its path relative to the release root."""
        fs, base = self._filesystem()
        return fs.cat_file(posixpath.join(base, path))

    def identities(self, split: str) -> list[int]:
        """Sorted distinct person identities of a split; junk (-1) and distractors (0) are not persons."""
        return sorted({t.identity for t in self._split(split) if t.identity not in (JUNK, DISTRACTOR)})

    @property
    def queries(self) -> list[Tracklet]:
        """The test tracklets listed in query_IDX, in track-table order."""
        return [t for t in self.test if t.is_query]

    def _split(self, split: str) -> list[Tracklet]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.train if split == "train" else self.test


def load_mat(fs, base: str, name: str, variable: str) -> np.ndarray:
    raw = fs.cat_file(posixpath.join(base, name))
    try:
        contents = scipy.io.loadmat(io.BytesIO(raw))
    except NotImplementedError as error:  # scipy reads MATLAB v4-v7.2; v7.3 files are HDF5
        raise ReleaseFormatError(f"{name}: {error}; re-save it in MATLAB with save(..., '-v7')") from error
    except Exception as error:
        raise ReleaseFormatError(f"{name}: not a readable MATLAB file ({error})") from error
    if variable not in contents:
        found = sorted(k for k in contents if not k.startswith("__"))
        raise ReleaseFormatError(f"{name}: no variable {variable!r} (found {found})")
    return contents[variable]
