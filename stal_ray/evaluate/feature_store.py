"""features.parquet: a FeatureSet saved as one Parquet row per tracklet and read back, so that an evaluation
of the same model file and data set reuses its features instead of extracting them again."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stal_ray.core import storage
from stal_ray.evaluate.chunks import FeatureSet
from stal_ray.evaluate.distance import TrackletFeatures

FEATURES_FORMAT, FEATURES_VERSION = "stal_ray.features", 1
_TENSORS = ("g", "f_attended", "f_temporal", "f_mean", "part_scores")


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values).reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])


def save_features(feature_set: FeatureSet, path_or_url: str) -> None:
    """One Parquet row per tracklet: metadata, the five feature tensors as fixed-size lists, and the sampled
    attention scores and frames (null elsewhere); shapes in the schema metadata. Atomic on local disk."""
    features = feature_set.features
    n = len(feature_set)
    columns = {name: pa.array(getattr(feature_set, name)) for name in
               ("tracklet", "identity", "camera", "is_query", "num_frames", "corrupt_frames")}
    for name in _TENSORS:
        columns[name] = _fixed(getattr(features, name).detach().cpu().numpy().astype(np.float32))
    scores = [feature_set.sample_scores.get(t) for t in feature_set.tracklet.tolist()]
    columns["sample_scores"] = pa.array([None if s is None else s.ravel() for s in scores],
                                        type=pa.list_(pa.float32()))
    frames = [feature_set.sample_frames.get(t) for t in feature_set.tracklet.tolist()]
    columns["sample_frames"] = pa.array([None if f is None else f.tobytes() for f in frames],
                                        type=pa.binary())
    frame_shape = next((list(f.shape[1:]) for f in frames if f is not None), None)
    shapes = {name: list(getattr(features, name).shape[1:]) for name in _TENSORS}
    info = {"format": FEATURES_FORMAT, "version": FEATURES_VERSION, "rows": n, "shapes": shapes,
            "frame_shape": frame_shape, "source": feature_set.source}
    table = pa.table(columns).replace_schema_metadata({"stal_ray": json.dumps(info)})
    _write_table(table, path_or_url)


def _write_table(table: pa.Table, path_or_url: str) -> None:
    # readable by this user only on local disk (0o600), as tempfile made the file before
    with storage.open_atomic(path_or_url, mode=0o600) as out:
        pq.write_table(table, out)


def load_features(path_or_url: str) -> FeatureSet:
    """The FeatureSet that save_features wrote."""
    fs, path = storage.filesystem(path_or_url, check=False)
    with storage.errors(path_or_url):
        try:
            with fs.open(path, "rb") as source:
                table = pq.read_table(source)
        except FileNotFoundError:
            raise FileNotFoundError(f"features file not found: {path_or_url}") from None
    metadata = table.schema.metadata or {}
    info = json.loads(metadata.get(b"stal_ray", b"{}"))
    if info.get("format") != FEATURES_FORMAT or info.get("version") != FEATURES_VERSION:
        raise ValueError(f"{path_or_url} is not a stal_ray features file of version {FEATURES_VERSION} "
                         f"(found {info.get('format')!r} version {info.get('version')!r}); delete it and "
                         "extract again")
    n = table.num_rows

    def tensor(name: str) -> torch.Tensor:
        flat = table.column(name).combine_chunks().flatten().to_numpy()
        return torch.from_numpy(flat.reshape(n, *info["shapes"][name]).copy())

    features = TrackletFeatures(**{name: tensor(name) for name in _TENSORS})
    meta = {name: table.column(name).to_numpy() for name in
            ("tracklet", "identity", "camera", "is_query", "num_frames", "corrupt_frames")}
    parts = info["shapes"]["part_scores"][0]
    sample_scores, sample_frames = {}, {}
    for tracklet, scores, frames in zip(meta["tracklet"].tolist(), table.column("sample_scores").to_pylist(),
                                        table.column("sample_frames").to_pylist(), strict=True):
        if scores is not None:
            sample_scores[tracklet] = np.asarray(scores, dtype=np.float32).reshape(-1, parts)
        if frames is not None:
            sample_frames[tracklet] = np.frombuffer(frames, dtype=np.uint8).reshape(-1, *info["frame_shape"])
    return FeatureSet(features=features, sample_scores=sample_scores, sample_frames=sample_frames,
                      source=info.get("source") or {}, **meta)
