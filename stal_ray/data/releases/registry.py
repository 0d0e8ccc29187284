"""The data sets, one entry each: how a release is read, its test protocol, how it is recognised when passed
as --data, and its splits. Every other place that names data sets (jobs/prepare_data.py, the manifest's
description in stal_ray/data/prepared/protocol.py, stal_ray/data/source.py's hints, the synthetic layouts,
stal_ray/study/splits.py) reads DATASETS, so a new data set is a reader module plus one entry here.

The synthetic writers of the layouts stay in stal_ray/data/synthetic/layouts.py: they draw frames, a layer
above the readers (pyproject.toml, [tool.importlinter]).
"""

import posixpath
from collections.abc import Callable
from dataclasses import dataclass

from stal_ray.core import storage
from stal_ray.data.releases import prid
from stal_ray.data.releases.base import Release
from stal_ray.data.releases.ilidsvid import read_ilidsvid
from stal_ray.data.releases.mars import read_mars

# the test protocols (stal_ray/data/prepared/protocol.py): MARS's query_IDX, or camera 1 against camera 2
MARS_PROTOCOL, TWO_CAMERA = "mars", "two_camera"


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # --dataset, the manifest's dataset name
    title: str  # how messages and summaries name it
    read: Callable[..., Release]  # read(root, *, split, split_file, out, endpoint_url), those it needs
    protocol: str  # MARS_PROTOCOL or TWO_CAMERA
    root_help: str  # what --root holds, for jobs/prepare_data.py's help
    markers: tuple[str, ...]  # entries of a release's root, any one of which marks a release given as --data
    called: str  # how the hint names a release given as --data
    prepare_command: str  # the command that prepares it, {uri} for the release, {name} for this name
    splits: int | None = None  # numbered train/test splits (--split K), None for one fixed split
    split_file: str | None = None  # takes --split-file; without one, seeded splits kept as <out>/<this>

    def prepare_hint(self, uri: str) -> str:
        """The StorageError message for a release passed where prepared shards belong."""
        command = self.prepare_command.format(uri=uri, name=self.name)
        return (f"{uri} is a {self.called} release, not prepared shards: run `{command}` once, then pass "
                "--data DIR")


def _read_mars(root: str, **_) -> Release:
    return read_mars(root)


def _read_ilidsvid(root: str, *, split: int = 0, **_) -> Release:
    return read_ilidsvid(root, split)


def _read_prid(root: str, *, split: int = 0, split_file: str | None = None, out: str | None = None,
               endpoint_url: str | None = None) -> Release:
    """PRID-2011's splits come from `split_file` when given, else from <out>/splits_prid2011.json, written
    there from prid.make_splits (seeded) on first use and reused by every later prepare."""
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


_PREPARE_DATA = "python jobs/prepare_data.py --dataset {name} --root {uri} --out DIR --split K"

REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("mars", "MARS", _read_mars, MARS_PROTOCOL, root_help="bbox_train/, bbox_test/, info/",
                markers=("info", "bbox_train"), called="MARS",
                prepare_command="python jobs/prepare_mars.py --root {uri} --out DIR"),
    DatasetSpec("ilidsvid", "iLIDS-VID", _read_ilidsvid, TWO_CAMERA,
                root_help="the folder holding i-LIDS-VID/ and 'train-test people splits/'",
                markers=("i-LIDS-VID",), called="i-LIDS-VID", prepare_command=_PREPARE_DATA, splits=10),
    DatasetSpec("prid2011", "PRID-2011", _read_prid, TWO_CAMERA, root_help="the folder holding prid_2011/",
                markers=("prid_2011",), called="prid_2011", prepare_command=_PREPARE_DATA,
                splits=prid.NUM_SPLITS, split_file=prid.SPLITS_FILE),
)}
DATASETS = tuple(REGISTRY)


def spec(dataset: str) -> DatasetSpec:
    """The entry of `dataset`; a ValueError naming the data sets when there is none."""
    if dataset not in REGISTRY:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    return REGISTRY[dataset]


def read_release(dataset: str, root: str, *, split: int = 0, split_file: str | None = None,
                 out: str | None = None, endpoint_url: str | None = None) -> Release:
    """The checked release of `dataset` at `root`, with split `split` for iLIDS-VID and PRID-2011.

    PRID-2011's splits come from `split_file` when given, else from <out>/splits_prid2011.json, written
    there from prid.make_splits (seeded) on first use and reused by every later prepare."""
    return spec(dataset).read(root, split=split, split_file=split_file, out=out, endpoint_url=endpoint_url)
