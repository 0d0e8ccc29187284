"""What the training stream can supply against what the train workers consume, in frames per second: the line
a training or Tune driver prints as it starts, with a warning when the GPUs would wait for data.

Supply: the per-core rate at which this node decodes the data set's own frames (a bare decode loop, timed
here for a fraction of a second), times the share of that rate the whole stream keeps per CPU (reading,
sampling, the object store, the consumer: bench/data.py), times the CPUs that decode: the cluster's CPUs
less those the train workers hold when data.decode_concurrency is null (Ray Data then starts a decoding task
on every free CPU), else at most that many decoding tasks. Demand: each GPU worker consumes its GPU's
sustained FLOP/s (about a third of its bf16 peak, as README's GPU note assumes) over the model's FLOPs per
frame (forward and backward, bench/model.py). Both are estimates, meant to show the order of magnitude and
which side is short, not to promise a rate.

With data.decode_at = consumer the train workers decode (data.consumer), each with data.decode_concurrency
threads (null: the node's CPUs over its GPUs, estimated here as the cluster's), while its step runs
(data.prefetch): the supply is those threads times the per-core rate times the share of it the consumer
keeps (bench/data.py's driver CPU of a consumer epoch). CPU nodes add nothing to it; the reading tasks,
which are light, run anywhere.
"""

import time
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset
import ray

from stal_ray.data.prepared.handle import PreparedData, as_prepared
from stal_ray.data.stream.images import decode_frames

# The stream's frames per CPU-second (every Ray process counted, beyond the per-epoch start) over a bare
# decode loop's on the same frames: 4,601-4,931 against 7,932-8,160 at 256x128 (bench/data.py, README)
STREAM_SHARE = 0.58
# A decoding task's own frames per CPU-second over the bare loop's: 128 µs of 152 µs per frame
# (bench/data.py's per-process split, README). What a cap of N decoding tasks bounds.
DECODE_TASK_SHARE = 0.84
# The training worker's frames per CPU-second over the bare loop's with data.decode_at = consumer: its
# decoding threads and Ray's iterator in the same process, 162-182 us a frame against 100-102 at 256x128 (the
# driver column of bench/data.py's consumer epochs; without Ray the consumer's own work is 119 us:
# bench/consumer_cost.py)
CONSUMER_SHARE = 0.6
# Forward and backward GFLOP per frame at the size counted (bench/model.py, 8-frame clips); other sizes scale
# with their pixels
GFLOP_PER_FRAME = {"resnet50": (237 / 8, 256 * 128), "bninception": (253 / 8, 224 * 224)}
# TFLOP/s a GPU sustains on this model, by Ray's accelerator type (the `accelerator_type:X` resource of a
# node): about a third of its dense bf16 peak (A100 312, H100 and H200 989, A10G 70, L4 121, L40S 362), since
# grouped convolutions on small maps rarely do better (README's cost estimate and GPU note: 100 and 330)
SUSTAINED_TFLOPS = {"A100": 100, "A100-40G": 100, "A100-80G": 100, "H100": 330, "H200": 330, "A10G": 23,
                    "L4": 40, "L40S": 120}
ASSUMED_ACCELERATOR = "A100"
SAMPLE_FRAMES = 64  # frames of the data set decoded to time the rate
SAMPLE_SECONDS = 0.3  # CPU seconds of decoding timed, at least


@dataclass
class StreamBalance:
    """The supply and demand of one run, and how they were estimated."""
    rate_per_core: float  # frames per CPU-second of a bare decode loop on this node
    decoding_cpus: float  # CPUs the stream may decode on (consumer: the train workers' decoding threads)
    cap: int | None  # data.decode_concurrency
    supply: float  # frames/s the stream can deliver
    workers: int
    accelerator: str | None  # None: CPU workers
    demand: float | None  # frames/s the GPU workers consume (None: CPU workers, or a model not counted)
    gflop_per_frame: float | None
    sustained_tflops: float | None
    decode_at: str = "stream"  # data.decode_at

    @property
    def gpus_wait(self) -> bool:
        return self.demand is not None and self.supply < self.demand

    def _supply(self) -> str:
        rate = f"{self.rate_per_core:,.0f} frames per core-second decoded here"
        if self.decode_at == "consumer":
            threads = self.decoding_cpus / max(self.workers, 1)
            source = "data.decode_concurrency" if self.cap else "CPUs per GPU"
            return (f"decoding at the consumer: ~{self.supply:,.0f} frames/s ({self.workers} train workers x "
                    f"{threads:g} threads ({source}) x {rate} x {CONSUMER_SHARE:.2f} kept by the consumer)")
        cpus = (f"{self.decoding_cpus:g} free CPUs of the cluster now" if self.cap is None else
                f"data.decode_concurrency = {self.cap} decoding tasks")
        share = STREAM_SHARE if self.cap is None else DECODE_TASK_SHARE
        return f"stream: ~{self.supply:,.0f} frames/s ({cpus} x {rate} x {share:.2f} kept by the stream)"

    def line(self) -> str:
        supply = self._supply()
        if self.accelerator is None:
            return f"{supply}; {self.workers} train workers on CPU"
        if self.demand is None:
            return (f"{supply}; {self.workers} GPU workers ({self.accelerator}): this model's FLOPs are not "
                    "counted")
        return (f"{supply} against ~{self.demand:,.0f} frames/s that {self.workers} GPU workers consume "
                f"({self.accelerator} at {self.sustained_tflops:g} TFLOP/s sustained, "
                f"{self.gflop_per_frame:.1f} GFLOP per frame)")

    def warning(self) -> str | None:
        if not self.gpus_wait:
            return None
        if self.decode_at == "consumer":
            fix = ("raise data.decode_concurrency (decoding threads per train worker) on nodes with the CPUs "
                   "for it, or set data.decode_at=stream so that every CPU of the cluster decodes, CPU nodes "
                   "too")
        elif self.cap is None:
            fix = "add CPU nodes (cluster/aws_gpu.yaml's cpu_worker) or use a GPU node type with more CPUs"
        else:
            fix = ("unset data.decode_concurrency (--set data.decode_concurrency=null) so decoding follows "
                   "the cluster's CPUs, or raise it")
        who = "decoding at the consumer" if self.decode_at == "consumer" else "stream"
        return (f"warning: the GPUs would wait for data: the {who} supplies about "
                f"{self.supply / self.demand:.0%} of what they consume; {fix}")


def decode_rate(prepared: PreparedData | str, data) -> float:
    """Frames per CPU-second this process decodes the data set's frames at data.height x data.width: the
    first SAMPLE_FRAMES frames of its first training file, decoded for SAMPLE_SECONDS of CPU at least."""
    prepared = as_prepared(prepared)
    rows = pyarrow.dataset.dataset(prepared.paths("train")[0], filesystem=prepared.arrow_filesystem(),
                                   format="parquet")
    jpegs = []
    for batch in rows.to_batches(columns=["frames"], batch_size=1):
        jpegs += pc.list_flatten(batch.column("frames")).to_pylist()
        if len(jpegs) >= SAMPLE_FRAMES:
            break
    jpegs = jpegs[:SAMPLE_FRAMES]
    out = np.empty((len(jpegs), data.height, data.width, 3), np.uint8)
    decode_frames(jpegs, data.height, data.width, out=out)  # pages of `out` touched, decoder loaded
    frames, start = 0, time.thread_time()
    while (spent := time.thread_time() - start) < SAMPLE_SECONDS or not frames:
        decode_frames(jpegs, data.height, data.width, out=out)
        frames += len(jpegs)
    return frames / max(spent, 1e-9)


def accelerator_of(resources: dict[str, float]) -> str:
    """The cluster's GPU type, from the `accelerator_type:X` resource Ray gives a GPU node (the most common
    one); ASSUMED_ACCELERATOR where the nodes do not say (or have not started yet)."""
    types = {name.split(":", 1)[1]: count for name, count in resources.items()
             if name.startswith("accelerator_type:")}
    return max(types, key=types.get) if types else ASSUMED_ACCELERATOR


def balance(config, rate_per_core: float, resources: dict[str, float]) -> StreamBalance:
    """The StreamBalance of `config` on a cluster with `resources` (ray.cluster_resources())."""
    data, train = config.data, config.train
    free = max(resources.get("CPU", 0.0) - train.num_workers, 0.0)  # a train worker holds one CPU
    if data.decode_at == "consumer":
        # each train worker's threads (data.consumer.default_threads: its node's CPUs over its GPUs), on the
        # cluster's CPUs at most
        gpus = resources.get("GPU", 0.0) if train.use_gpu else 0.0
        threads = data.decode_concurrency or max(1, int(resources.get("CPU", 0.0) // max(gpus, 1.0)))
        free = min(train.num_workers * threads, resources.get("CPU", 0.0))
        supply = free * rate_per_core * CONSUMER_SHARE
    elif data.decode_concurrency is None:
        supply = free * rate_per_core * STREAM_SHARE
    else:
        # at most the cap's decoding tasks, and never more than the free CPUs carry whole streams of
        supply = min(data.decode_concurrency * rate_per_core * DECODE_TASK_SHARE,
                     free * rate_per_core * STREAM_SHARE)
    accelerator = demand = gflop = tflops = None
    if train.use_gpu:
        accelerator = accelerator_of(resources)
        tflops = SUSTAINED_TFLOPS.get(accelerator, SUSTAINED_TFLOPS[ASSUMED_ACCELERATOR])
        if accelerator not in SUSTAINED_TFLOPS:
            accelerator = f"{accelerator} (its rate unknown here: assumed {ASSUMED_ACCELERATOR}'s)"
        if config.model.backbone in GFLOP_PER_FRAME:
            counted, pixels = GFLOP_PER_FRAME[config.model.backbone]
            gflop = counted * data.height * data.width / pixels
            demand = train.num_workers * tflops * 1e3 / gflop
    return StreamBalance(rate_per_core=rate_per_core, decoding_cpus=free, cap=data.decode_concurrency,
                         supply=supply, workers=train.num_workers, accelerator=accelerator, demand=demand,
                         gflop_per_frame=gflop, sustained_tflops=tflops, decode_at=data.decode_at)


def report_stream_balance(config, data: PreparedData | str) -> StreamBalance:
    """Print the run's supply and demand line (and the warning when the GPUs would wait); the driver calls it
    as a run starts, on the cluster it has joined."""
    found = balance(config, decode_rate(data, config.data), ray.cluster_resources())
    print(found.line(), flush=True)
    if found.warning():
        print(found.warning(), flush=True)
    return found
