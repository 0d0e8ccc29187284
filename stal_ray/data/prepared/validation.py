"""The validation split for Ray Tune: identities held out of the training split, with queries by camera.

It is carved from the training identities only, so tuning never sees the test split. Held out: ceil(fraction ×
training identities), a seeded draw among the identities seen by >= 2 cameras (others only when those are
too few). Queries: for every held-out identity seen by >= 2 cameras, one tracklet per camera it appears in;
gallery: every held-out tracklet (the "official" MARS protocol then drops same-identity same-camera entries,
so each query keeps its cross-camera matches). Tracklets are named by the ids in the training rows'
per-frame `tracklet` column (rows of tracks_train_info).

The split is written once, as JSON next to the manifest (<uri>/validation/split-<fraction>-<seed>.json,
through a temporary name then a move), and read back by every later call, so all trials and jobs of a study
hold out the same identities.
"""

import contextlib
import json
import logging
import math
import posixpath
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.parquet as pq

from stal_ray.core import storage
from stal_ray.data.prepared.handle import PreparedData, as_prepared

logger = logging.getLogger(__name__)

FOLDER = "validation"
SPLIT_VERSION = 1
# a held-out set needs two identities (a query must have wrong matches to rank against)
MIN_HELD_OUT = 2


@dataclass
class ValidationSplit:
    fraction: float
    seed: int
    identities: list[int]  # held-out person ids, sorted
    query_tracklets: list[int]  # sorted; one per (identity, camera) of identities seen by >= 2 cameras
    tracklets: list[int]  # every held-out tracklet, sorted: the gallery
    dataset: str  # fingerprint of the prepared data set it was carved from (manifest source)
    uri: str = field(default="", compare=False)  # where it lives; not stored
    reused: bool = field(default=False, compare=False)  # read from an existing file; not stored

    def to_json(self) -> str:
        stored = {k: v for k, v in asdict(self).items() if k not in ("uri", "reused")}
        return json.dumps({"version": SPLIT_VERSION, **stored}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ValidationSplit":
        data = json.loads(text)
        if data.get("version") != SPLIT_VERSION:
            raise ValueError(f"split version {data.get('version')!r}, this code reads {SPLIT_VERSION}")
        return cls(float(data["fraction"]), int(data["seed"]), [int(i) for i in data["identities"]],
                   [int(t) for t in data["query_tracklets"]], [int(t) for t in data["tracklets"]],
                   str(data["dataset"]))


def split_uri(uri: str, fraction: float, seed: int = 0) -> str:
    """Where the split of these settings lives for the data set at `uri`."""
    return storage.join(uri, FOLDER, _file_name(fraction, seed))


def _file_name(fraction: float, seed: int) -> str:
    return f"split-{fraction:.6g}-{seed}.json"


def ensure_validation_split(data: PreparedData | str, fraction: float, seed: int = 0, *,
                            min_training_identities: int = MIN_HELD_OUT) -> ValidationSplit:
    """The validation split of the prepared data set `data`: read when written before, else chosen and
    written once (split.reused says which).

    fraction: share of training identities held out (data.val_identities), in (0, 1); at least 2 identities
    are held out and at least `min_training_identities` left for training (give identities_per_batch), else
    ValueError. A file left by another data set at the same URI (an --overwrite re-prepare) is replaced.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"data.val_identities = {fraction} cannot carve a validation split: it is the share "
                         "of training identities held out and must be in (0, 1), e.g. 0.1")
    data = as_prepared(data)
    uri = data.uri
    fingerprint = str(data.manifest.source.get("fingerprint"))
    fs, root = data.filesystem()
    path = posixpath.join(root, FOLDER, _file_name(fraction, seed))
    where = split_uri(uri, fraction, seed)
    with data.errors():
        try:
            text = fs.cat_file(path).decode()
        except FileNotFoundError:
            text = None
    if text is not None:
        try:
            split = ValidationSplit.from_json(text)
        except (ValueError, KeyError, TypeError) as error:
            logger.warning("%s is unreadable (%r); writing it again", where, error)
        else:
            if split.dataset == fingerprint:
                split.uri, split.reused = where, True
                return split
            logger.warning("%s was carved from another data set (fingerprint %s, now %s); writing it again",
                           where, split.dataset[:12], fingerprint[:12])
    split = _choose(data, fraction, seed, min_training_identities)
    split.dataset, split.uri = fingerprint, where
    with data.errors():
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        # concurrent trials may race here: each writes its own temporary object and the moves all put the
        # same bytes (the choice is deterministic) in place, so a reader never sees half a file
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
        fs.pipe_file(tmp, split.to_json().encode())
        try:
            fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):  # cleaning up: the error on its way up is the one to see
                fs.rm(tmp)
            raise
    logger.info("wrote %s: %d identities held out, %d queries, %d gallery tracklets", where,
                len(split.identities), len(split.query_tracklets), len(split.tracklets))
    return split


def held_out_count(fraction: float, total: int) -> int:
    """Identities a split of `fraction` holds out of `total` training identities."""
    # rounded first: 0.1 × 30 is 3.0000000000000004 in floating point, which must not hold out 4
    return max(MIN_HELD_OUT, math.ceil(round(fraction * total, 9)))


def _choose(data: PreparedData, fraction: float, seed: int, min_training: int) -> ValidationSplit:
    uri = data.uri
    # the small per-frame columns only: the frames (nearly all of the bytes) are not read
    table = pq.ParquetDataset(data.paths("train"), filesystem=data.arrow_filesystem()).read(
        columns=["identity", "tracklet", "camera"])
    rows = sorted(zip(table.column("identity").to_pylist(), table.column("tracklet").to_pylist(),
                      table.column("camera").to_pylist(), strict=True))
    total = len(rows)
    held_out = held_out_count(fraction, total)
    if held_out > total - min_training:
        raise ValueError(f"data.val_identities = {fraction} holds out {held_out} of the {total} training "
                         f"identities of {uri} (at least {MIN_HELD_OUT}), leaving {total - held_out}, fewer "
                         f"than the {min_training} training needs; lower data.val_identities or prepare a "
                         "data set with more identities")
    # drawn among the identities seen by >= 2 cameras, the ones a query can be asked of; the others only
    # when there are too few of those (they then add gallery tracklets, as MARS's distractors do)
    cameras_of = {identity: set(np.asarray(camera).tolist()) for identity, _, camera in rows}
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    several = [identity for identity, cameras in cameras_of.items() if len(cameras) >= 2]
    for pool in (several, [identity for identity in cameras_of if identity not in several]):
        take = min(held_out - len(chosen), len(pool))
        chosen += rng.choice(pool, take, replace=False).tolist() if take else []
    queries, gallery = [], []
    for identity, tracklet_of_frame, camera_of_frame in rows:
        if identity not in chosen:
            continue
        tracklets, first = np.unique(np.asarray(tracklet_of_frame), return_index=True)
        cameras = np.asarray(camera_of_frame)[first]
        gallery.extend(tracklets.tolist())
        if len(cameras_of[identity]) < 2:
            continue  # a query here would have no cross-camera match
        # seeded per identity, so an identity's queries do not depend on which others were drawn
        rng = np.random.default_rng([seed, identity])
        for camera in sorted(cameras_of[identity]):
            queries.append(int(rng.choice(tracklets[cameras == camera])))
    if not queries:
        raise ValueError(f"{uri}: no training identity is seen by two cameras, so a validation split would "
                         "have no query with a cross-camera match; prepare a data set whose identities "
                         "appear in several cameras")
    return ValidationSplit(fraction, seed, sorted(chosen), sorted(queries), sorted(gallery), dataset="")
