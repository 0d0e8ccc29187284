"""Benchmark: the Ray Data training stream against a bare decoding loop (frames/s per core), and bytes read.

(a) Throughput. Epochs of training_dataset -> training_batches on a local Ray (decode_concurrency = N tasks),
counting the frames delivered (clips x T), against one process that only decodes and resizes the same JPEG
frames with data.images.decode_frames, the fastest decoder measured (libjpeg-turbo through simplejpeg,
bench/decode.py; the bilinear resize to 224x224 is PIL's and costs more than decoding, so --height 256 --width
128, ResNet-50's input, is the decoder-bound case): the frames the epoch samples, found by running the
pipeline's own sampling on the stored rows (bytes in memory before the clock starts). Cores used = CPU seconds
over wall seconds: the pipeline's summed over this process and every Ray process it started (read from /proc
every 0.05 s, so a process that exits is counted up to its last reading: see CpuMeter), the bare loop's from
its own process time. Frames per core = frames per CPU-second. Each measurement is run --repeats times and the
run of median CPU time is reported.
Each epoch also pays a constant (planning, first reads, the pipeline filling) that a MARS epoch of
~500k frames amortises and this small data set cannot, so an epoch over P identities only (exclude_identities)
is timed as well and the goal is on the marginal cost, full epoch minus that one. The goal compares like with
like: uint8 clips (training_batches(normalize=False)), as the bare loop delivers; the default float clips,
normalised on the CPU of the consuming process, are shown beside it.

The data set is laid out like a prepared MARS, scaled down: MARS's ~4 GB of training JPEGs make ~30 files of
prepare_mars' 128 MiB, each read as 32 MiB blocks of sampled groups (one decoding task each); the 76 MB
here make 3 files of 32 MiB, read the same way. (Files of a few MiB would make every decoding task a
fraction of a MARS one and time Ray's per-task costs as if they were per-frame.) Likewise the object store:
a MARS epoch decodes ~75 GB of 224x224 frames, many times any object store, so within the first minutes of
a run every page of the store is mapped into every decoding worker and writing a block costs a copy. This
data set's epochs decode 1.4 GB; in a store of the default 30% of memory each would land on pages no
worker has touched yet and pay page faults a real run pays once. A 2 GiB store and an untimed full epoch
put the timed epochs in a long run's steady state.

(c) The shard checksums (stal_ray/data/prepared/integrity.py), checked in the driver once per job before the
stream starts: the training split hashed with no cache (the first job on a data set) and from the cache (every
later one), against the same run's training epoch; the test split the same way against one pass of the
evaluation stream (reading and decoding every test frame, without the model, so an upper bound of the
share: evaluation also runs the model).

(b) Bytes read per epoch. One more epoch reads the shards as countfile://<dir>, an fsspec filesystem over
the local one whose open files log every read() and readinto() (bytes returned, file path) to a log file.
The pipeline hands this filesystem object to read_parquet, Ray pickles it into every read task, and the
driver's own reads (manifest, identity column, Parquet footers) go through it too, so the log holds every
byte any process read, through the same FSSpecHandler code path an s3:// data set takes. Goal: bytes read
from the training shards over their stored size <= 1.3.

    python bench/data.py --identities 40 --decode-concurrency 2
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import psutil

REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)

from stal_ray.config import Config, validate  # noqa: E402
from stal_ray.data.prepared.integrity import CACHE_VARIABLE, check_shards  # noqa: E402
from stal_ray.data.prepared.manifest import read_manifest  # noqa: E402
from stal_ray.data.prepared.shards import write_shards  # noqa: E402
from stal_ray.data.releases.mars import read_mars  # noqa: E402
from stal_ray.data.stream import consumer  # noqa: E402
from stal_ray.data.stream.augment import Augmentation  # noqa: E402
from stal_ray.data.stream.batches import training_batches  # noqa: E402
from stal_ray.data.stream.consumer import ConsumerDecoder  # noqa: E402
from stal_ray.data.stream.images import decode_frames  # noqa: E402
from stal_ray.data.stream.pipeline import (  # noqa: E402
    decode_batch_size,
    evaluation_dataset,
    identity_labels,
    training_dataset,
)
from stal_ray.data.synthetic.generator import ensure_synthetic_release  # noqa: E402

THROUGHPUT_GOAL = 0.70  # pipeline frames per core over the bare loop's
CONSUMER_GOAL = 0.80  # the same, decoding at the consumer (data.decode_at = consumer; issue 35)
READ_GOAL = 1.30  # bytes read per epoch over bytes stored
READ_LOG = "STAL_BENCH_READ_LOG"  # where CountingFileSystem logs; set before ray.init so workers inherit it


class CountingFile:
    """A file opened for reading whose reads are logged as '<bytes>\\t<path>' lines."""

    def __init__(self, raw, path: str):
        self.raw, self.path, self.log = raw, path, os.environ[READ_LOG]

    def _count(self, n: int) -> None:
        if n:
            # one short O_APPEND write per read: atomic between processes, so no lock is needed
            with open(self.log, "a") as fh:
                fh.write(f"{n}\t{self.path}\n")

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self._count(len(data))
        return data

    def readinto(self, buffer) -> int:
        n = self.raw.readinto(buffer)
        self._count(n or 0)
        return n

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


class CountingFileSystem(fsspec.AbstractFileSystem):
    """countfile:///path: the local filesystem, every byte read logged (see CountingFile)."""

    protocol = "countfile"
    root_marker = "/"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.local = fsspec.filesystem("file")

    def ls(self, path, detail=True, **kwargs):
        return self.local.ls(path, detail=detail, **kwargs)

    def info(self, path, **kwargs):
        return self.local.info(path, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        if "r" not in mode:
            raise PermissionError(f"{path}: the counting filesystem only reads")
        return CountingFile(self.local.open(path, mode), path)


@dataclass
class Reading:
    """What CpuMeter.snapshot saw: CPU seconds per process (pid 0: minus the sampling's own), and per kind of
    process, each interval counted under the title the process had then (Ray workers rename themselves per
    task: ray::MapBatches(_decode_clips) while decoding, ray::IDLE between tasks)."""

    pids: dict[int, float]
    kinds: dict[str, float]


class CpuMeter:
    """CPU seconds (user + system) of this process and all its descendants, the sampling's own left out.

    The raylet ignores SIGCHLD, so an exited worker's CPU time is not added to any parent's (getrusage
    cannot see it): every process is read from /proc every `interval` seconds instead, and one that exits
    counts up to its last reading. Ray keeps its task workers alive between tasks, so little is lost; new
    processes are looked for every `rescan` seconds.
    """

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, interval: float = 0.05, rescan: float = 0.25):
        self.me, self.interval, self.rescan = psutil.Process(), interval, rescan
        self.pids = {self.me.pid}
        self.last: dict[int, float] = {}
        self.kinds: dict[str, float] = {}
        self.overhead = 0.0
        self.lock = threading.Lock()  # the sampling thread and the main thread both take snapshots
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.scanned = 0.0

    @classmethod
    def _read(cls, pid: int) -> float | None:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:  # exited
            return None
        return (int(fields[11]) + int(fields[12])) / cls.TICK  # utime, stime

    def snapshot(self) -> Reading:
        """CPU seconds of every process seen so far (those that exited: at their last reading), by kind."""
        with self.lock:
            started = time.thread_time()
            if time.monotonic() - self.scanned >= self.rescan:
                self.pids |= {child.pid for child in self.me.children(recursive=True)}
                self.scanned = time.monotonic()
            for pid in list(self.pids):
                seconds = self._read(pid)
                if seconds is None:
                    self.pids.discard(pid)
                    continue
                # since the last reading (a process seen for the first time: all it has used so far), under
                # its title now
                kind = "driver" if pid == self.me.pid else _kind(_title(pid) or "?")
                self.kinds[kind] = self.kinds.get(kind, 0.0) + seconds - self.last.get(pid, 0.0)
                self.last[pid] = seconds
            self.overhead += time.thread_time() - started
            self.last[0] = -self.overhead  # a pseudo-process that takes the sampling's time back out
            return Reading(dict(self.last), dict(self.kinds))

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.snapshot()

    def since(self, baseline: Reading) -> float:
        now = self.snapshot()
        return sum(seconds - baseline.pids.get(pid, 0.0) for pid, seconds in now.pids.items())

    def by_kind(self, baseline: Reading) -> dict[str, float]:
        """CPU seconds since `baseline` per kind of process: this driver, Ray workers by the task they ran
        (ray::IDLE: between tasks), Ray's own daemons."""
        now = self.snapshot()
        kinds = {kind: seconds - baseline.kinds.get(kind, 0.0) for kind, seconds in now.kinds.items()}
        kinds["driver"] = kinds.get("driver", 0.0) + now.pids[0] - baseline.pids.get(0, 0.0)
        return {name: round(seconds, 2) for name, seconds in sorted(kinds.items(), key=lambda kv: -kv[1])}

    def driver(self, baseline: Reading) -> float:
        """CPU seconds of this process alone since `baseline`, sampling left out."""
        now, pid = self.snapshot(), self.me.pid
        return now.pids[pid] - baseline.pids.get(pid, 0.0) + now.pids[0] - baseline.pids.get(0, 0.0)

    def __enter__(self):
        self.snapshot()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _title(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def _kind(title: str) -> str:
    """A process title as a short kind: 'ray::MapWorker(MapBatches(_Decoder))', 'raylet', ..."""
    if title.startswith("ray::"):
        return title.split()[0]
    words = title.split()
    program = next((w for w in words if not w.endswith("python") and not w.startswith("-")), title)
    return os.path.basename(program)[:40]


def prepare(args, workdir: Path) -> tuple[str, dict]:
    release = ensure_synthetic_release(
        str(workdir / "releases"), identities=args.identities, test_identities=2, cameras=4,
        tracklets_per_identity=tuple(args.tracklets), frames_per_tracklet=tuple(args.frames),
        height=args.frame_height, width=args.frame_width, junk_tracklets=0, distractor_tracklets=0)
    shards = str(workdir / "shards")
    manifest = write_shards(read_mars(release), shards, target_file_bytes=int(args.target_file_mb * 2**20),
                            progress=False)
    return shards, manifest.counts["train"]


def sampled_frames(uri: str, config: Config, epoch: int) -> list[list[bytes]]:
    """The JPEG bytes of every decoding call the pipeline makes in `epoch` (groups of decode_batch_size),
    read from the epoch's own stream with data.decode_at = consumer (the same groups, not decoded)."""
    encoded = copy.deepcopy(config)
    encoded.data.decode_at = "consumer"
    groups = [list(map(bytes, row)) for block in training_dataset(uri, encoded, epoch=epoch).iter_batches(
        batch_size=None, batch_format="pyarrow") for row in block.column("frames").to_pylist()]
    size = decode_batch_size(config.data, (config.data.clips_per_identity, config.data.seq_len))
    return [[f for g in groups[i:i + size] for f in g] for i in range(0, len(groups), size)]


def bare_loop(calls: list[list[bytes]], height: int, width: int, config: Config | None = None) -> dict:
    """Decode (and, given a config with augmentation switches on, augment as the pipeline does) every
    call's frames in this process."""
    frames = sum(map(len, calls))
    augment = Augmentation.from_config(config, epoch=0) if config is not None else None
    wall, cpu = time.perf_counter(), time.process_time()
    corrupt = 0
    # decoded into reused arrays, as the pipeline's decoding tasks do: fresh memory would add its page faults
    buffers = {}
    for jpegs in calls:
        out = buffers.setdefault(len(jpegs), np.empty((len(jpegs), height, width, 3), np.uint8))
        images, ok = decode_frames(jpegs, height, width, out=out)
        corrupt += int((~ok).sum())
        if augment is not None:
            clips = images.reshape(-1, config.data.clips_per_identity, config.data.seq_len, height, width, 3)
            keypoints = np.zeros((*clips.shape[:3], 14, 3), np.float32)
            augment(clips, keypoints, np.arange(len(clips)), np.zeros(len(clips), np.int64))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert corrupt == 0, f"{corrupt} frames failed to decode"
    name = "bare decode loop (1 process)" if augment is None else "bare decode + augment (1 process)"
    return {"name": name, "frames": frames, "wall_s": wall, "cpu_s": cpu, "driver_cpu_s": cpu}


def median(runs: list[dict]) -> dict:
    """The run of median CPU time (shared machines: the middle of a few runs, not the best or the mean)."""
    return sorted(runs, key=lambda run: run["cpu_s"])[len(runs) // 2]


class Delivered:
    """The shard as the consumer reads it, counting the bytes of every block it hands over (what crossed the
    object store to the consumer) and the bytes the consumer keeps alive at the peak: a decoded block lives
    while any group view into it is held (data.batches), an encoded group's JPEG copy while the group is
    (data.consumer.encoded_rows)."""

    def __init__(self, dataset):
        self.dataset, self.bytes, self.live, self.peak = dataset, 0, 0, 0

    def _hold(self, owner, size: int) -> None:
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(owner, self._release, size)

    def _release(self, size: int) -> None:
        self.live -= size

    def iter_batches(self, **kwargs):
        for block in self.dataset.iter_batches(**kwargs):
            if isinstance(block, dict):
                self.bytes += sum(np.asarray(v).nbytes for v in block.values())
                owner = block["clips"]
                while isinstance(owner.base, np.ndarray):
                    owner = owner.base
                self._hold(owner, block["clips"].nbytes)
            else:
                self.bytes += block.nbytes
            yield block

    def rows(self, block) -> list[dict]:
        """encoded_rows, each row's frames in a list the bench can watch."""
        rows = _ENCODED_ROWS(block)
        for row in rows:
            row["frames"] = _Watched(row["frames"])
            self._hold(row["frames"], sum(len(f) for f in row["frames"]))
        return rows


class _Watched(list):
    __slots__ = ("__weakref__",)


_ENCODED_ROWS = consumer.encoded_rows


def pipeline_epoch(uri: str, config: Config, epoch: int, *, normalize: bool = True,
                   exclude: list[int] | None = None) -> dict:
    """Frames delivered (clips x T), wall, CPU (all processes) and driver CPU of one training epoch; bytes
    delivered to the consumer and its peak pinned bytes (Delivered)."""
    at_consumer = config.data.decode_at == "consumer"
    with CpuMeter() as meter:
        baseline, start = meter.snapshot(), time.perf_counter()
        source = Delivered(training_dataset(uri, config, epoch=epoch, exclude_identities=exclude))
        decoder = ConsumerDecoder.from_config(config, epoch) if at_consumer else None
        consumer.encoded_rows = source.rows
        try:
            batches = training_batches(source, config.data.identities_per_batch, seed=0, drop_last=False,
                                       normalize=normalize, decoder=decoder)
            frames = sum(batch["clips"].shape[0] * config.data.seq_len for batch in batches)
        finally:
            consumer.encoded_rows = _ENCODED_ROWS
        wall = time.perf_counter() - start
        cpu, driver, kinds = meter.since(baseline), meter.driver(baseline), meter.by_kind(baseline)
    assert batches.skipped_groups == 0, f"{batches.skipped_groups} groups skipped for corrupt frames"
    return {"frames": frames, "wall_s": wall, "cpu_s": cpu, "driver_cpu_s": driver, "cpu_by_process": kinds,
            "delivered_bytes": source.bytes, "pinned_peak_bytes": source.peak}


def marginal(full: dict, small: dict, name: str) -> dict:
    """What the frames of `full` beyond those of `small` cost: the per-epoch constant (planning, the
    first reads' latency) cancels out."""
    kinds = {kind: round(full["cpu_by_process"].get(kind, 0) - small["cpu_by_process"].get(kind, 0), 2)
             for kind in {**full["cpu_by_process"], **small["cpu_by_process"]}}
    return {"name": name, **{key: full[key] - small[key] for key in ("frames", "wall_s", "cpu_s",
                                                                      "driver_cpu_s")},
            "cpu_by_process": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}


def bytes_read(shards: str, config: Config, log: str) -> dict:
    open(log, "w").close()
    manifest = read_manifest(shards)
    stored = {path: entry.bytes for path, entry in zip(manifest.paths("train"), manifest.files["train"],
                                                        strict=True)}
    pipeline_epoch("countfile://" + shards, config, epoch=1, normalize=False)
    read: dict[str, int] = {}
    with open(log) as fh:
        for line in fh:
            n, path = line.rstrip("\n").split("\t", 1)
            read[path] = read.get(path, 0) + int(n)
    train_read = sum(n for path, n in read.items() if path in stored)
    return {"stored_bytes": sum(stored.values()), "train_bytes_read": train_read,
            "other_bytes_read": sum(read.values()) - train_read,
            "files_read": sum(path in read for path in stored), "files": len(stored),
            "ratio": train_read / sum(stored.values())}


def _timed_check(shards: str, split: str, cache: str) -> dict:
    os.environ[CACHE_VARIABLE] = cache
    wall, cpu = time.perf_counter(), time.process_time()
    check_shards(shards, (split,))
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def checksum_cost(shards: str, config: Config, workdir: Path, epoch_wall_s: float) -> dict:
    """(c): the driver's checksum check of each split, cold and cached, beside the stream it precedes."""
    previous = os.environ.get(CACHE_VARIABLE)
    cache = str(workdir / "shard-hashes.json")
    try:
        out = {}
        for split in ("train", "test"):
            stored = sum(f.bytes for f in read_manifest(shards).files[split])
            runs = [_timed_check(shards, split, "off") for _ in range(3)]
            cold = sorted(runs, key=lambda run: run["wall_s"])[1]
            _timed_check(shards, split, cache)  # fills the cache
            cached = _timed_check(shards, split, cache)
            out[split] = {"stored_bytes": stored, "cold": cold, "cached": cached,
                          "mib_per_s": stored / 2**20 / cold["wall_s"]}
        out["train"]["stream_wall_s"] = epoch_wall_s
        start = time.perf_counter()
        rows = sum(len(batch["clips"]) for batch in evaluation_dataset(shards, config).iter_batches(
            batch_size=None, batch_format="numpy"))
        out["test"]["stream_wall_s"], out["test"]["stream_rows"] = time.perf_counter() - start, rows
        for split in ("train", "test"):
            out[split]["share_of_stream"] = out[split]["cold"]["wall_s"] / out[split]["stream_wall_s"]
        return out
    finally:
        os.environ.pop(CACHE_VARIABLE, None) if previous is None else os.environ.update(
            {CACHE_VARIABLE: previous})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=40, help="training identities of the synthetic set")
    parser.add_argument("--tracklets", type=int, nargs=2, default=[2, 4], metavar=("LOW", "HIGH"),
                        help="tracklets per identity")
    parser.add_argument("--frames", type=int, nargs=2, default=[48, 96], metavar=("LOW", "HIGH"),
                        help="frames per tracklet")
    parser.add_argument("--frame-height", type=int, default=256, help="stored JPEG height (MARS: 256)")
    parser.add_argument("--frame-width", type=int, default=128, help="stored JPEG width (MARS: 128)")
    parser.add_argument("--height", type=int, default=224, help="decoded height (data.height)")
    parser.add_argument("--width", type=int, default=224, help="decoded width (data.width)")
    parser.add_argument("--identities-per-batch", type=int, default=8, help="P")
    parser.add_argument("--clips-per-identity", type=int, default=4, help="K")
    parser.add_argument("--seq-len", type=int, default=8, help="T")
    parser.add_argument("--decode-concurrency", type=int, default=2, help="N decoding tasks at once")
    parser.add_argument("--num-cpus", type=int, default=8,
                        help="logical CPUs given to ray.init (more than cores: docs/architecture.md)")
    parser.add_argument("--target-file-mb", type=float, default=32,
                        help="shard file size (prepare_mars: 128; see the module docstring)")
    parser.add_argument("--object-store-mb", type=int, default=2048,
                        help="Ray object store size (see the module docstring)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each measurement; the one of median CPU time is reported")
    parser.add_argument("--augment", action="store_true",
                        help="the training stream augments as configs/mars_resnet50_strong.yaml does "
                             "(flip, pad 10 and crop, colour jitter 0.2, random erasing 0.5); the goal stays "
                             "against the bare decoding loop; a bare loop that augments is shown beside it")
    parser.add_argument("--decode-at", nargs="+", default=["stream", "consumer"],
                        choices=["stream", "consumer"], help="data.decode_at modes measured, each epoch "
                        "interleaved with the others and the bare loop (consumer: data.decode_concurrency "
                        "threads in this process)")
    parser.add_argument("--no-float", action="store_true", help="uint8 batches only (not the float ones)")
    parser.add_argument("--throughput-only", action="store_true", help="skip bytes read and checksums")
    parser.add_argument("--workdir", default=None, help="keep the data set here (default: a temporary dir)")
    parser.add_argument("--out", default="bench/results/data.json")
    args = parser.parse_args()

    config = Config()
    data = config.data
    data.height, data.width, data.seq_len = args.height, args.width, args.seq_len
    data.identities_per_batch, data.clips_per_identity = args.identities_per_batch, args.clips_per_identity
    data.decode_concurrency = args.decode_concurrency
    if args.augment:
        data.flip, data.crop_padding, data.color_jitter, data.random_erasing = True, 10, 0.2, 0.5
    validate(config)

    with tempfile.TemporaryDirectory(prefix="stal-bench-data-") as temporary:
        workdir = Path(args.workdir or temporary)
        shards, counts = prepare(args, workdir)
        stored_frames = counts["frames"]

        import importlib

        import ray

        # the class from the module `bench.data`, not this script's `__main__` copy: Ray then pickles the
        # filesystem by reference and its workers import it (they get the repository on their path below)
        counting = importlib.import_module("bench.data").CountingFileSystem
        fsspec.register_implementation("countfile", counting, clobber=True)
        os.environ[READ_LOG] = str(workdir / "reads.log")
        ray.init(address="local", num_cpus=args.num_cpus, object_store_memory=args.object_store_mb << 20,
                 include_dashboard=False, log_to_driver=False,
                 configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": REPO, READ_LOG: os.environ[READ_LOG]}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            # P identities only: an epoch of the same fixed cost with few frames. One untimed epoch of each
            # kind first: they start the worker processes that later epochs reuse, and map the object
            # store's pages into them (see the module docstring)
            few = identity_labels(shards)[data.identities_per_batch:]
            calls = sampled_frames(shards, config, epoch=0)
            mean_jpeg = float(np.mean([len(f) for c in calls for f in c]))
            configs = {}
            for mode in args.decode_at:
                configs[mode] = copy.deepcopy(config)
                configs[mode].data.decode_at = mode
                pipeline_epoch(shards, configs[mode], epoch=0, normalize=False, exclude=few)
                pipeline_epoch(shards, configs[mode], epoch=0, normalize=False)
            bares, epochs = [], {}
            for normalize in (False,) if args.no_float else (False, True):
                # interleaved, bare loop included, so a change in the machine's load hits all alike
                runs = {mode: [] for mode in args.decode_at}
                for _ in range(args.repeats):
                    bares.append(bare_loop(calls, data.height, data.width))
                    for mode in args.decode_at:
                        runs[mode].append((
                            pipeline_epoch(shards, configs[mode], epoch=0, normalize=normalize),
                            pipeline_epoch(shards, configs[mode], epoch=0, normalize=normalize, exclude=few)))
                for mode in args.decode_at:
                    epochs[mode, normalize] = (median([f for f, _ in runs[mode]]),
                                               median([s for _, s in runs[mode]]))
            bare = median(bares)
            augmented = median([bare_loop(calls, data.height, data.width, config)
                                for _ in range(args.repeats)]) if args.augment else None
            reads = checksums = None
            if not args.throughput_only:
                reads = bytes_read(shards, config, os.environ[READ_LOG])
                checksums = checksum_cost(shards, config, workdir, epochs["stream", False][0]["wall_s"])
        finally:
            ray.shutdown()

    rows = [bare]
    for (mode, normalize), (full, small) in epochs.items():
        label = f"{mode} {'float' if normalize else 'uint8'}"
        rows += [{"name": f"{label}: epoch", **full},
                 {"name": f"{label}: {data.identities_per_batch} ids", **small},
                 marginal(full, small, f"{label}: marginal")]
    for row in rows:
        row["frames_per_s"] = row["frames"] / row["wall_s"]
        row["cores"] = row["cpu_s"] / row["wall_s"]
        row["frames_per_core_s"] = row["frames"] / row["cpu_s"]
    if rows[1]["frames"] != bare["frames"]:
        raise SystemExit(f"the pipeline delivered {rows[1]['frames']} frames, the bare loop decoded "
                         f"{bare['frames']}: they must be the same frames")
    if augmented is not None:
        rows.append(augmented)
        augmented.update(frames_per_s=augmented["frames"] / augmented["wall_s"],
                         cores=augmented["cpu_s"] / augmented["wall_s"],
                         frames_per_core_s=augmented["frames"] / augmented["cpu_s"])
    ratios = {row["name"]: row["frames_per_core_s"] / bare["frames_per_core_s"] for row in rows[1:]}
    goal_row = f"{args.decode_at[0]} uint8: marginal"
    ratio = ratios[goal_row]

    print(f"STAL data benchmark: {args.identities} identities, {stored_frames} stored training frames "
          f"{args.frame_height}x{args.frame_width} JPEG ({mean_jpeg / 1024:.1f} KiB mean) in "
          f"{reads['files'] if reads else '?'} shards, "
          f"decoded to {data.height}x{data.width}; P={data.identities_per_batch} "
          f"K={data.clips_per_identity} T={data.seq_len}; {data.decode_concurrency} decoding tasks, "
          f"ray num_cpus={args.num_cpus}, {psutil.cpu_count()} cores here"
          + ("; augmented (flip, pad 10, jitter 0.2, erasing 0.5)" if args.augment else ""))
    print(f"{'':<34}{'frames':>8}{'wall s':>8}{'frames/s':>10}{'CPU s':>8}{'driver':>8}{'cores':>7}"
          f"{'frames/core-s':>15}{'of bare':>9}{'B/frame':>9}{'pinned MB':>10}")
    for row in rows:
        of_bare = f"{ratios[row['name']]:>9.0%}" if row["name"] in ratios else f"{'':>9}"
        per_frame = row.get("delivered_bytes", 0) / max(row["frames"], 1)
        pinned_mb = row.get("pinned_peak_bytes", 0) / 2**20
        delivered = f"{per_frame:>9.0f}{pinned_mb:>10.1f}" \
            if "delivered_bytes" in row and not row["name"].endswith("marginal") else ""
        print(f"{row['name']:<34}{row['frames']:>8}{row['wall_s']:>8.2f}{row['frames_per_s']:>10.0f}"
              f"{row['cpu_s']:>8.2f}{row['driver_cpu_s']:>8.2f}{row['cores']:>7.2f}"
              f"{row['frames_per_core_s']:>15.0f}{of_bare}{delivered}")
    for row in rows[1:]:
        if row["name"].endswith("marginal"):
            kinds = list(row["cpu_by_process"].items())[:6]
            top = ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in kinds)
            print(f"  CPU s of {row['name']}: {top}")
    verdict = "PASS" if ratio >= THROUGHPUT_GOAL else "FAIL"
    print(f"{goal_row} / bare loop frames per core: {ratio:.0%} (goal >= {THROUGHPUT_GOAL:.0%}): {verdict}")
    if "consumer uint8: marginal" in ratios:
        mode_ratio = ratios["consumer uint8: marginal"]
        print(f"consumer uint8: marginal / bare loop frames per core: {mode_ratio:.0%} (goal >= "
              f"{CONSUMER_GOAL:.0%}): {'PASS' if mode_ratio >= CONSUMER_GOAL else 'FAIL'}")
    if {("stream", False), ("consumer", False)} <= set(epochs):
        pinned = {mode: epochs[mode, False][0]["pinned_peak_bytes"] for mode in ("stream", "consumer")}
        smaller = pinned["stream"] / max(pinned["consumer"], 1)
        print(f"pinned by the consumer at the peak, stream / consumer: {pinned['stream'] / 2**20:.1f} MB / "
              f"{pinned['consumer'] / 2**20:.1f} MB = {smaller:.1f}x (goal >= 4x): "
              f"{'PASS' if smaller >= 4 else 'FAIL'}")
    if reads is None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": vars(args), "cores_here": psutil.cpu_count(),
                                   "stored_frames": stored_frames, "mean_jpeg_bytes": mean_jpeg, "rows": rows,
                                   "frames_per_core_of_bare": ratios}, indent=2))
        print(f"wrote {out}")
        return
    read_verdict = "PASS" if reads["ratio"] <= READ_GOAL else "FAIL"
    print(f"training shard bytes read per epoch / stored: {reads['train_bytes_read'] / 2**20:.1f} MiB / "
          f"{reads['stored_bytes'] / 2**20:.1f} MiB = {reads['ratio']:.2f} (goal <= {READ_GOAL}): "
          f"{read_verdict}; {reads['files_read']} of {reads['files']} files read, "
          f"{reads['other_bytes_read'] / 1024:.1f} KiB of other files (manifest)")
    for split, stream in (("train", "one training epoch (uint8)"), ("test", "one evaluation stream pass")):
        c = checksums[split]
        print(f"checksums, {split} split: {c['stored_bytes'] / 2**20:.1f} MiB hashed in "
              f"{c['cold']['wall_s']:.2f} s "
              f"({c['mib_per_s']:.0f} MiB/s, driver CPU {c['cold']['cpu_s']:.2f} s) with no cache, "
              f"{c['cached']['wall_s'] * 1000:.1f} ms cached; {stream}: {c['stream_wall_s']:.2f} s without "
              f"the check, {c['stream_wall_s'] + c['cold']['wall_s']:.2f} s with it "
              f"(+{c['share_of_stream']:.1%}, once per job)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args), "cores_here": psutil.cpu_count(), "stored_frames": stored_frames,
              "mean_jpeg_bytes": mean_jpeg, "rows": rows, "frames_per_core_of_bare": ratios,
              "goal_row": goal_row, "throughput_goal": THROUGHPUT_GOAL,
              "reads": reads, "read_goal": READ_GOAL, "checksums": checksums,
              "pass": {"throughput": ratio >= THROUGHPUT_GOAL, "reads": reads["ratio"] <= READ_GOAL}}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
