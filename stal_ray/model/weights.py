"""Pretrained weights by URL: downloaded once per node into torch hub's cache, checked by their sha256.

`model.pretrained` names a local path or a URL. A URL's file is checked against the sha256 it carries:
a `#sha256=<64 hex digits>` fragment (pip's convention), else the hash prefix in its name
(`resnet50-0676ba61.pth`: torch hub's and torchvision's convention, `check_hash=True`). A checked file is kept
in `torch.hub.get_dir()/checkpoints/<name>` ($TORCH_HOME, default ~/.cache/torch/hub), where torchvision
keeps the same file: the workers of a node share one download (a file lock), and a file torchvision fetched
before is used as it is. A URL with no hash to check is read at every load and never cached.
"""

import hashlib
import logging
import os
import re
import time
import urllib.parse

import torch.hub
from filelock import FileLock

from stal_ray.core import storage

log = logging.getLogger(__name__)

HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")  # torch.hub.HASH_REGEX, at least 8 hex digits
CACHED_SCHEMES = ("http://", "https://", "s3://", "s3a://")
CHUNK = 1 << 20


class WeightsError(ValueError):
    """Pretrained weights that cannot be used: the message names the URL, what is wrong and the fix."""


def split_hash(uri: str) -> tuple[str, str | None]:
    """(the URI without a `#sha256=` fragment, the expected sha256 or its prefix, or None)."""
    location, _, fragment = uri.partition("#")
    if fragment:
        digest = fragment.removeprefix("sha256=").lower()
        if not fragment.startswith("sha256=") or not re.fullmatch(r"[a-f0-9]{64}", digest):
            raise WeightsError(f"model.pretrained = {uri}: the fragment #{fragment} is not #sha256= "
                               "followed by 64 hex digits; give the file's full sha256 (sha256sum FILE) "
                               "or no fragment")
        return location, digest
    if not location.startswith(CACHED_SCHEMES):
        return location, None
    match = HASH_IN_NAME.search(os.path.basename(urllib.parse.urlsplit(location).path))
    return location, match.group(1) if match else None


def cache_path(location: str) -> str:
    """Where torch hub keeps the file of this URL: checkpoints/<its name>."""
    name = os.path.basename(urllib.parse.urlsplit(location).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", name)


def local_weights(uri: str, *, endpoint_url: str | None = None) -> str:
    """A path or fsspec URL to read the weights of `uri` from: for a URL with a sha256 (fragment or name),
    the node's checked copy, downloaded first if it is not there yet; anything else as it is."""
    location, expected = split_hash(uri)
    if not location.startswith(CACHED_SCHEMES):
        if expected:  # a local file with an explicit #sha256=
            _check(location, _sha256_of(location), expected, uri)
        return location
    if expected is None:
        return location
    path = cache_path(location)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with FileLock(path + ".lock"):  # one download per node, whatever the number of workers
        if os.path.exists(path):
            digest = _sha256_of(path)
            if digest.startswith(expected):
                return path
            log.warning("cached %s has sha256 %s, not %s: downloading it again", path, digest, expected)
        _download(location, path, expected, uri, endpoint_url)
    return path


def _download(location: str, path: str, expected: str, uri: str, endpoint_url: str | None) -> None:
    print(f"downloading {location} to {path}", flush=True)
    start, digest, size = time.monotonic(), hashlib.sha256(), 0
    try:
        fs, inner = storage.filesystem(location, endpoint_url=endpoint_url, check=False)
        # read start to end: over HTTP as one stream (block_size=0), since fsspec's random-access file asks
        # for byte ranges, which not every server answers (Python's http.server does not: a file larger than
        # one block failed there with "doesn't appear to support range requests")
        streamed = {"block_size": 0} if location.startswith(("http://", "https://")) else {}
        # into a temporary file beside `path`, which takes its place only once the sha256 is checked
        with storage.open_atomic(path) as target:
            with storage.errors(location, endpoint_url), fs.open(inner, "rb", **streamed) as source:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    target.write(chunk)
                    size += len(chunk)
            _check(location, digest.hexdigest(), expected, uri)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"pretrained weights not found: {location} ({error}); check "
                                "model.pretrained") from None
    except OSError as error:  # an unreachable host, an HTTP error status, a full disk
        raise FileNotFoundError(f"cannot download pretrained weights {location}: {error}; check "
                                "model.pretrained and this node's network") from None
    print(f"downloaded {size / 2**20:.1f} MiB in {time.monotonic() - start:.1f} s, sha256 {expected} "
          "checked", flush=True)


def _check(location: str, digest: str, expected: str, uri: str) -> None:
    if not digest.startswith(expected):
        raise WeightsError(
            f"model.pretrained = {uri}: the file's sha256 is {digest}, not {expected} "
            f"{'(its #sha256= fragment)' if len(expected) == 64 else '(the hash prefix in its name)'}; the "
            "download is corrupt or the file changed: check the URL, or give the sha256 of the file you "
            "mean as #sha256=<digest>")


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    fs, inner = storage.filesystem(path, check=False)
    with fs.open(inner, "rb") as source:
        while chunk := source.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
