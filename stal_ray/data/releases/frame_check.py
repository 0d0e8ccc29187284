"""Checks of the image files a prepare copies into shards: where they resolve to, and that they are JPEGs.

A frame is copied as shipped, never decoded at prepare time (decoding MARS's 1.2M frames would double the
prepare's cost), so the check reads only bytes already in memory: the JPEG start-of-image marker and a
frame header at the front, the end-of-image marker at the back. That catches zero-byte files, files cut
short by an interrupted copy, and other formats (PNG, HTML error pages saved as .jpg); it does not catch
damage inside the entropy-coded data, which the decoder later shows as grey blocks.

A frame that is a symbolic link is followed only when it resolves inside the release (its root or its
image folders, which may be links to another disk): a link out of it would copy whatever it points at (a
credentials file) into shards that may go to a shared bucket, so it is refused before its target is read.
A frame must be a regular file: a named pipe would block the prepare (holding its lock) and a device would
be read without end, so both are refused before they are opened. A bad frame's problem is recorded in
words, never with the file's bytes (a hard link cannot be told from the frame it replaced).
"""

import os
import stat
from dataclasses import dataclass, field

from stal_ray.data.releases.base import SPLITS, ReleaseFormatError

SOI = b"\xff\xd8\xff"  # start of image, then the first segment's marker
EOI = b"\xff\xd9"  # end of image
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"  # PNG releases are re-encoded as JPEG (png_release.py) unless damaged
# Encoders and copy tools may pad the end of a file (zeros, a newline); the end marker is looked for in the
# last bytes once padding is stripped.
_PADDING = b"\x00\r\n\t "
_TAIL = 64

# Bad frames are dropped from their tracklets and listed; above this share of all frames the release is more
# likely damaged (an interrupted copy) than a few odd files, and the prepare is refused instead.
MAX_BAD_FRACTION = 0.001


class UnsafeFrameError(ReleaseFormatError):
    """A frame path that resolves outside the release root."""


def jpeg_problem(data: bytes) -> str | None:
    """Why `data` is not a whole JPEG file, or None when its markers are in place."""
    if not data:
        return "zero-byte file"
    if data.startswith(PNG_SIGNATURE):
        return ("not a JPEG (a PNG signature; in a PNG release, one too damaged or truncated to be "
                "re-encoded)")
    if not data.startswith(SOI):
        # the problem goes into the manifest: never the file's own bytes (a linked secret's first ones)
        return "not a JPEG (no start-of-image marker FF D8 FF)"
    if not data[-_TAIL:].rstrip(_PADDING).endswith(EOI):
        return f"truncated JPEG ({len(data)} bytes, no end-of-image marker)"
    return None


@dataclass
class LinkGuard:
    """Refuses frames of a local release that are links resolving outside it, or not regular files; a no-op
    for object stores.

    "Inside" is under the release root or under its image folders (bbox_train/, bbox_test/), which may be
    links themselves, e.g. to another disk. A frame is named by the release's name lists, so only a frame
    that is itself a link can point at an arbitrary file; a linked folder holds only files named as frames.
    Cheap at MARS scale: one lstat per frame, a realpath only for frames that are links.
    """

    root: str | None  # the release root on local disk, None for a remote release (no links there)
    _allowed: tuple[str, ...] = ()

    def __post_init__(self):
        if self.root is not None:
            folders = (self.root, *(os.path.join(self.root, f"bbox_{split}") for split in SPLITS))
            self._allowed = tuple(sorted({os.path.realpath(folder) for folder in folders}))

    def check(self, relative: str) -> None:
        """Raise UnsafeFrameError when the frame at `relative` (to the root) is a link out of the release."""
        if self.root is None:
            return
        path = os.path.join(self.root, relative)
        try:
            mode = os.lstat(path).st_mode
        except OSError:  # a missing frame fails where it is read
            return
        if stat.S_ISLNK(mode):
            target = os.path.realpath(path)
            if not any(target == a or target.startswith(a.rstrip(os.sep) + os.sep) for a in self._allowed):
                raise UnsafeFrameError(
                    f"frame {relative} resolves to {target}, outside the release root {self.root} (the frame "
                    f"{path} is a link); refusing to copy it into shards: replace the link with the frame "
                    "itself, or with a link inside the release")
            try:
                mode = os.stat(path).st_mode
            except OSError:
                return
        if not stat.S_ISREG(mode):
            kind = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK:
                    "a block device", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder"}.get(
                        stat.S_IFMT(mode), "not a regular file")
            raise UnsafeFrameError(f"frame {relative} ({path}) is {kind}, not a regular file; refusing to "
                                   "read it: replace it with the frame's JPEG file")


@dataclass
class BadFrames:
    """Frames dropped for failing jpeg_problem, in the order met, by split."""

    total_frames: int  # frames of the whole release: the threshold's base
    max_fraction: float = MAX_BAD_FRACTION
    found: list[dict] = field(default_factory=list)  # {"split", "path", "tracklet" (row), "problem"}

    def add(self, split: str, path: str, tracklet: int, problem: str) -> None:
        self.found.append({"split": split, "path": path, "tracklet": tracklet, "problem": problem})
        if len(self.found) > self.max_fraction * self.total_frames:
            raise BadFramesError(self)

    def count(self, split: str) -> int:
        return sum(entry["split"] == split for entry in self.found)

    def summary(self, shown: int = 5) -> str:
        return "; ".join(f"{e['path']}: {e['problem']}" for e in self.found[:shown]) + \
            (f"; and {len(self.found) - shown} more" if len(self.found) > shown else "")


class BadFramesError(ReleaseFormatError):
    """More bad frames than the threshold allows, or a tracklet with no good frame left."""

    def __init__(self, bad: BadFrames | None = None, message: str | None = None):
        if message is None:
            message = (f"more than {bad.max_fraction:.3%} of the {bad.total_frames} frames are not whole "
                       f"JPEG files (first {len(bad.found)}: {bad.summary()}); the release looks damaged, "
                       "e.g. an interrupted copy: copy it again, or raise the threshold (--max-bad-frames)")
        super().__init__(message)
