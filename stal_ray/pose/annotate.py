"""Estimate the 14 joints of every frame of a prepared data set and add them to it in place.

Ray Data reads the current version's shard files (one read task per file), an actor pool runs the pose
model over every frame of every row (each actor loads the model once: a CPU, or a GPU with num_gpus), and
the driver rewrites each shard with its `keypoints` column filled (manifest.py: per frame 14 x (x, y,
confidence) in the frame's pixels; a frame the model cannot decode gets a null element, which readers treat
as confidence 0) into a new version folder. Once every shard is written, a manifest with the model's name
and sha256 under `pose`, the new shard checksums and the counts goes in, and the pointer swaps
(data/publish.py): readers see the data set without these joints or with all of them, never a mix.

Rerunning with the same model is a no-op (manifest.pose names it). A run that stops part-way leaves its
finished shards and a progress file (RESUME, at the data set root, naming the version folder, the version it
started from and the model); the next run with the same model over the same version writes only the rest.
The prepare lock (publish.prepare_lock) keeps a prepare and this job from writing at the same time.

A read task or a model actor on a lost node runs again elsewhere (data.stream.retries); each row's joints
are kept once, by its shard and key, and a shard is written once. When the retries run out, the error names
the shards not written; those written are kept for the next run.
"""

import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from stal_ray.core import storage
from stal_ray.core.progress import Progress
from stal_ray.data.prepared import publish
from stal_ray.data.prepared.handle import PreparedData, as_prepared
from stal_ray.data.prepared.integrity import check_shards
from stal_ray.data.prepared.manifest import KEYPOINT_TYPE, MANIFEST, SCHEMAS, SPLITS, Manifest
from stal_ray.data.prepared.shard_files import PartWriter, ShardFile
from stal_ray.data.stream.retries import LOST, actor_options, task_options, work_lost
from stal_ray.pose.models import PoseModel, decode, estimator

logger = logging.getLogger(__name__)

RESUME = "pose-resume.json"  # at the data set root: the unpublished version a run is filling
KEYS = {"train": "identity", "test": "tracklet"}  # each split's row key (unique within the split)
_ROWS_PER_BATCH = 2  # shard rows per model call: an identity (train) or a tracklet (test) holds many frames


@dataclass
class PoseResult:
    manifest: Manifest
    reused: bool  # the data set already had this model's joints: nothing written
    resumed_shards: int = 0  # shards a previous, interrupted run had finished
    frames: dict[str, int] = field(default_factory=dict)  # frames run through the model now, per split
    unreadable: dict[str, int] = field(default_factory=dict)  # of all frames, per split
    seconds: float = 0.0  # model stage, from the first read to the last shard written


class PoseEstimator:
    """Ray Data actor: shard rows (file, key, frames) -> (file, key, keypoints per frame, unreadable)."""

    def __init__(self, model: PoseModel, threads: int = 1, use_gpu: bool = False):
        self.model = estimator(model, threads, use_gpu)

    def __call__(self, batch: pa.Table) -> pa.Table:
        keypoints, unreadable = [], []
        for frames in batch.column("frames").to_pylist():
            images, good = [], []
            for frame in frames:
                try:
                    images.append(decode(frame))
                    good.append(True)
                except Exception:  # any decoder error: the frame is counted and gets no joints
                    good.append(False)
            joints = self.model(images).reshape(len(images), -1)
            values, it = [], iter(joints)
            for ok in good:
                values.append(next(it).tolist() if ok else None)
            keypoints.append(values)
            unreadable.append(len(good) - sum(good))
        return pa.table({
            "file": batch.column("file"), "key": batch.column("key"),
            "keypoints": pa.array(keypoints, pa.list_(KEYPOINT_TYPE)),
            "unreadable": pa.array(unreadable, pa.int64()),
        })


def _read_rows(batch: dict, filesystem) -> pa.Table:
    """Ray Data task: shard files -> their rows as (file, key, frames)."""
    tables = []
    for file, path, split in zip(batch["file"], batch["path"], batch["split"], strict=True):
        table = pq.read_table(path, columns=[KEYS[split], "frames"], filesystem=filesystem)
        tables.append(pa.table({"file": pa.array([file] * table.num_rows, pa.string()),
                                "key": table.column(KEYS[split]).cast(pa.int64()),
                                "frames": table.column("frames")}))
    return pa.concat_tables(tables)


def _done(manifest: Manifest, model: PoseModel) -> bool:
    return (manifest.pose or {}).get("model", {}).get("sha256") == model.sha256


def estimate_pose(data: PreparedData | str, model: PoseModel, *, workers: int | None = None,
                  num_gpus: float = 0, threads: int = 1, keep_previous: bool = True) -> PoseResult:
    """Add `model`'s joints to every frame of the prepared data set `data` (module docstring): of its
    current version, read again under the prepare lock, since another run may have published one since
    `data` was read. workers: model actors (default: one per GPU with num_gpus, else one per CPU of the
    cluster); num_gpus: GPUs per actor (0: CPU); threads: CPU threads per model call."""
    data = as_prepared(data)
    uri, manifest = data.uri, data.manifest
    if _done(manifest, model):
        logger.info("%s already has joints of %s (version %s); nothing to do", uri, model.name,
                    manifest.version)
        return PoseResult(manifest, reused=True)
    fs, root = data.filesystem(check=True)
    with data.errors(), publish.prepare_lock(fs, root, uri):
        data = data.reread()  # another run may have finished
        manifest = data.manifest
        if _done(manifest, model):
            return PoseResult(manifest, reused=True)
        # damaged input is refused, never rewritten with fresh checksums that would hide the damage
        check_shards(data, SPLITS)
        state = _resume_state(fs, root, manifest, model)
        version, base = state["version"], publish.version_root(root, state["version"])
        current, previous = publish.current_version(fs, root)
        publish.remove_unreferenced(fs, root, keep={current, previous, version})
        _write_state(fs, root, state)
        resumed = len(state["done"])
        if resumed:
            logger.info("resuming version %s: %d of %d shards already have joints", version, resumed,
                        sum(len(files) for files in manifest.files.values()))
        start = time.monotonic()
        frames, unreadable = _run(data, model, fs, base, state, workers, num_gpus, threads,
                                  lambda: _write_state(fs, root, state))
        seconds = time.monotonic() - start
        new = _publish(fs, root, manifest, model, state, version, current)
        fs.rm(posixpath.join(root, RESUME))
        try:
            publish.remove_unreferenced(fs, root, keep={version, current if keep_previous else None})
        except Exception as error:  # published: what is left goes next time
            logger.warning("published %s, but could not remove older versions (%s)", uri, error)
    logger.info("wrote %s version %s: joints of %s; unreadable frames %s", uri, version, model.name,
                new.pose["unreadable_frames"])
    return PoseResult(new, reused=False, resumed_shards=resumed, frames=frames, unreadable=unreadable,
                      seconds=seconds)


def _resume_state(fs, root: str, manifest: Manifest, model: PoseModel) -> dict:
    """The progress of an interrupted run of this model over this version, else a fresh one."""
    try:
        state = json.loads(fs.cat_file(posixpath.join(root, RESUME)))
        base = publish.version_root(root, state["version"])
        if (state.get("base") == manifest.version and state.get("model") == model.sha256
                and fs.exists(base) and not fs.exists(posixpath.join(base, MANIFEST))):
            state["done"] = {k: v for k, v in state["done"].items()  # only shards still whole
                             if fs.exists(posixpath.join(base, k)) and fs.size(posixpath.join(base, k)) == v[
                                 "file"]["bytes"]}
            return state
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("%s is unreadable (%r); starting afresh", RESUME, error)
    return {"version": publish.new_version(), "base": manifest.version, "model": model.sha256, "done": {}}


def _write_state(fs, root: str, state: dict) -> None:
    body = json.dumps(state, indent=1).encode()
    path = posixpath.join(root, RESUME)
    storage.put_atomic(fs, path, body, fsync=True)


def _run(data: PreparedData, model: PoseModel, fs, base: str, state: dict, workers: int | None,
         num_gpus: float, threads: int, save) -> tuple[dict, dict]:
    """Run the model over every shard not yet done, writing each as its last row comes back."""
    manifest = data.manifest
    pending = [{"split": split, "file": entry.path, "path": path}
               for split in SPLITS
               for entry, path in zip(manifest.files[split], manifest.paths(split), strict=True)
               if entry.path not in state["done"]]
    frames = {split: 0 for split in SPLITS}
    unreadable = {split: 0 for split in SPLITS}
    if not pending:
        return frames, unreadable
    rows = {entry.path: entry.rows for split in SPLITS for entry in manifest.files[split]}
    sizes = {entry.path: entry.bytes / 2**20 for split in SPLITS for entry in manifest.files[split]}
    # one line per shard written: the job's log under `ray job submit`, where no progress bar is drawn
    progress = Progress("pose", sum(sizes[item["file"]] for item in pending), "MiB of shards")
    source = {item["file"]: item for item in pending}
    if workers is None:
        resources = ray.cluster_resources()
        # on CPU, one CPU is left to the read tasks that feed the actors: a pool holding every CPU starves its
        # own input (the rehearsal's 8-CPU cluster hung with 8 one-CPU actors and its reads "infeasible")
        per_actor = (resources.get("GPU", 0) / num_gpus if num_gpus
                     else max(1.0, resources.get("CPU", 1) - 1) / threads)
        workers = max(1, int(per_actor))
    ds = ray.data.from_items(pending, override_num_blocks=len(pending))
    ds = ds.map_batches(_read_rows, batch_size=1, batch_format="numpy",
                        fn_kwargs={"filesystem": data.read_filesystem()}, **task_options())
    ds = ds.map_batches(PoseEstimator, batch_size=_ROWS_PER_BATCH, batch_format="pyarrow",
                        fn_constructor_kwargs={"model": model, "threads": threads, "use_gpu": num_gpus > 0},
                        # every actor decodes and letterboxes its frames on `threads` CPUs, GPU or not
                        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
                        num_gpus=num_gpus or None, **actor_options())
    # shard -> row key -> (joints, unreadable frames): a row that arrives again replaces itself
    results: dict[str, dict[int, tuple[pa.Array, int]]] = {}
    written = 0
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            columns = (batch.column("file").to_pylist(), batch.column("key").to_pylist(),
                       batch.column("keypoints"), batch.column("unreadable").to_pylist())
            for file, key, keypoints, count in zip(*columns, strict=True):
                if file in state["done"]:  # written already: a row computed again after lost work
                    continue
                results.setdefault(file, {})[key] = (keypoints.values, count)
                if len(results[file]) == rows[file]:
                    split, joints = source[file]["split"], results.pop(file)
                    entry, n = _write_shard(fs, base, source[file], {k: v for k, (v, _) in joints.items()})
                    bad = sum(c for _, c in joints.values())
                    frames[split] += n
                    unreadable[split] += bad
                    state["done"][file] = {"file": vars(entry), "frames": n, "unreadable": bad}
                    save()
                    written += 1
                    progress.step(sizes[file], note=f"shard {written} of {len(pending)} ({n:,} frames), ",
                                  force=True)
    except LOST as error:
        left = sorted(item["file"] for item in pending if item["file"] not in state["done"])
        raise work_lost("pose estimation", f"shards not written: {', '.join(left)}; the {len(state['done'])} "
                        f"written are kept ({RESUME}): run again to do the rest", error) from error
    if results:
        raise RuntimeError(f"the pose stage returned no rows for part of {sorted(results)}")
    return frames, unreadable


def _write_shard(fs, base: str, item: dict, joints: dict[int, pa.Array]) -> tuple[ShardFile, int]:
    """The shard with its keypoints column replaced by the model's, into the new version folder."""
    split, relative = item["split"], item["file"]
    with fs.open(item["path"], "rb") as fh:
        table = pq.read_table(fh)
    keys = table.column(KEYS[split]).to_pylist()
    lists = pa.array([joints[k].to_pylist() for k in keys], pa.list_(KEYPOINT_TYPE))
    table = table.set_column(table.schema.get_field_index("keypoints"), "keypoints", lists)
    table = table.cast(SCHEMAS[split])
    part = PartWriter(fs, posixpath.join(base, relative), relative, SCHEMAS[split])
    try:
        part.writer.write_table(table, row_group_size=max(1, table.num_rows))
        part.rows = table.num_rows
        entry = part.close()
    except BaseException:
        part.abort()
        raise
    return entry, int(np.sum([len(v) for v in lists.to_pylist()]))


def _publish(fs, root: str, manifest: Manifest, model: PoseModel, state: dict, version: str,
             current: str | None) -> Manifest:
    done = state["done"]
    counts = json.loads(json.dumps(manifest.counts))
    unreadable = {}
    for split in SPLITS:
        entries = [done[f.path] for f in manifest.files[split]]
        unreadable[split] = sum(e["unreadable"] for e in entries)
        counts[split]["frames_with_keypoints"] = sum(e["frames"] for e in entries) - unreadable[split]
        counts[split]["pose_unreadable_frames"] = unreadable[split]
    base = publish.version_root(root, version)
    new = Manifest(
        schema_version=manifest.schema_version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=manifest.source,
        target_file_bytes=manifest.target_file_bytes,
        counts=counts,
        files={split: [ShardFile(**done[f.path]["file"]) for f in manifest.files[split]]
               for split in SPLITS},
        bad_frames=manifest.bad_frames,
        dataset=manifest.dataset,  # what the data set is and its protocol: unchanged by the joints
        pose={"model": model.describe(), "from_version": manifest.version, "unreadable_frames": unreadable,
              "joints": "stal_ray.core.skeleton.JOINT_NAMES, (x, y, confidence) in frame pixels",
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        uri=manifest.uri, version=version, _root=base,
    )
    fs.pipe_file(new.manifest_path, new.to_json().encode())
    publish.swap_pointer(fs, root, version, previous=current)
    return new
