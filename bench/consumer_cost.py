"""Benchmark: where the consumer's CPU goes per frame (data.decode_at = consumer), against the bare decoder on
the same bytes, without Ray in the timed part.

One epoch's blocks of the consumer stream (bench/data.py's data set; JPEG bytes, as training_dataset gives
them with data.decode_at = consumer) are collected into this process once; Ray is then shut down, so no
other process runs. Timed on those blocks, in this one process, in CPU seconds per frame (process time,
every thread), each the median of --repeats runs, interleaved:

* bare: data.images.decode_frames on the same frames in the stream's calls, into reused buffers
  (bench/data.py's reference loop);
* consumer, 1 thread and --threads threads: TrainingBatches (normalize=False, no prefetch) over the blocks
  with a ConsumerDecoder, i.e. everything the training worker does per frame but Ray's iterator;
* the stream alone, with Ray (before the runs above, Ray then shut down): --repeats epochs of the consumer
  stream iterated and its rows copied out (encoded_rows), nothing decoded: the CPU of this process (Ray's
  iterator, its executor's thread) and of Ray's processes (the reading tasks, the raylet) per frame, which a
  training worker's epoch pays on top of the consumer's own;
* the overlap: an epoch over the blocks with a simulated step (a sleep of --step-ms) after each batch, the
  next batch decoded in the caller's thread (prefetch 0) or in TrainingBatches' background thread (1):
  wall seconds, against the steps' own;
* its parts, 1 thread: encoded_rows (the JPEG copied out of the block per group), the decoding calls alone
  (decode_frames_with_sizes on the rows' memoryviews), clip_rows (keypoints), and the rest (mixing, batch
  assembly) by difference.

    python bench/consumer_cost.py --height 256 --width 128
"""

import argparse
import copy
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)

from bench.data import CpuMeter, prepare  # noqa: E402
from stal_ray.config import Config, validate  # noqa: E402
from stal_ray.data.stream.batches import training_batches  # noqa: E402
from stal_ray.data.stream.clips import clip_rows  # noqa: E402
from stal_ray.data.stream.consumer import ConsumerDecoder, encoded_rows  # noqa: E402
from stal_ray.data.stream.images import decode_frames, decode_frames_with_sizes  # noqa: E402
from stal_ray.data.stream.pipeline import decode_batch_size, training_dataset  # noqa: E402

CALL = 16  # frames per decoding call, as data.consumer's


class Blocks:
    """The collected blocks, handed out as the shard's iter_batches would."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, **_):
        yield from self.blocks


def stream_alone(shards: str, config: Config) -> dict:
    """CPU seconds of one consumer-mode epoch of the stream without decoding: the blocks iterated and their
    rows copied out (encoded_rows), nothing decoded; this process and every Ray process apart."""
    with CpuMeter() as meter:
        baseline = meter.snapshot()
        frames = 0
        for block in training_dataset(shards, config, epoch=0).iter_batches(batch_size=None,
                                                                            batch_format="pyarrow"):
            frames += sum(len(row["frames"]) for row in encoded_rows(block))
        total, driver, kinds = meter.since(baseline), meter.driver(baseline), meter.by_kind(baseline)
    return {"frames": frames, "cpu_s": total, "driver_cpu_s": driver, "cpu_by_process": kinds}


def collect(args, config: Config) -> tuple[list, list[dict]]:
    """The epoch's blocks (copied out of the object store: the timed runs own their memory, as the
    consumer's copies do) and --repeats epochs of stream_alone."""
    import pyarrow as pa
    import ray

    with tempfile.TemporaryDirectory(prefix="stal-bench-consumer-") as temporary:
        shards, _ = prepare(args, Path(args.workdir or temporary))
        ray.init(address="local", num_cpus=8, object_store_memory=2048 << 20, include_dashboard=False,
                 log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": REPO}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            blocks = [pa.concat_tables([block]).combine_chunks() for block in training_dataset(
                shards, config, epoch=0).iter_batches(batch_size=None, batch_format="pyarrow")]
            streams = [stream_alone(shards, config) for _ in range(args.repeats)]
            return blocks, streams
        finally:
            ray.shutdown()


def cpu(function) -> float:
    start = time.process_time()
    function()
    return time.process_time() - start


def bare(jpegs: list, config: Config):
    """bench/data.py's reference: the stream's decoding calls (decode_batch_size groups each) into reused
    buffers of their size."""
    data = config.data
    call = decode_batch_size(data, (data.clips_per_identity, data.seq_len)) * data.clips_per_identity \
        * data.seq_len
    calls = [jpegs[start:start + call] for start in range(0, len(jpegs), call)]
    buffers = {len(c): np.empty((len(c), data.height, data.width, 3), np.uint8) for c in calls}

    def run():
        for frames in calls:
            decode_frames(frames, data.height, data.width, out=buffers[len(frames)])
    return run


def consumer(blocks: list, config: Config, threads: int):
    def run():
        decoder = ConsumerDecoder(threads=threads)
        for _ in training_batches(Blocks(blocks), config.data.identities_per_batch, seed=0, drop_last=False,
                                  normalize=False, decoder=decoder, prefetch=0):
            pass
        if decoder.pool is not None:
            decoder.pool.shutdown()
    return run


def overlap(blocks: list, config: Config, threads: int, step_s: float, prefetch: int) -> dict:
    """Wall seconds of an epoch over the blocks where each batch is followed by a training step of `step_s`
    (a sleep: a GPU's step leaves the CPU free), the next batch decoded in the caller's thread (prefetch 0)
    or in the background (1)."""
    decoder = ConsumerDecoder(threads=threads)
    batches = 0
    start = time.perf_counter()
    for _ in training_batches(Blocks(blocks), config.data.identities_per_batch, seed=0, drop_last=False,
                              normalize=False, decoder=decoder, prefetch=prefetch):
        time.sleep(step_s)
        batches += 1
    wall = time.perf_counter() - start
    if decoder.pool is not None:
        decoder.pool.shutdown()
    return {"prefetch": prefetch, "batches": batches, "wall_s": wall, "step_s": step_s}


def parts(blocks: list, config: Config) -> dict[str, float]:
    """CPU seconds of the consumer's parts in one thread (pieces of what consumer() runs)."""
    data = config.data
    rows = [row for block in blocks for row in encoded_rows(block)]
    k, t = data.clips_per_identity, data.seq_len
    batches = [rows[i:i + data.identities_per_batch] for i in range(0, len(rows), data.identities_per_batch)]
    out = np.empty((data.identities_per_batch * k * t, data.height, data.width, 3), np.uint8)
    decoded = []

    def decode():
        decoded.clear()
        for batch in batches:
            jpegs = [frame for row in batch for frame in row["frames"]]
            for start in range(0, len(jpegs), CALL):
                decoded.append(decode_frames_with_sizes(jpegs[start:start + CALL], data.height, data.width,
                                                        out=out[start:start + CALL])[1:])

    def keypoints():
        for batch in batches:
            n = len(batch) * k * t
            clip_rows(out[:n], np.ones(n, bool), np.full((n, 2), 256),
                      np.stack([row["keypoints"] for row in batch]), rows=len(batch), clip_shape=(k, t))

    return {"encoded_rows": cpu(lambda: [encoded_rows(block) for block in blocks]),
            "decode calls": cpu(decode), "clip_rows": cpu(keypoints)}


def profile(blocks: list, config: Config, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(consumer(blocks, config, threads=1))
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="the consumer's decoding threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--step-ms", type=float, default=50,
                        help="the simulated training step of the overlap runs (ms)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also print cProfile's N functions of most own time (1 thread)")
    parser.add_argument("--workdir", default=None, help="keep the data set here (default: a temporary dir)")
    parser.add_argument("--out", default=None, help="default: bench/results/consumer_cost_HxW.json")
    args = parser.parse_args()
    args.tracklets, args.frames, args.frame_height, args.frame_width, args.target_file_mb = \
        [2, 4], [48, 96], 256, 128, 32

    config = Config()
    data = config.data
    data.height, data.width, data.seq_len = args.height, args.width, 8
    data.identities_per_batch, data.clips_per_identity, data.decode_at = 8, 4, "consumer"
    validate(config)
    blocks, streams = collect(args, copy.deepcopy(config))
    jpegs = [bytes(frame) for block in blocks for row in encoded_rows(block) for frame in row["frames"]]
    frames = len(jpegs)

    runs = {"bare decode loop": bare(jpegs, config),
            "consumer, 1 thread": consumer(blocks, config, 1),
            f"consumer, {args.threads} threads": consumer(blocks, config, args.threads)}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    part_seconds: dict[str, list[float]] = {}
    for run in runs.values():
        run()  # warm: pages of the buffers, the decoder's tables
    for _ in range(args.repeats):
        for name, run in runs.items():
            seconds[name].append(cpu(run))
        for name, value in parts(blocks, config).items():
            part_seconds.setdefault(name, []).append(value)
    us = {name: float(np.median(values)) / frames * 1e6 for name, values in seconds.items()}
    part_us = {name: float(np.median(values)) / frames * 1e6 for name, values in part_seconds.items()}
    part_us["mixing, batch assembly (the rest)"] = us["consumer, 1 thread"] - sum(part_us.values())
    reference = us["bare decode loop"]
    overlaps = [overlap(blocks, config, args.threads, args.step_ms / 1e3, prefetch) for prefetch in (0, 1)]
    stream = sorted(streams, key=lambda run: run["cpu_s"])[len(streams) // 2]
    stream_us = {"driver": stream["driver_cpu_s"] / stream["frames"] * 1e6,
                 "Ray's processes": (stream["cpu_s"] - stream["driver_cpu_s"]) / stream["frames"] * 1e6}
    modelled = us[f"consumer, {args.threads} threads"] + sum(stream_us.values())

    print(f"consumer CPU per frame, {frames} frames ({np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB mean "
          f"JPEG) decoded to {data.height}x{data.width}, one process, no Ray; median of {args.repeats}")
    print(f"{'':<40}{'us/frame':>10}{'frames/core-s':>15}{'of bare':>9}{'runs, us/frame':>30}")
    for name in runs:
        each = " ".join(f"{value / frames * 1e6:.0f}" for value in seconds[name])
        print(f"{name:<40}{us[name]:>10.1f}{1e6 / us[name]:>15.0f}{reference / us[name]:>9.0%}{each:>30}")
    print("the consumer's parts, 1 thread:")
    for name, value in part_us.items():
        print(f"  {name:<38}{value:>10.1f}")
    batch_ms = us[f"consumer, {args.threads} threads"] * frames / 1e3 / overlaps[0]["batches"]
    print(f"overlap: an epoch of {overlaps[0]['batches']} batches, each followed by a {args.step_ms:.0f} ms "
          f"step (a sleep), {args.threads} threads; the consumer's CPU a batch: {batch_ms:.0f} ms")
    for run in overlaps:
        print(f"  prefetch {run['prefetch']}: {run['wall_s']:.2f} s wall, "
              f"{run['wall_s'] / run['batches'] * 1e3:.0f} ms a batch "
              f"(steps alone {run['step_s'] * run['batches']:.2f} s)")
    print(f"the stream alone (consumer mode, Ray, nothing decoded; median of {args.repeats} epochs, runs: "
          + " ".join(f"{run['cpu_s'] / run['frames'] * 1e6:.0f}" for run in streams) + " us/frame):")
    for name, value in stream_us.items():
        print(f"  {name:<38}{value:>10.1f}")
    top = ", ".join(f"{kind} {seconds:.2f}" for kind, seconds in list(stream["cpu_by_process"].items())[:4])
    print(f"  CPU s by process: {top}")
    print(f"consumer with {args.threads} threads + the stream alone: {modelled:.1f} us/frame, "
          f"{1e6 / modelled:.0f} frames/core-s, {reference / modelled:.0%} of bare")
    if args.profile:
        print(profile(blocks, config, args.profile))
    out = Path(args.out or f"bench/results/consumer_cost_{data.height}x{data.width}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "frames": frames, "us_per_frame": us,
                               "runs_s": seconds, "parts_us_per_frame": part_us, "stream_alone": streams,
                               "stream_alone_us_per_frame": stream_us, "modelled_us_per_frame": modelled,
                               "overlap": overlaps},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
