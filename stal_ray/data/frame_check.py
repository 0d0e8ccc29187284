"""Checks of the image files a prepare copies into shards: where they resolve to, and that they are JPEGs.

A frame is copied as shipped, never decoded at prepare time (decoding MARS's 1.2M frames would double the
prepare's cost), so the check reads only bytes already in memory: the JPEG start-of-image marker and a
frame header at the front, the end-of-image marker at the back. That catches zero-byte files, files cut
short by an interrupted copy, and other formats (PNG, HTML error pages saved as .jpg); it does not catch
damage inside the entropy-coded data, which the decoder later shows as grey blocks.

A frame that is a symbolic link (or in a folder that is one) is followed only when it resolves inside the
release root: a link out of it would copy whatever it points at (a credentials file) into shards that may
go to a shared bucket, so it is refused before its target is read.
"""

import os
from dataclasses import dataclass, field

from stal_ray.data.mars import MarsFormatError

SOI = b"\xff\xd8\xff"  # start of image, then the first segment's marker
EOI = b"\xff\xd9"  # end of image
# Encoders and copy tools may pad the end of a file (zeros, a newline); the end marker is looked for in the
# last bytes once padding is stripped.
_PADDING = b"\x00\r\n\t "
_TAIL = 64

# Bad frames are dropped from their tracklets and listed; above this share of all frames the release is more
# likely damaged (an interrupted copy) than a few odd files, and the prepare is refused instead.
MAX_BAD_FRACTION = 0.001


class UnsafeFrameError(MarsFormatError):
    """A frame path that resolves outside the release root."""


def jpeg_problem(data: bytes) -> str | None:
    """Why `data` is not a whole JPEG file, or None when its markers are in place."""
    if not data:
        return "zero-byte file"
    if not data.startswith(SOI):
        return f"not a JPEG (starts with {bytes(data[:8])!r})"
    if not data[-_TAIL:].rstrip(_PADDING).endswith(EOI):
        return f"truncated JPEG ({len(data)} bytes, no end-of-image marker)"
    return None


@dataclass
class LinkGuard:
    """Refuses frames of a local release that resolve outside its root; a no-op for object stores.

    Cheap at MARS scale: one lstat per frame, and a realpath per distinct folder and per frame that is a link.
    """

    root: str | None  # the release root on local disk, None for a remote release (no links there)
    _real_root: str = ""
    _folders: dict[str, bool] = field(default_factory=dict)  # folder -> resolves inside the root

    def __post_init__(self):
        if self.root is not None:
            self._real_root = os.path.realpath(self.root)

    def check(self, relative: str) -> None:
        """Raise UnsafeFrameError when the frame at `relative` (to the root) leaves the root."""
        if self.root is None:
            return
        path = os.path.join(self.root, relative)
        folder = os.path.dirname(path)
        inside = self._folders.get(folder)
        if inside is None:
            inside = self._folders[folder] = self._inside(os.path.realpath(folder))
        if not inside:
            self._refuse(relative, folder)
        try:
            is_link = os.path.islink(path)
        except OSError:
            return  # a missing frame fails where it is read, with its own message
        if is_link and not self._inside(os.path.realpath(path)):
            self._refuse(relative, path)

    def _inside(self, real: str) -> bool:
        return real == self._real_root or real.startswith(self._real_root.rstrip(os.sep) + os.sep)

    def _refuse(self, relative: str, link: str) -> None:
        raise UnsafeFrameError(
            f"frame {relative} resolves to {os.path.realpath(link)}, outside the release root {self.root} "
            f"(through the link {link}); refusing to copy it into shards: replace the link with the frame "
            "itself, or a link inside the release")


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


class BadFramesError(MarsFormatError):
    """More bad frames than the threshold allows, or a tracklet with no good frame left."""

    def __init__(self, bad: BadFrames | None = None, message: str | None = None):
        if message is None:
            message = (f"more than {bad.max_fraction:.3%} of the {bad.total_frames} frames are not whole "
                       f"JPEG files (first {len(bad.found)}: {bad.summary()}); the release looks damaged, "
                       "e.g. an interrupted copy: copy it again, or raise the threshold (--max-bad-frames)")
        super().__init__(message)
