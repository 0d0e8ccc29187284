"""Ray Data pipelines over the prepared shards: identity-balanced training groups and evaluation chunks.

Training: the epoch's plan (data.sampling.epoch_plan, from the light identity and tracklet columns only:
which groups of K clips of T frames, of which identities, in which order; docs/sampling.md) -> one read
task per window of the plan, reading its identities' rows and cutting their groups in plan order (only the
chosen frames' JPEG bytes travel on, gathered in Arrow by data.frames) -> decoding CPU tasks (data.images;
as many as the cluster's free CPUs allow, or data.decode_concurrency) -> the trainer's data.batches, which
puts P groups of P distinct identities in a batch. Held-out identities
(exclude_identities) are dropped by the Parquet reader. Evaluation: read_parquet of every frame of every
test tracklet, in chunks of T, decoded the same way. Validation (data.validation): the same chunks, cut
from the training rows of the held-out identities (a filter Ray Data pushes down into the Parquet scan).

Read tasks run on any node of the cluster, whose environment may lack the driver's S3 endpoint and
credentials: the filesystem handed to them carries them (see storage.read_filesystem). Every task of these
streams runs again elsewhere when its node is lost, a bounded number of times (retries.py), and delivers its
rows once.
"""

import contextlib
import math
import os
import pickle
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data
from ray.data.expressions import col

from stal_ray.config_schema import stream_seed
from stal_ray.data.prepared.handle import PreparedData, as_prepared
from stal_ray.data.stream.augment import Augmentation
from stal_ray.data.stream.batches import RecycledBuffers
from stal_ray.data.stream.clips import clip_rows
from stal_ray.data.stream.frames import StoredRows, chunks_of, to_numpy
from stal_ray.data.stream.images import decode_frame, decode_frames_with_sizes
from stal_ray.data.stream.retries import task_options
from stal_ray.data.stream.sampling import EpochPlan, epoch_plan, sequence_of_length

if TYPE_CHECKING:
    from stal_ray.data.prepared.validation import ValidationSplit


_FOOTER_ACTORS_VARIABLE = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_FOOTER_READERS = 2
# Blocks of ~128 groups of JPEG bytes (MARS-sized frames) before decoding: enough blocks for every decoding
# task to get work, few enough that per-task and per-block costs stay small (16 MiB gave ~3% fewer frames
# per CPU-second in bench/data.py, 4 MiB was 2x slower). After decoding, each call's output is one block
# (see decode_batch_size).
_BLOCK_BYTES = 32 << 20
# Identity rows per read step of a training file: a MARS identity holds ~800 frames (~7 MB of JPEG).
_ROWS_PER_READ = 4


def identity_labels(data: PreparedData | str, *,
                    exclude_identities: Iterable[int] | None = None) -> list[int]:
    """Sorted training identities, less exclude_identities (the held-out validation ones, e.g.
    split.identities): identity_labels(data)[label] is the person id of classifier `label`."""
    data = as_prepared(data)
    table = pq.ParquetDataset(data.paths("train"), filesystem=data.arrow_filesystem()).read(
        columns=["identity"])
    return sorted(set(table.column("identity").to_pylist()) - set(exclude_identities or ()))


def undecodable_frames(data: PreparedData | str, identity: int, tracklets: Iterable[int], *,
                       limit: int = 3) -> list[str]:
    """The first `limit` frames of `identity`'s `tracklets` (track-table rows) that do not decode, named as
    the release names them (track-table row, camera, frame number): the driver's look at what a training
    epoch skipped, read from the identity's own row only."""
    data = as_prepared(data)
    rows = pq.ParquetDataset(data.paths("train"), filesystem=data.arrow_filesystem(),
                             filters=[("identity", "=", identity)]).read()
    wanted, found = set(tracklets), []
    for row in rows.to_pylist():
        for jpeg, tracklet, camera, number in zip(row["frames"], row["tracklet"], row["camera"],
                                                  row["frame_index"], strict=True):
            if tracklet in wanted and decode_frame(jpeg, 8, 8) is None:
                found.append(f"track-table row {tracklet} (camera {camera}), frame {number}")
                if len(found) == limit:
                    return found
    return found


def _held_out_chunks(rows: pa.Table, *, seq_len: int, queries: frozenset[int]) -> pa.Table:
    """Training identity rows -> the evaluation chunks (see _tracklet_chunks) of each of their tracklets,
    tracklet by tracklet as stored, camera from the per-frame column."""
    stored = StoredRows(rows)
    tracklet_of_frame, camera_of_frame = stored.per_frame("tracklet"), stored.per_frame("camera")
    parts = []
    for row, identity in enumerate(stored.column("identity").tolist()):
        own = np.arange(stored.starts[row], stored.starts[row] + stored.lengths[row])
        tracklets, first = np.unique(tracklet_of_frame[own], return_index=True)
        for tracklet in tracklets[np.argsort(first)].tolist():
            positions = own[tracklet_of_frame[own] == tracklet]  # temporal order, as stored
            fields = {"tracklet": tracklet, "identity": identity, "camera": camera_of_frame[positions[0]],
                      "is_query": tracklet in queries}
            parts.append((positions, fields))
    return _chunk_table(stored, parts, seq_len)


def _tracklet_chunks(rows: pa.Table, *, seq_len: int, length: int | None = None, seed: int = 0) -> pa.Table:
    """Test tracklet rows -> chunks of T consecutive frames, the last padded with its last frame.

    With `length`, only a sequence of that many frames is used (sampling.sequence_of_length, drawn from
    (seed, tracklet)), in chunks of T the same way."""
    stored = StoredRows(rows)
    values = {name: stored.column(name).tolist() for name in ("tracklet", "identity", "camera", "is_query")}
    parts = []
    for row in range(len(stored)):
        positions = np.arange(stored.lengths[row])
        if length is not None:
            rng = np.random.default_rng([seed, values["tracklet"][row]])
            positions = sequence_of_length(len(positions), length, rng)
        parts.append((stored.starts[row] + positions, {name: column[row] for name, column in values.items()}))
    return _chunk_table(stored, parts, seq_len)


def _chunk_table(stored: StoredRows, parts: list[tuple[np.ndarray, dict[str, Any]]],
                 seq_len: int) -> pa.Table:
    """(frame positions, tracklet fields) per tracklet -> one row per chunk of T: the fields, chunk (its
    number in the tracklet), valid, frames and keypoints."""
    chosen, columns = [], {"tracklet": [], "identity": [], "camera": [], "is_query": [], "chunk": [],
                           "valid": []}
    for positions, fields in parts:
        frames, valid = chunks_of(positions, seq_len)
        chosen.append(frames)
        for name, value in fields.items():
            columns[name] += [value] * len(frames)
        columns["chunk"] += range(len(frames))
        columns["valid"] += valid.tolist()
    types = {"is_query": bool}
    return stored.table(np.concatenate(chosen) if chosen else np.zeros((0, seq_len), dtype=np.int64),
                        {name: np.array(values, dtype=types.get(name, np.int64))
                         for name, values in columns.items()})


# This process's arrays of decoded frames (_decode_clips), each reused once Ray has copied the output it was
# part of into the object store and let go of it
_DECODED = RecycledBuffers(size=2)


def _decode_clips(batch: pa.Table, *, height: int, width: int, clip_shape: tuple[int, ...],
                  augment: Augmentation | None = None) -> dict[str, np.ndarray]:
    """Ray Data task: every row's frames -> uint8 (*clip_shape, H, W, 3), keypoints scaled to (H, W);
    training groups augmented when `augment` is given (data.augment)."""
    jpegs = pc.list_flatten(batch.column("frames")).to_pylist()
    images, ok, sizes = decode_frames_with_sizes(
        jpegs, height, width, out=_DECODED.empty((len(jpegs), height, width, 3), np.uint8))
    out = {name: to_numpy(batch.column(name)) for name in batch.column_names
           if name not in ("frames", "keypoints")}
    out.update(clip_rows(images, ok, sizes, to_numpy(batch.column("keypoints")), rows=batch.num_rows,
                         clip_shape=clip_shape))
    if augment is not None:
        out["clips"], out["keypoints"] = augment(out["clips"], out["keypoints"], out["identity"],
                                                 out["group"])
    return out


def _encoded_clips(batch: pa.Table, *, height: int, width: int) -> pa.Table:
    """data.decode_at = consumer: the rows as they are (the chosen frames' JPEG bytes, the stored keypoints)
    and the size the consumer decodes them to (data.consumer)."""
    return batch.append_column("height", pa.array(np.full(batch.num_rows, height, np.int32))).append_column(
        "width", pa.array(np.full(batch.num_rows, width, np.int32)))


@contextlib.contextmanager
def _footer_readers(files: int) -> Iterator[None]:
    """Fewer Parquet footer-reading actors while a read is planned, unless the user chose a number.

    Ray Data 2.60 reads footers on a pool of RAY_DATA_PARQUET_FOOTER_NUM_ACTORS actors (default 32), new
    processes for every read, i.e. every epoch: for the tens of files of a prepared data set that is ~10 CPU
    seconds and ~5 s of start-up per epoch on a 2-core machine (bench/data.py), for reads a couple of actors
    with 128 concurrent requests each do as fast. The variable is read when the read is planned, here.
    """
    if _FOOTER_ACTORS_VARIABLE in os.environ:
        yield
        return
    os.environ[_FOOTER_ACTORS_VARIABLE] = str(max(1, min(files, _FOOTER_READERS)))
    try:
        yield
    finally:
        os.environ.pop(_FOOTER_ACTORS_VARIABLE, None)


def _read(data: PreparedData, split: str, *, keep: Iterable[int] | None = None) -> ray.data.Dataset:
    """The split's rows in stored order, only those of identities in `keep` when given."""
    paths = data.paths(split)
    with _footer_readers(len(paths)):
        # file list from the manifest, never a listing, so a stray or half-written file is not read
        ds = ray.data.read_parquet(paths, filesystem=data.read_filesystem(), ray_remote_args=task_options())
    # an expression filter right after the read is pushed into the Parquet scan: rows are dropped as they are
    # read, and row groups whose identity statistics exclude them are skipped unread
    if keep is not None:
        ds = ds.filter(expr=col("identity").is_in(sorted({int(i) for i in keep})))
    return ds


def decode_batch_size(data, clip_shape: tuple[int, ...]) -> int:
    """Rows (groups, or evaluation chunks) per decoding call: the fewest whose decoded frames reach the block
    target, so each call's output becomes a block of its own. Ray joins outputs below the target into one
    block of several chunks, which the consumer must copy to make one array (two 19 MB outputs per block:
    5x the driver's CPU; bench/data.py); outputs above it are passed on as they are (sliced, without a copy,
    from 1.5x the target)."""
    row_bytes = math.prod(clip_shape) * data.height * data.width * 3
    return max(1, math.ceil(_BLOCK_BYTES / row_bytes))


def _decode(ds: ray.data.Dataset, data, clip_shape: tuple[int, ...],
            augment: Augmentation | None = None) -> ray.data.Dataset:
    """Decoding tasks after `ds`: at most data.decode_concurrency at once, or (None) as many as the cluster's
    free CPUs allow. With data.decode_at = consumer, no decoding here: the rows keep their JPEG bytes and
    stored keypoints, and say the size to decode to (the consumer decodes and augments, data.consumer)."""
    if data.decode_at == "consumer":
        # fused into the task before it by Ray Data: no task of its own, no copy of the bytes
        return ds.map_batches(_encoded_clips, fn_kwargs=dict(height=data.height, width=data.width),
                              batch_size=None, batch_format="pyarrow", **task_options())
    # Tasks, not an actor pool: Ray reuses its worker processes for tasks, while actors are new processes
    # in every execution, i.e. every epoch (a few seconds each epoch on a 2-core machine; bench/train.py).
    # Uncapped, Ray Data starts a task wherever a CPU is free and re-reads the cluster's size as it runs, so
    # CPU nodes that join (cluster/aws_gpu.yaml's cpu_worker) decode too.
    ds = ds.map_batches(_decode_clips, fn_kwargs=dict(height=data.height, width=data.width,
                                                      clip_shape=clip_shape, augment=augment),
                        batch_size=decode_batch_size(data, clip_shape), batch_format="pyarrow",
                        compute=ray.data.TaskPoolStrategy(size=data.decode_concurrency), **task_options())
    # A decoding task takes whole blocks: with Ray's default of 128 MiB, a small data set's groups arrive as
    # one block and one task decodes them all while the others idle. This dataset's own (sealed) context.
    ds.context.target_max_block_size = _BLOCK_BYTES
    return ds


def _training_index(paths: list[str], filesystem: pafs.FileSystem, exclude: set[int],
                    ) -> tuple[dict[int, np.ndarray], dict[int, tuple[int, int]], list[int]]:
    """From the light columns of the training files (identity, the per-frame tracklet; never the frames):
    each identity's tracklet_of_frame, its (file, row group), and the identities in stored order."""
    tracklets, where, stored = {}, {}, []
    for number, path in enumerate(paths):
        with filesystem.open_input_file(path) as source:
            # one read of the light columns of every row group, their ranges fetched at once (pre_buffer):
            # a row group per identity makes hundreds of small ranges, one round trip each on S3 otherwise
            parquet = pq.ParquetFile(source, pre_buffer=True)
            rows = parquet.read(columns=["identity", "tracklet"])
            sizes = [parquet.metadata.row_group(group).num_rows for group in range(parquet.num_row_groups)]
        group_of_row = np.repeat(np.arange(len(sizes)), sizes)
        lengths = to_numpy(pc.list_value_length(rows.column("tracklet")))
        starts = np.cumsum(lengths) - lengths
        flat = to_numpy(pc.list_flatten(rows.column("tracklet")))
        for row, identity in enumerate(to_numpy(rows.column("identity")).tolist()):
            if identity in exclude:
                continue
            tracklets[identity] = flat[starts[row]:starts[row] + lengths[row]]
            where[identity] = (number, int(group_of_row[row]))
            stored.append(identity)
    return tracklets, where, stored


def _window_items(plan: EpochPlan, where: dict[int, tuple[int, int]], paths: list[str]) -> list[dict]:
    """One item per window of the plan: its groups (pickled: identity, group, positions) and the row groups
    that hold its identities."""
    items = []
    for window in range(int(plan.window.max()) + 1 if len(plan) else 0):
        take = plan.window == window
        identities = plan.identity[take]
        locations = sorted({where[int(i)] for i in np.unique(identities)})
        items.append({"window": window, "plan": pickle.dumps({
            "identity": identities, "group": plan.group[take], "positions": plan.positions[take],
            "locations": [(paths[f], g) for f, g in locations]})})
    return items


def _window_groups(items: pa.Table, *, filesystem: pafs.FileSystem, labels: dict[int, int],
                   clips_per_identity: int, seq_len: int, emit: int = 64) -> Iterator[pa.Table]:
    """Windows of the plan -> their groups of K clips in plan order: label, identity, group, tracklets (K,),
    and the K·T chosen frames' JPEG bytes and keypoints. Each row group holding a window identity is read
    once, and only the chosen frames of the window's rows are kept (frames.StoredRows.table)."""
    for blob in items.column("plan").to_pylist():
        plan = pickle.loads(blob)
        order = np.arange(len(plan["identity"]))
        parts, indices = [], []
        for path, group in plan["locations"]:
            with filesystem.open_input_file(path) as source:
                rows = pq.ParquetFile(source).read_row_group(group)
            stored = StoredRows(rows)
            tracklet_of_frame = stored.per_frame("tracklet")
            row_of = {identity: row for row, identity in enumerate(stored.column("identity").tolist())}
            mine = order[np.isin(plan["identity"], list(row_of))]
            if not len(mine):
                continue
            chosen, tracklets = [], []
            for index in mine.tolist():
                row = row_of[int(plan["identity"][index])]
                positions = stored.starts[row] + plan["positions"][index]
                chosen.append(positions.reshape(-1))
                tracklets.append(tracklet_of_frame[positions[:, 0]])
            identities = plan["identity"][mine]
            parts.append(stored.table(np.array(chosen), {
                "label": np.array([labels[int(i)] for i in identities], dtype=np.int64),
                "identity": identities.astype(np.int64),
                "group": plan["group"][mine].astype(np.int64),
                "tracklets": np.array(tracklets, dtype=np.int32).reshape(-1, clips_per_identity)}))
            indices.append(mine)
            del rows, stored
        if not parts:
            continue
        # back into plan order: part j holds the plan entries indices[j]
        table = pa.concat_tables(parts).take(pa.array(np.argsort(np.concatenate(indices), kind="stable")))
        for start in range(0, table.num_rows, emit):
            yield table.slice(start, emit)


def training_dataset(data: PreparedData | str, config, *, epoch: int = 0, labels: list[int] | None = None,
                     exclude_identities: Iterable[int] | None = None) -> ray.data.Dataset:
    """Rows = groups of K clips of one identity: clips uint8 (K, T, H, W, 3), keypoints (K, T, 14, 3) in
    the resized frame's pixels, has_keypoints, label (0..N-1 over sorted training identities), identity,
    group, tracklets (K,), corrupt_frames (a group with any is skipped and counted by `training_batches`).

    exclude_identities (the validation split's held-out identities) are left out of the rows and, unless
    `labels` is given, of the labels. Build one per epoch (epoch= changes the sampled frames); shard it across
    workers with streaming_split.
    """
    prepared, data = as_prepared(data), config.data
    if labels is None:
        labels = identity_labels(prepared, exclude_identities=exclude_identities)
    if len(labels) < data.identities_per_batch:
        # a batch needs P distinct identities: with fewer, training_batches could never fill one
        raise ValueError(f"{prepared.uri}: {len(labels)} training identities, fewer than "
                         f"identities_per_batch = {data.identities_per_batch}")
    # The epoch's plan from the light columns alone, on this process: which groups, in which order
    # (data.mixing, data.weighting; docs/sampling.md). Files are then read by plain tasks, one per window of
    # the plan, rather than read_parquet, which starts a pool of footer-reading actors (new processes) in
    # every execution: once per epoch here, where the manifest already lists the files. The handle's manifest
    # was read once in the driver: every epoch reads the version the run started with.
    paths = prepared.paths("train")
    filesystem = prepared.read_filesystem()
    tracklets, where, stored = _training_index(paths, filesystem, {int(i) for i in exclude_identities or ()})
    # the old stream's order, for data.mixing = "shards": a different file order every epoch, rows as stored
    file_order = np.random.default_rng([stream_seed(config), epoch]).permutation(len(paths))
    rank = {int(f): position for position, f in enumerate(file_order)}
    stored = sorted(stored, key=lambda identity: rank[where[identity][0]])
    plan = epoch_plan(tracklets, clips_per_identity=data.clips_per_identity, seq_len=data.seq_len,
                      identities_per_batch=data.identities_per_batch, seed=stream_seed(config), epoch=epoch,
                      max_groups=data.max_groups_per_identity, weighting=data.weighting, mixing=data.mixing,
                      stored_order=stored)
    items = _window_items(plan, where, paths)
    ds = ray.data.from_items(items, override_num_blocks=max(len(items), 1))
    ds = ds.map_batches(_window_groups, batch_size=1, batch_format="pyarrow", fn_kwargs=dict(
        filesystem=filesystem, labels={identity: label for label, identity in enumerate(labels)},
        clips_per_identity=data.clips_per_identity, seq_len=data.seq_len), **task_options())
    return _decode(ds, data, (data.clips_per_identity, data.seq_len),
                   augment=Augmentation.from_config(config, epoch))


def evaluation_dataset(data: PreparedData | str, config, *, sequence_length: int | None = None,
                       seed: int = 0) -> ray.data.Dataset:
    """Rows = chunks of T consecutive frames of a test tracklet (all of its frames, the last chunk padded by
    repeating its last frame; `valid` says how many are real): clips uint8 (T, H, W, 3), keypoints
    (T, 14, 3), has_keypoints, tracklet, identity, camera, is_query, chunk, valid, corrupt_frames.

    sequence_length L: each tracklet contributes L frames instead of all of them, drawn as the paper's
    sequence-length test does (sampling.sequence_of_length; the same seed, the same frames)."""
    ds = _read(as_prepared(data), "test")
    data = config.data
    ds = ds.map_batches(_tracklet_chunks, batch_size=_ROWS_PER_READ, batch_format="pyarrow",
                        fn_kwargs=dict(seq_len=data.seq_len, length=sequence_length, seed=seed),
                        **task_options())
    return _decode(ds, data, (data.seq_len,))


def validation_dataset(data: PreparedData | str, config, split: "ValidationSplit") -> ray.data.Dataset:
    """Rows as evaluation_dataset's, for the held-out tracklets of a validation split (from
    data.validation.ensure_validation_split): every frame of each, in chunks of T; is_query marks the
    split's queries; `tracklet` is the training track-table row. Reads only the training shards."""
    prepared = as_prepared(data)
    if split.dataset != str(prepared.manifest.source.get("fingerprint")):
        raise ValueError(f"{prepared.uri}: the validation split {split.uri or ''} was carved from another "
                         "prepared data set (it was rebuilt since); call ensure_validation_split again")
    data = config.data
    ds = _read(prepared, "train", keep=split.identities)
    ds = ds.map_batches(_held_out_chunks, batch_size=_ROWS_PER_READ, batch_format="pyarrow",
                        fn_kwargs=dict(seq_len=data.seq_len, queries=frozenset(split.query_tracklets)),
                        **task_options())
    return _decode(ds, data, (data.seq_len,))
