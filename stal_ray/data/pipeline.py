"""Ray Data pipelines over the prepared shards: identity-balanced training groups and evaluation chunks.

Training: read_parquet of <uri>/train (one row per identity, files shuffled) -> flat_map cutting each identity
into groups of K clips of T frames (data.sampling; only the chosen frames' JPEG bytes travel on) -> decoding
CPU actors (data.images) -> the trainer's `training_batches`, which puts P groups of P distinct identities in
a batch. Evaluation: every frame of every test tracklet, in chunks of T, decoded the same way.
"""

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import ray.data

from stal_ray.data import shards, storage
from stal_ray.data.images import decode_frames_with_sizes
from stal_ray.data.sampling import identity_groups

if TYPE_CHECKING:
    import torch

JOINTS = shards.JOINTS
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Groups (or evaluation chunks) per decoding call: enough frames to amortise the call, few enough to stream.
_DECODE_BATCH = 4


def identity_labels(uri: str, *, endpoint_url: str | None = None) -> list[int]:
    """Sorted training identities: identity_labels(uri)[label] is the person id of classifier `label`."""
    manifest = shards.read_manifest(uri, endpoint_url=endpoint_url)
    fs, _ = storage.arrow_filesystem(uri, endpoint_url=endpoint_url, check=False)
    table = pq.ParquetDataset(manifest.paths("train"), filesystem=fs).read(columns=["identity"])
    return sorted(set(table.column("identity").to_pylist()))


def _keypoint_rows(values: Any, count: int) -> np.ndarray:
    """(count, 42) float32 from a row's nullable keypoints list; NaN where a frame (or the row) has none."""
    out = np.full((count, JOINTS * 3), np.nan, dtype=np.float32)
    if values is None:
        return out
    for index, value in enumerate(values):
        if value is not None:
            out[index] = np.asarray(value, dtype=np.float32)
    return out


def _expand_identity(row: dict[str, Any], *, clips_per_identity: int, seq_len: int, seed: int, epoch: int,
                     labels: dict[int, int]) -> list[dict[str, Any]]:
    """One identity row -> its groups of K clips, each with the K·T chosen frames' bytes and keypoints."""
    identity = int(row["identity"])
    tracklet_of_frame = np.asarray(row["tracklet"])
    frames = row["frames"]
    keypoints = _keypoint_rows(row.get("keypoints"), len(tracklet_of_frame))
    # seeded by (seed, epoch, identity): reproducible whatever order the files are read in, new every epoch
    rng = np.random.default_rng([seed, epoch, identity])
    out = []
    for group in identity_groups(tracklet_of_frame, clips_per_identity, seq_len, rng):
        chosen = group.ravel()
        out.append({
            "label": labels[identity],
            "identity": identity,
            "tracklets": tracklet_of_frame[group[:, 0]].astype(np.int32),
            "frames": [frames[i] for i in chosen],
            "keypoints": keypoints[chosen],
        })
    return out


def _expand_tracklet(row: dict[str, Any], *, seq_len: int) -> list[dict[str, Any]]:
    """One test tracklet row -> chunks of T consecutive frames, the last padded with its last frame."""
    frames = row["frames"]
    keypoints = _keypoint_rows(row.get("keypoints"), len(frames))
    out = []
    for chunk, start in enumerate(range(0, len(frames), seq_len)):
        valid = min(seq_len, len(frames) - start)
        chosen = np.minimum(np.arange(start, start + seq_len), start + valid - 1)
        out.append({
            "tracklet": int(row["tracklet"]),
            "identity": int(row["identity"]),
            "camera": int(row["camera"]),
            "is_query": bool(row["is_query"]),
            "chunk": chunk,
            "valid": valid,
            "frames": [frames[i] for i in chosen],
            "keypoints": keypoints[chosen],
        })
    return out


class _Decoder:
    """Ray Data actor: every row's frames -> uint8 (*clip_shape, H, W, 3), keypoints scaled to (H, W)."""

    def __init__(self, height: int, width: int, clip_shape: tuple[int, ...]):
        self.height, self.width, self.clip_shape = height, width, tuple(clip_shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(batch["frames"])
        jpegs = [jpeg for frames in batch["frames"] for jpeg in frames]
        images, ok, sizes = decode_frames_with_sizes(jpegs, self.height, self.width)
        keypoints = np.stack(list(batch["keypoints"])).reshape(-1, JOINTS, 3).astype(np.float32)
        # keypoints are in the stored frame's pixels: scale them to the resized frame
        scale = np.where(sizes > 0, np.array([self.height, self.width]) / np.maximum(sizes, 1), 0.0)
        keypoints[..., 0] *= scale[:, None, 1]
        keypoints[..., 1] *= scale[:, None, 0]
        has_keypoints = ~np.isnan(keypoints).reshape(rows, -1).all(axis=1)
        # a frame without keypoints gets confidence 0, so it cannot pull the pose head
        keypoints = np.nan_to_num(keypoints, nan=0.0)
        out = {key: value for key, value in batch.items() if key not in ("frames", "keypoints")}
        out["clips"] = images.reshape(rows, *self.clip_shape, self.height, self.width, 3)
        out["keypoints"] = keypoints.reshape(rows, *self.clip_shape, JOINTS, 3)
        out["has_keypoints"] = has_keypoints
        out["corrupt_frames"] = (~ok).reshape(rows, -1).sum(axis=1)
        return out


def _read(uri: str, split: str, shuffle: bool, endpoint_url: str | None) -> ray.data.Dataset:
    manifest = shards.read_manifest(uri, endpoint_url=endpoint_url)
    fs, _ = storage.arrow_filesystem(uri, endpoint_url=endpoint_url, check=False)
    # file list from the manifest, never a listing, so a stray or half-written file is not read
    return ray.data.read_parquet(manifest.paths(split), filesystem=fs, shuffle="files" if shuffle else None)


def training_dataset(uri: str, config, *, epoch: int = 0, endpoint_url: str | None = None,
                     labels: list[int] | None = None) -> ray.data.Dataset:
    """Rows = groups of K clips of one identity: clips uint8 (K, T, H, W, 3), keypoints (K, T, 14, 3) in
    the resized frame's pixels, has_keypoints, label (0..N-1 over sorted training identities), identity,
    tracklets (K,), corrupt_frames (a group with any is skipped and counted by `training_batches`).

    Build one per epoch (epoch= changes the sampled frames); shard it across workers with streaming_split.
    """
    data = config.data
    labels = labels if labels is not None else identity_labels(uri, endpoint_url=endpoint_url)
    if len(labels) < data.identities_per_batch:
        # a batch needs P distinct identities: with fewer, training_batches could never fill one
        raise ValueError(f"{uri}: {len(labels)} training identities, fewer than identities_per_batch = "
                         f"{data.identities_per_batch}")
    ds = _read(uri, "train", shuffle=True, endpoint_url=endpoint_url)
    ds = ds.flat_map(_expand_identity, fn_kwargs=dict(
        clips_per_identity=data.clips_per_identity, seq_len=data.seq_len, seed=config.train.seed,
        epoch=epoch, labels={identity: label for label, identity in enumerate(labels)}))
    return ds.map_batches(_Decoder, fn_constructor_kwargs=dict(
        height=data.height, width=data.width, clip_shape=(data.clips_per_identity, data.seq_len)),
        batch_size=_DECODE_BATCH, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=data.decode_concurrency))


def evaluation_dataset(uri: str, config, *, endpoint_url: str | None = None) -> ray.data.Dataset:
    """Rows = chunks of T consecutive frames of a test tracklet (all of its frames, the last chunk padded by
    repeating its last frame; `valid` says how many are real): clips uint8 (T, H, W, 3), keypoints
    (T, 14, 3), has_keypoints, tracklet, identity, camera, is_query, chunk, valid, corrupt_frames."""
    data = config.data
    ds = _read(uri, "test", shuffle=False, endpoint_url=endpoint_url)
    ds = ds.flat_map(_expand_tracklet, fn_kwargs=dict(seq_len=data.seq_len))
    return ds.map_batches(_Decoder, fn_constructor_kwargs=dict(
        height=data.height, width=data.width, clip_shape=(data.seq_len,)),
        batch_size=_DECODE_BATCH, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=data.decode_concurrency))


class TrainingBatches:
    """Iterable of training batches of P groups of P distinct identities from a training dataset or a
    streaming_split shard of one; counts the groups skipped for corrupt frames.

    Each batch: clips float (P·K, T, 3, H, W) normalised by mean/std, labels (P·K,) int64, identities
    (P·K,), tracklets (P·K,), keypoints (P·K, T, 14, 3) or None when no group of the batch has keypoints.
    """

    def __init__(self, dataset_or_shard, identities_per_batch: int, *, mean: Iterable[float] = IMAGENET_MEAN,
                 std: Iterable[float] = IMAGENET_STD, shuffle_buffer: int | None = None,
                 seed: int | None = None, drop_last: bool = True):
        import torch  # here, not at the top: the Ray Data workers that import this module never need it

        self.source = dataset_or_shard
        self.p = identities_per_batch
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 1, 3, 1, 1) * 255
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 1, 3, 1, 1) * 255
        # groups of one identity arrive together (one row expands into all of them): mix them before batching
        self.shuffle_buffer = shuffle_buffer if shuffle_buffer is not None else 8 * identities_per_batch
        self.seed = seed
        self.drop_last = drop_last
        self.skipped_groups = 0
        self.corrupt_frames = 0

    def _groups(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.source.iter_batches(batch_size=self.p, batch_format="numpy",
                                              local_shuffle_buffer_size=self.shuffle_buffer or None,
                                              local_shuffle_seed=self.seed):
            for index in range(len(batch["label"])):
                corrupt = int(batch["corrupt_frames"][index])
                if corrupt:
                    self.skipped_groups += 1
                    self.corrupt_frames += corrupt
                    continue
                yield {key: value[index] for key, value in batch.items()}

    def __iter__(self) -> "Iterator[dict[str, torch.Tensor | None]]":
        current: list[dict[str, np.ndarray]] = []
        deferred: list[dict[str, np.ndarray]] = []
        for group in self._groups():
            # a group whose identity is already in the batch waits for a later batch (triplet mining needs
            # P distinct identities)
            if any(g["identity"] == group["identity"] for g in current):
                deferred.append(group)
                continue
            current.append(group)
            while len(current) == self.p:
                yield self._collate(current)
                current = self._refill([], deferred)
        # the stream is over: what waits still makes batches of distinct identities where it can
        while deferred:
            before = len(deferred)
            current = self._refill(current, deferred)
            if len(current) == self.p or len(deferred) == before:
                # full, or nothing waiting fits: a partial batch goes out only when drop_last is off
                if len(current) == self.p or not self.drop_last:
                    yield self._collate(current)
                current = []
        if current and not self.drop_last:
            yield self._collate(current)

    def _refill(self, current: list[dict], deferred: list[dict]) -> list[dict]:
        """Move waiting groups into `current` (in arrival order) while it has room and they are new."""
        for waiting in list(deferred):
            if len(current) < self.p and all(g["identity"] != waiting["identity"] for g in current):
                current.append(waiting)
                deferred.remove(waiting)
        return current

    def _collate(self, groups: list[dict[str, np.ndarray]]) -> "dict[str, torch.Tensor | None]":
        import torch

        k = groups[0]["clips"].shape[0]
        clips = torch.from_numpy(np.concatenate([g["clips"] for g in groups]))  # (P·K, T, H, W, 3) uint8
        clips = (clips.permute(0, 1, 4, 2, 3).float() - self.mean) / self.std
        has_keypoints = any(bool(g["has_keypoints"]) for g in groups)
        return {
            "clips": clips,
            "labels": torch.from_numpy(np.repeat([int(g["label"]) for g in groups], k)).long(),
            "identities": torch.from_numpy(np.repeat([int(g["identity"]) for g in groups], k)),
            "tracklets": torch.from_numpy(np.concatenate([g["tracklets"] for g in groups]).astype(np.int64)),
            "keypoints": torch.from_numpy(np.concatenate([g["keypoints"] for g in groups]))
            if has_keypoints else None,
        }


def training_batches(dataset_or_shard, identities_per_batch: int, **kwargs) -> TrainingBatches:
    """Batches of P groups (P distinct identities × K clips) from training_dataset or a shard of it."""
    return TrainingBatches(dataset_or_shard, identities_per_batch, **kwargs)
