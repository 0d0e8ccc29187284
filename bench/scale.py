"""Benchmark: MARS at 1/16, 1/4 and (--full) full size on one machine: how each stage's cost grows.

The release has exactly the structure of the real MARS index (tests/data/mars_info: the same tracklet
lengths, identities, cameras, junk and distractor tracklets, queries), scaled by keeping every k-th training
identity, every k-th test identity with all its tracklets, every k-th junk and distractor tracklet and the
queries among the kept tracklets (k = 16, 4, 1: the full size is the real index, 1980 queries). Its frames
are 256x128 JPEGs of MARS's size (bench/mars_frames.py, ~11.5 KiB) from a pool of distinct rendered frames,
hard-linked into place so that generation is not what is timed (frame i of the name list is pool frame
i mod pool size, so neighbouring frames differ).

Per size, each stage runs in its own process (its peak RSS is its own) under /tmp/ray-study.lock (--lock),
taken per stage and released in between so that other long runs get turns:

* prepare: write_shards(read_mars(release)) as jobs/prepare_mars.py does (one process, reading threads):
  wall and CPU time, bytes read and written (/proc/self/io rchar, wchar), peak RSS.
* epoch: one epoch of the training stream (training_dataset -> training_batches, uint8 clips, 256x128 as
  ResNet-50's input, P=8 K=4 T=8, 2 decoding tasks) over countfile:// (bench/data.py), so every byte read
  is counted: frames/s, frames per CPU-second of all processes, training bytes read per byte stored, bytes
  of the blocks handed to the consumer per frame (what crossed the object store to it) and the peak of what
  the consumer keeps alive of them (bench/data.py's Delivered: decoded blocks);
* epoch_consumer: the same epoch with data.decode_at = consumer (JPEG bytes through the stream, decoded by 2
  threads in this process, data.consumer): the same figures, against the same reference (the consumer's
  pinned bytes are the JPEG groups it holds).
* eval: the whole test split through evaluation_dataset and the tiny model at its own 64x32 input (libjpeg
  decodes at 1/4 scale; 1 actor, 1 CPU): extraction frames/s;
  then the query x gallery distance (Eq. 8, stal mode) and the ranking (CMC, mAP) timed apart.

Peak memory: the stage's driver (ru_maxrss) and, for Ray stages, the largest RSS and private RSS (RSS less
shared pages, i.e. without the object store's mapped pages) of any Ray worker process, sampled every 0.2 s.
The reference, measured in the same run on the same pool frames: one process decoding them with
data.images.decode_frames to 256x128 (frames per CPU-second).

    python bench/scale.py                 # 1/16 and 1/4
    python bench/scale.py --full          # and the full size (~1.19M frames, ~14 GB of shards)
"""

import argparse
import contextlib
import fcntl
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import scipy.io

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.data import READ_LOG, CpuMeter, _title  # noqa: E402
from bench.mars_frames import frame_pool  # noqa: E402
from stal_ray.data.releases import mars  # noqa: E402
from stal_ray.data.stream.images import decode_frames  # noqa: E402

MARS_INFO = REPO / "tests" / "data" / "mars_info"
HEIGHT, WIDTH, SEQ_LEN, P, K = 256, 128, 8, 8, 4
# the tiny model's own input (configs/synthetic_tiny.yaml): at 256x128 its CPU forward, not decoding or the
# stream, would be what the evaluation times (~20 frames/s on the shared 2-core machine)
EVAL_HEIGHT, EVAL_WIDTH = 64, 32


# ------------------------------------------------------------------------------------------- the release

def scaled_index(every: int) -> dict:
    """Track tables (first, last, identity, camera; 1-based rows in name-list order) and 1-based query rows
    of the real MARS index, keeping every `every`-th identity (and junk/distractor tracklet)."""
    out, rows = {}, {}
    for split, (table_file, variable) in mars.TRACK_TABLES.items():
        table = scipy.io.loadmat(MARS_INFO / Path(table_file).name)[variable].astype(np.int64)
        identity, rows[split] = table[:, 2], len(table)
        people = np.unique(identity[identity > 0])[::every]
        noise_rows = np.flatnonzero(identity <= 0)[::every]
        keep = np.sort(np.concatenate([np.flatnonzero(np.isin(identity, people)), noise_rows]))
        lengths = table[keep, 1] - table[keep, 0] + 1
        last = np.cumsum(lengths)
        out[split] = (keep, np.stack([last - lengths + 1, last, identity[keep], table[keep, 3]], axis=1))
    queries = scipy.io.loadmat(MARS_INFO / Path(mars.QUERY_FILE).name)[mars.QUERY_VARIABLE].ravel() - 1
    new_row = np.full(rows["test"], -1)  # old test row -> new one, -1 when left out
    new_row[out["test"][0]] = np.arange(len(out["test"][0]))
    queries = new_row[queries]
    return {"train": out["train"][1], "test": out["test"][1], "queries": np.sort(queries[queries >= 0]) + 1}


def write_release(root: Path, index: dict, pool: list[Path]) -> dict:
    """The MARS layout under `root` (info/ and bbox_*/), every frame a hard link to a pool frame."""
    (root / "info").mkdir(parents=True)
    frame = 0
    for split in ("train", "test"):
        table = index[split]
        names, tracklet_of = [], {}
        for first, last, identity, camera in table.tolist():
            tracklet_of[identity] = tracklet_of.get(identity, 0) + 1
            folder = "00-1" if identity == mars.JUNK else f"{identity:04d}"
            prefix = f"{folder}C{camera}T{tracklet_of[identity]:04d}F"
            directory = root / f"bbox_{split}" / folder
            directory.mkdir(parents=True, exist_ok=True)
            for number in range(1, last - first + 2):
                name = f"{prefix}{number:03d}.jpg"
                os.link(pool[frame % len(pool)], directory / name)
                names.append(name)
                frame += 1
        (root / mars.NAME_LISTS[split]).write_text("".join(f"{name}\n" for name in names))
        table_file, variable = mars.TRACK_TABLES[split]
        scipy.io.savemat(root / table_file, {variable: table.astype(np.int32)})
    scipy.io.savemat(root / mars.QUERY_FILE, {mars.QUERY_VARIABLE: index["queries"].astype(np.uint16)[None]})
    return {"train_tracklets": len(index["train"]), "test_tracklets": len(index["test"]),
            "queries": len(index["queries"]), "train_frames": int(index["train"][-1, 1]),
            "test_frames": int(index["test"][-1, 1]), "frames": frame}


def write_pool(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = sorted(folder.glob("*.jpg"))
    if len(paths) >= count:
        return paths[:count]
    for path in paths:
        path.unlink()
    paths = []
    for number, data in enumerate(frame_pool(count)):
        paths.append(folder / f"{number:05d}.jpg")
        paths[-1].write_bytes(data)
    return paths


# ------------------------------------------------------------------------------------- memory sampling

class PeakMemory:
    """Largest RSS and private RSS (RSS less shared pages) of any Ray worker process under this one, and of
    all processes under it together, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.2):
        self.me, self.interval = psutil.Process(), interval
        self.worker_rss = self.worker_private = self.total_rss = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            total = 0
            for child in self.me.children(recursive=True):
                try:
                    info = child.memory_info()
                except psutil.Error:
                    continue
                total += info.rss
                if (_title(child.pid) or "").startswith("ray::"):
                    self.worker_rss = max(self.worker_rss, info.rss)
                    self.worker_private = max(self.worker_private, info.rss - info.shared)
            self.total_rss = max(self.total_rss, total)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def result(self) -> dict:
        return {"worker_peak_rss_mb": self.worker_rss / 2**20,
                "worker_peak_private_mb": self.worker_private / 2**20,
                "children_peak_rss_mb": self.total_rss / 2**20}


def _driver_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _io() -> dict:
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh)}


# ---------------------------------------------------------------------------------------------- stages

def stage_prepare(args) -> dict:
    from stal_ray.data.prepared.shards import write_shards
    from stal_ray.data.releases.mars import read_mars

    before, wall, cpu = _io(), time.perf_counter(), time.process_time()
    manifest = write_shards(read_mars(args.release), args.shards, progress=False)
    wall, cpu, after = time.perf_counter() - wall, time.process_time() - cpu, _io()
    stored = {split: sum(f.bytes for f in files) for split, files in manifest.files.items()}
    return {"wall_s": wall, "cpu_s": cpu, "bytes_read": after["rchar"] - before["rchar"],
            "bytes_written": after["wchar"] - before["wchar"], "stored_bytes": stored,
            "files": {split: len(files) for split, files in manifest.files.items()},
            "counts": manifest.counts, "driver_peak_rss_mb": _driver_peak_mb()}


def _config(height: int = HEIGHT, width: int = WIDTH, decode_at: str = "stream"):
    from stal_ray.config import load_config

    return load_config(str(REPO / "configs" / "synthetic_tiny.yaml"), [
        f"data.height={height}", f"data.width={width}", f"data.seq_len={SEQ_LEN}",
        f"data.identities_per_batch={P}", f"data.clips_per_identity={K}", "data.decode_concurrency=2",
        "model.pose_source=learned", f"data.decode_at={decode_at}"])


def _ray_init(args, log: str) -> None:
    import importlib

    import fsspec
    import ray

    counting = importlib.import_module("bench.data").CountingFileSystem
    fsspec.register_implementation("countfile", counting, clobber=True)
    os.environ[READ_LOG] = log
    open(log, "w").close()
    ray.init(address="local", num_cpus=args.num_cpus, object_store_memory=args.object_store_mb << 20,
             include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), READ_LOG: log}})
    ray.data.DataContext.get_current().enable_progress_bars = False


def _bytes_read(log: str, paths: list[str]) -> int:
    wanted, total = set(paths), 0
    with open(log) as fh:
        for line in fh:
            n, path = line.rstrip("\n").split("\t", 1)
            total += int(n) if path in wanted else 0
    return total


def stage_epoch(args, decode_at: str = "stream") -> dict:
    """One epoch of the training stream with data.decode_at = `decode_at` (bench/data.py's pipeline_epoch:
    the consumer decodes with 2 threads where the stream has 2 decoding tasks)."""
    import ray

    from bench.data import pipeline_epoch
    from stal_ray.data.prepared.manifest import read_manifest

    config = _config(decode_at=decode_at)
    log = str(Path(args.shards).parent / f"reads-epoch-{decode_at}.log")
    _ray_init(args, log)
    try:
        with PeakMemory() as memory:
            run = pipeline_epoch("countfile://" + args.shards, config, epoch=0, normalize=False)
    finally:
        ray.shutdown()
    manifest = read_manifest(args.shards)
    paths, stored = manifest.paths("train"), sum(f.bytes for f in manifest.files["train"])
    frames, wall, cpu = run["frames"], run["wall_s"], run["cpu_s"]
    return {"decode_at": decode_at, "frames": frames, "wall_s": wall, "cpu_s": cpu,
            "driver_cpu_s": run["driver_cpu_s"], "frames_per_s": frames / wall,
            "frames_per_core_s": frames / cpu,
            "train_bytes_read": _bytes_read(log, paths), "stored_bytes": stored,
            "read_per_stored": _bytes_read(log, paths) / stored,
            "delivered_bytes_per_frame": run["delivered_bytes"] / frames,
            "pinned_peak_mb": run["pinned_peak_bytes"] / 2**20,
            "cpu_by_process": dict(sorted(run["cpu_by_process"].items(), key=lambda kv: -kv[1])[:6]),
            "driver_peak_rss_mb": _driver_peak_mb(), **memory.result()}


def stage_epoch_consumer(args) -> dict:
    return stage_epoch(args, "consumer")


def stage_eval(args) -> dict:
    import ray
    import torch

    from stal_ray.data.prepared.manifest import read_manifest
    from stal_ray.data.stream.pipeline import evaluation_dataset
    from stal_ray.evaluate.distance import branch_distances, fuse
    from stal_ray.evaluate.features import extract_features
    from stal_ray.evaluate.ranking import ap_rule, evaluate_ranking, query_gallery_split
    from stal_ray.model.export import save_model
    from stal_ray.model.stal import STAL

    config = _config(EVAL_HEIGHT, EVAL_WIDTH)
    torch.manual_seed(0)
    model_path = str(Path(args.shards).parent / "tiny-model.pt")
    save_model(model_path, STAL.from_config(config, num_classes=625), config, num_classes=625)
    log = str(Path(args.shards).parent / "reads-eval.log")
    _ray_init(args, log)
    try:
        with CpuMeter() as meter, PeakMemory() as memory:
            baseline, start = meter.snapshot(), time.perf_counter()
            dataset = evaluation_dataset("countfile://" + args.shards, config)
            features = extract_features(dataset, model_path, batch_size=config.eval.batch_size,
                                        use_gpu=False, concurrency=1, num_cpus=1)
            extract_wall = time.perf_counter() - start
            cpu, kinds = meter.since(baseline), meter.by_kind(baseline)
        extraction_memory, extraction_driver = memory.result(), _driver_peak_mb()
    finally:
        ray.shutdown()
    frames = int(features.num_frames.sum())
    start = time.perf_counter()
    query_index, gallery_index = query_gallery_split(features.identity, features.camera, features.is_query,
                                                     config.eval.protocol)
    query, gallery = features.features[query_index], features.features[gallery_index]
    d_l, d_g = branch_distances(query, gallery, "stal", part_norm=config.model.part_norm)
    distance = fuse(d_l, d_g, "stal", config.eval.fusion_rate)
    distance_s = time.perf_counter() - start
    start = time.perf_counter()
    result = evaluate_ranking(distance, features.identity[query_index], features.identity[gallery_index],
                              features.camera[query_index], features.camera[gallery_index],
                              ranks=tuple(config.eval.ranks), ap=ap_rule(config.eval.protocol))
    ranking_s = time.perf_counter() - start
    manifest = read_manifest(args.shards)
    paths, stored = manifest.paths("test"), sum(f.bytes for f in manifest.files["test"])
    return {"tracklets": len(features), "frames": frames, "extract_wall_s": extract_wall,
            "extract_cpu_s": cpu, "extract_frames_per_s": frames / extract_wall,
            "extract_frames_per_core_s": frames / cpu,
            "cpu_by_process": dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:6]),
            "queries": len(query_index), "gallery": len(gallery_index),
            "distance_matrix_mb": distance.numel() * distance.element_size() / 2**20,
            "distance_s": distance_s, "ranking_s": ranking_s, "mAP": float(result.mAP),
            "test_bytes_read": _bytes_read(log, paths), "stored_bytes": stored,
            "extract_driver_peak_rss_mb": extraction_driver, "driver_peak_rss_mb": _driver_peak_mb(),
            **extraction_memory}


STAGES = {"prepare": stage_prepare, "epoch": stage_epoch, "epoch_consumer": stage_epoch_consumer,
          "eval": stage_eval}


def run_stage(name: str, args, release: Path, shards: Path) -> dict:
    command = [sys.executable, __file__, "--stage", name, "--release", str(release), "--shards", str(shards),
               "--num-cpus", str(args.num_cpus), "--object-store-mb", str(args.object_store_mb)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"stage {name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------- what the stream's consumer holds

def held_groups(every: int, max_groups: int | None) -> dict:
    """The memory the training stream's consumer (data.batches.TrainingBatches) pins at the peak, simulated
    on the scaled index with the real class: each identity's groups (sampling.identity_groups: about
    frames/(K*T), enough for every tracklet, at most `max_groups`, data.max_groups_per_identity) arrive
    together, as one shard row expands into all of them, identities in random order, cut into blocks of
    decode_batch_size groups as the decoding tasks cut them. A group the consumer holds (its shuffle buffer,
    a group waiting for a batch without its identity, the batch being filled) is a view into its block, so a
    block lives while any of its groups is held: the peak of live blocks times a block's bytes is what the
    consumer pins. No frames: a group here is a placeholder of the real one's metadata."""
    import weakref

    from stal_ray.data.stream import batches as stream
    from stal_ray.data.stream.pipeline import decode_batch_size

    table = scaled_index(every)["train"]
    identities, inverse = np.unique(table[:, 2], return_inverse=True)
    frames = np.bincount(inverse, weights=table[:, 1] - table[:, 0] + 1)
    tracklets = np.bincount(inverse)
    groups = np.maximum(np.maximum(1, np.round(frames / (K * SEQ_LEN))), np.ceil(tracklets / K)).astype(int)
    if max_groups is not None:
        groups = np.minimum(groups, max_groups)
    order = np.random.default_rng(0).permutation(len(identities))
    arrivals = np.concatenate([np.full(groups[i], i) for i in order])
    rows = decode_batch_size(_config().data, (K, SEQ_LEN))
    live, peak_live = 0, 0

    def released():
        nonlocal live
        live -= 1

    class Source:
        def iter_batches(self, **_):
            nonlocal live, peak_live
            for start in range(0, len(arrivals), rows):
                index = arrivals[start:start + rows]
                n = len(index)
                clips = np.zeros((n, 1, 1, 1, 1, 3), np.uint8)  # the block's one array: groups are views
                weakref.finalize(clips, released)
                live += 1
                peak_live = max(peak_live, live)
                keypoints = np.zeros((n, 1, 1, 14, 3), np.float32)
                yield {"label": index, "identity": identities[index], "corrupt_frames": np.zeros(n, np.int64),
                       "clips": clips, "tracklets": np.zeros((n, 1), np.int32),
                       "has_keypoints": np.zeros(n, bool), "keypoints": keypoints}

    batches = stream.training_batches(Source(), P, seed=0, drop_last=False, normalize=False)
    count = sum(1 for _ in batches)
    block_mb = rows * K * SEQ_LEN * HEIGHT * WIDTH * 3 / 2**20
    return {"groups": int(groups.sum()), "batches": count, "full_batches_possible": int(groups.sum()) // P,
            "peak_live_blocks": peak_live,
            "peak_pinned_mb": peak_live * block_mb, "largest_identity_groups": int(groups.max())}


# ------------------------------------------------------------------------------------------------ main

def reference(pool: list[Path]) -> dict:
    """Frames per CPU-second of one process decoding the pool's frames to 256x128 (median of 3)."""
    data = [path.read_bytes() for path in pool]
    rates, out = [], np.empty((len(data), HEIGHT, WIDTH, 3), np.uint8)  # reused, as the decoding tasks do
    for _ in range(3):
        start = time.process_time()
        _, ok = decode_frames(data, HEIGHT, WIDTH, out=out)
        rates.append(len(data) / (time.process_time() - start))
    assert ok.all()
    return {"frames_per_core_s": float(np.median(rates)), "frames": len(data),
            "mean_jpeg_kib": float(np.mean([len(d) for d in data]) / 1024)}


@contextlib.contextmanager
def _held(lock_path: str | None):
    """An exclusive flock on lock_path for the block (none when None): heavy jobs on a shared machine take
    turns."""
    if lock_path is None:
        yield
        return
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def measure_size(every: int, args, workdir: Path, pool: list[Path], save) -> dict:
    release, shards = workdir / f"release-1of{every}", workdir / f"shards-1of{every}"
    shutil.rmtree(release, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    started = time.perf_counter()
    sizes = write_release(release, scaled_index(every), pool)
    print(f"1/{every}: release of {sizes['frames']} frames linked in {time.perf_counter() - started:.0f} s",
          flush=True)
    cap = _config().data.max_groups_per_identity
    row = {"every": every, "release": sizes, "held": held_groups(every, cap),
           "held_uncapped": held_groups(every, None)}
    for stage in ("reference", "prepare", "epoch", "epoch_consumer", "eval"):
        if stage in args.skip:
            continue
        with _held(args.small_lock if args.small_lock and every >= 16 else args.lock):
            # per stage: other runs get turns in between (the shards stay, and nothing else writes there)
            started = time.perf_counter()
            row[stage] = reference(pool) if stage == "reference" else run_stage(stage, args, release, shards)
            print(f"1/{every}: {stage} done in {time.perf_counter() - started:.0f} s", flush=True)
            save(row)  # after every stage: a later failure or interruption keeps the rest
    if not args.keep:
        shutil.rmtree(release, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
    return row


def _get(row: dict, path: str):
    value = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


# (label, path in a row, format); growth is the ratio of consecutive sizes
FIGURES = [
    ("frames (train + test)", "release.frames", "{:.0f}"),
    ("prepare wall s", "prepare.wall_s", "{:.1f}"),
    ("prepare CPU s", "prepare.cpu_s", "{:.1f}"),
    ("prepare GB read", "prepare.gb_read", "{:.2f}"),
    ("prepare GB written", "prepare.gb_written", "{:.2f}"),
    ("prepare peak RSS MB", "prepare.driver_peak_rss_mb", "{:.0f}"),
    ("epoch frames", "epoch.frames", "{:.0f}"),
    ("epoch wall s", "epoch.wall_s", "{:.1f}"),
    ("epoch frames/s", "epoch.frames_per_s", "{:.0f}"),
    ("epoch frames/core-s", "epoch.frames_per_core_s", "{:.0f}"),
    ("epoch of reference", "epoch.of_reference", "{:.0%}"),
    ("epoch read/stored", "epoch.read_per_stored", "{:.2f}"),
    ("epoch B/frame to consumer", "epoch.delivered_bytes_per_frame", "{:.0f}"),
    ("epoch pinned MB (measured)", "epoch.pinned_peak_mb", "{:.0f}"),
    ("epoch driver RSS MB", "epoch.driver_peak_rss_mb", "{:.0f}"),
    ("stream pinned blocks*", "held.peak_live_blocks", "{:.0f}"),
    ("stream pinned MB*", "held.peak_pinned_mb", "{:.0f}"),
    ("  uncapped: pinned blocks*", "held_uncapped.peak_live_blocks", "{:.0f}"),
    ("  uncapped: pinned MB*", "held_uncapped.peak_pinned_mb", "{:.0f}"),
    ("epoch worker RSS MB", "epoch.worker_peak_rss_mb", "{:.0f}"),
    ("epoch worker private MB", "epoch.worker_peak_private_mb", "{:.0f}"),
    ("consumer: epoch wall s", "epoch_consumer.wall_s", "{:.1f}"),
    ("consumer: frames/s", "epoch_consumer.frames_per_s", "{:.0f}"),
    ("consumer: frames/core-s", "epoch_consumer.frames_per_core_s", "{:.0f}"),
    ("consumer: of reference", "epoch_consumer.of_reference", "{:.0%}"),
    ("consumer: read/stored", "epoch_consumer.read_per_stored", "{:.2f}"),
    ("consumer: B/frame", "epoch_consumer.delivered_bytes_per_frame", "{:.0f}"),
    ("consumer: pinned MB", "epoch_consumer.pinned_peak_mb", "{:.0f}"),
    ("consumer: driver RSS MB", "epoch_consumer.driver_peak_rss_mb", "{:.0f}"),
    ("consumer: worker RSS MB", "epoch_consumer.worker_peak_rss_mb", "{:.0f}"),
    ("eval frames", "eval.frames", "{:.0f}"),
    ("eval extract wall s", "eval.extract_wall_s", "{:.1f}"),
    ("eval extract frames/s", "eval.extract_frames_per_s", "{:.0f}"),
    ("eval frames/core-s", "eval.extract_frames_per_core_s", "{:.0f}"),
    ("eval queries x gallery", "eval.shape", "{}"),
    ("eval distance s", "eval.distance_s", "{:.2f}"),
    ("eval ranking s", "eval.ranking_s", "{:.2f}"),
    ("eval distance MB", "eval.distance_matrix_mb", "{:.1f}"),
    ("eval driver RSS MB", "eval.driver_peak_rss_mb", "{:.0f}"),
    ("eval extract driver MB", "eval.extract_driver_peak_rss_mb", "{:.0f}"),
    ("eval worker RSS MB", "eval.worker_peak_rss_mb", "{:.0f}"),
    ("eval worker private MB", "eval.worker_peak_private_mb", "{:.0f}"),
    ("reference frames/core-s", "reference.frames_per_core_s", "{:.0f}"),
]


def derive(row: dict) -> None:
    if "prepare" in row and "bytes_read" in row["prepare"]:
        row["prepare"]["gb_read"] = row["prepare"]["bytes_read"] / 1e9
        row["prepare"]["gb_written"] = row["prepare"]["bytes_written"] / 1e9
    for epoch in ("epoch", "epoch_consumer"):
        if epoch in row and "reference" in row:
            row[epoch]["of_reference"] = (row[epoch]["frames_per_core_s"]
                                          / row["reference"]["frames_per_core_s"])
    if "eval" in row:
        row["eval"]["shape"] = f"{row['eval']['queries']}x{row['eval']['gallery']}"


def table(rows: list[dict]) -> str:
    heads = [f"1/{row['every']}" for row in rows]
    growth = [f"x{rows[i]['every'] // rows[i + 1]['every']} growth" for i in range(len(rows) - 1)]
    lines = [f"{'':<26}" + "".join(f"{h:>12}" for h in heads) + "".join(f"{g:>14}" for g in growth)]
    for label, path, fmt in FIGURES:
        values = [_get(row, path) for row in rows]
        cells = [fmt.format(v) if v is not None else "-" for v in values]
        ratios = []
        for a, b in zip(values, values[1:], strict=False):
            ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and a
            ratios.append(f"{b / a:.2f}" if ok else "-")
        lines.append(f"{label:<26}" + "".join(f"{c:>12}" for c in cells)
                     + "".join(f"{r:>14}" for r in ratios))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also the full size (~1.19M frames)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 4],
                        help="keep every k-th identity, for each k (default: 16 4; --full adds 1)")
    parser.add_argument("--pool", type=int, default=2048, help="distinct frames in the pool")
    parser.add_argument("--workdir", default="/tmp/scale-work", help="release, shards (removed per size)")
    parser.add_argument("--keep", action="store_true", help="keep each size's release and shards")
    parser.add_argument("--skip", nargs="*", default=[], choices=["reference", *sorted(STAGES)],
                        help="stages not run")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to ray.init")
    # 2 GiB as bench/data.py: the stream's consumer pins about 0.9 GB of blocks at the peak (held_groups),
    # and with 1 GiB the epoch spills and restores (full size: 116.7 s and 35% of the reference, against
    # 68.3 s and 46% at 2 GiB); Ray's default, 30% of the machine's memory, is larger still
    parser.add_argument("--object-store-mb", type=int, default=2048, help="Ray object store size")
    parser.add_argument("--lock", default=None, metavar="FILE",
                        help="a file flocked per stage, so other heavy jobs on a shared machine take turns")
    parser.add_argument("--small-lock", default=None,
                        help="held instead for sizes of 1/16 and below, whose stages take under ~3 minutes "
                             "each (e.g. /tmp/ray-heavy.lock, the short runs' lock)")
    parser.add_argument("--out", default="bench/results/scale.json")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--release", help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:  # a child process: one stage, its JSON on the last line
        print(json.dumps(STAGES[args.stage](args)))
        return

    workdir = Path(args.workdir)
    pool = write_pool(workdir / "pool", args.pool)
    sizes = sorted(set(args.sizes + ([1] if args.full else [])), reverse=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("stage", "release", "shards")},
              "reference": "data.images.decode_frames to 256x128 on the pool, one process",
              "cores_here": psutil.cpu_count(), "rows": rows}

    def save(row: dict) -> None:
        derive(row)
        out.write_text(json.dumps({**result, "rows": [*rows, row]}, indent=2))

    for every in sizes:
        rows.append(measure_size(every, args, workdir, pool, save))
        derive(rows[-1])
    print(f"MARS structure at {', '.join(f'1/{k}' for k in sizes)}; {len(pool)} distinct 256x128 frames "
          f"({rows[0]['reference']['mean_jpeg_kib']:.1f} KiB mean); decoded to {HEIGHT}x{WIDTH}, "
          f"T={SEQ_LEN}; ray num_cpus={args.num_cpus}, {psutil.cpu_count()} cores here")
    print(table(rows))
    cap = _config().data.max_groups_per_identity
    full, uncapped = held_groups(1, cap), held_groups(1, None)
    print(f"* simulated on the index (held_groups), no frames; at full MARS with "
          f"data.max_groups_per_identity = {cap}: at the peak {full['peak_live_blocks']} blocks pinned "
          f"({full['peak_pinned_mb'] / 1024:.2f} GiB of 256x128 clips), {full['batches']} batches for "
          f"{full['groups']} groups ({full['full_batches_possible']} full ones possible); uncapped: "
          f"{uncapped['peak_live_blocks']} blocks ({uncapped['peak_pinned_mb'] / 1024:.2f} GiB; the largest "
          f"identity has {uncapped['largest_identity_groups']} groups), {uncapped['batches']} batches for "
          f"{uncapped['groups']} groups ({uncapped['full_batches_possible']} full ones possible)")
    result["held_full"], result["held_full_uncapped"] = full, uncapped
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
