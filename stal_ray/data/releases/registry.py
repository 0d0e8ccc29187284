"""A data set's release, read by its own reader by name: MARS, iLIDS-VID or PRID-2011."""

import posixpath

from stal_ray.core import storage
from stal_ray.data.releases import prid
from stal_ray.data.releases.base import Release
from stal_ray.data.releases.ilidsvid import read_ilidsvid
from stal_ray.data.releases.mars import read_mars

DATASETS = ("mars", "ilidsvid", "prid2011")


def read_release(dataset: str, root: str, *, split: int = 0, split_file: str | None = None,
                 out: str | None = None, endpoint_url: str | None = None) -> Release:
    """The checked release of `dataset` at `root`, with split `split` for iLIDS-VID and PRID-2011.

    PRID-2011's splits come from `split_file` when given, else from <out>/splits_prid2011.json, written
    there from prid.make_splits (seeded) on first use and reused by every later prepare."""
    if dataset == "mars":
        return read_mars(root)
    if dataset == "ilidsvid":
        return read_ilidsvid(root, split)
    if dataset != "prid2011":
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if split_file is not None:
        uri = split_file
        fs, path = storage.filesystem(uri, endpoint_url=endpoint_url, check=False)
    else:
        if out is None:
            raise ValueError("PRID-2011 needs split_file or out (where the seeded splits are kept)")
        uri = storage.join(out, prid.SPLITS_FILE)
        fs, base = storage.filesystem(out, endpoint_url=endpoint_url)
        path = posixpath.join(base, prid.SPLITS_FILE)
    with storage.errors(uri, endpoint_url):
        if split_file is None and not fs.exists(path):
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            fs.pipe_file(path, prid.dump_splits(prid.seeded_splits(root)).encode())
        try:
            text = fs.cat_file(path).decode()
        except FileNotFoundError:
            raise prid.PridFormatError(f"split file {uri} does not exist") from None
    return prid.read_prid(root, split, prid.parse_splits(text, uri), splits_name=f"split file {uri}")
