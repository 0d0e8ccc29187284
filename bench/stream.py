"""Benchmark: the training stream's throughput as its decoding CPUs grow; the supply/demand line a run prints.

(a) Measured. bench/data.py's data set (MARS-sized 256x128 JPEG frames, decoded at 256x128, ResNet-50's input:
the decoder-bound case) streamed by training_dataset -> training_batches with data.decode_concurrency = N for
each N of --decoders (1 and 2 on a 2-core machine), and uncapped (null), on one local Ray with --num-cpus
logical CPUs, for each data.decode_at of --decode-at: stream (N decoding tasks; null: as many as Ray's free
CPUs allow) and consumer (N decoding threads in this process; null: its CPUs). Each run is --repeats epochs
after an untimed one; the median epoch's frames per wall second and per CPU-second (every Ray process,
bench/data.py's CpuMeter) are reported, with a bare decoding loop's frames per CPU-second in the same run.

(b) On paper. The supply/demand line of configs/mars_resnet50.yaml with 8 GPU workers, printed by the same
call train_mars.py makes (train/supply.py: report_stream_balance) on a simulated cluster: a local Ray started
with the logical resources of one p4d.24xlarge (96 CPUs, 8 GPUs, accelerator_type:A100) and, with --cpu-nodes
N, N more cpu_worker nodes' 32 CPUs each (cluster/aws_gpu.yaml), uncapped and with a cap of 2, in each mode.
Then the supply the measured rate per CPU gives for more decoding CPUs.

    python bench/stream.py --decoders 1 2 --repeats 3 --decode-at stream consumer
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, REPO)

from bench.data import bare_loop, median, pipeline_epoch, prepare, sampled_frames  # noqa: E402
from stal_ray.config import load_config  # noqa: E402
from stal_ray.train.supply import report_stream_balance  # noqa: E402

P4D = {"num_cpus": 96, "num_gpus": 8, "resources": {"accelerator_type:A100": 8}}


def measured(args, shards: str) -> list[dict]:
    import ray

    config = load_config(f"{REPO}/configs/synthetic_tiny.yaml", [
        f"data.height={args.height}", f"data.width={args.width}", "data.seq_len=8",
        "data.identities_per_batch=8", "data.clips_per_identity=4"])
    rows = []
    ray.init(address="local", num_cpus=args.num_cpus, object_store_memory=args.object_store_mb << 20,
             include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        calls = sampled_frames(shards, config, epoch=0)
        for mode in args.decode_at:
            config.data.decode_at = mode
            unit = "decoding tasks" if mode == "stream" else "consumer threads"
            for decoders in [*args.decoders, None]:
                config.data.decode_concurrency = decoders
                pipeline_epoch(shards, config, epoch=0, normalize=False)  # starts the worker processes
                runs = [pipeline_epoch(shards, config, epoch=0, normalize=False) for _ in range(args.repeats)]
                run = median(runs)
                bare = median([bare_loop(calls, args.height, args.width) for _ in range(args.repeats)])
                rows.append({"decode_at": mode, "decoders": decoders, "frames": run["frames"],
                             "wall_s": run["wall_s"], "cpu_s": run["cpu_s"],
                             "frames_per_s": run["frames"] / run["wall_s"],
                             "frames_per_core_s": run["frames"] / run["cpu_s"],
                             "bare_frames_per_core_s": bare["frames"] / bare["cpu_s"],
                             "walls_s": [r["wall_s"] for r in runs]})
                row = rows[-1]
                print(f"{mode:>8}, {unit} {decoders or 'uncapped':>8}: {row['frames_per_s']:8.0f} frames/s "
                      f"({run['frames']} frames in {run['wall_s']:.2f} s; {row['frames_per_core_s']:.0f} per "
                      f"CPU-second, bare loop {row['bare_frames_per_core_s']:.0f}, "
                      f"{row['frames_per_core_s'] / row['bare_frames_per_core_s']:.0%})", flush=True)
    finally:
        ray.shutdown()
    return rows


def simulated(args, shards: str) -> list[str]:
    """The lines report_stream_balance prints for configs/mars_resnet50.yaml on 8 simulated A100s (with
    --cpu-nodes more CPU nodes), uncapped and with decode_concurrency 2, in each mode of --decode-at,
    decoding this data set's frames."""
    import ray

    cpus = P4D["num_cpus"] + 32 * args.cpu_nodes
    ray.init(address="local", num_cpus=cpus, num_gpus=P4D["num_gpus"], resources=P4D["resources"],
             include_dashboard=False, log_to_driver=False, configure_logging=False)
    lines = []
    try:
        for mode in args.decode_at:
            for cap in ("null", "2"):
                config = load_config(f"{REPO}/configs/mars_resnet50.yaml", [
                    "train.num_workers=8", f"data.decode_concurrency={cap}", f"data.decode_at={mode}"])
                found = report_stream_balance(config, shards)
                lines.append(found.line() + (f"\n{found.warning()}" if found.warning() else ""))
    finally:
        ray.shutdown()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoders", type=int, nargs="+", default=[1, 2], help="decoding task caps to time")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-at", nargs="+", default=["stream", "consumer"],
                        choices=["stream", "consumer"], help="data.decode_at modes measured")
    parser.add_argument("--identities", type=int, default=24, help="training identities of the data set")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the measuring Ray")
    parser.add_argument("--object-store-mb", type=int, default=2048)
    parser.add_argument("--cpu-nodes", type=int, default=0, help="simulated cpu_worker nodes (32 CPUs each)")
    parser.add_argument("--skip-measure", action="store_true", help="print the simulated lines only")
    parser.add_argument("--workdir", default=None, help="keep the data set here (default: a temporary dir)")
    parser.add_argument("--out", default="bench/results/stream.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="stal-bench-stream-") as temporary:
        workdir = args.workdir or temporary
        data_args = argparse.Namespace(identities=args.identities, tracklets=[2, 4], frames=[48, 96],
                                       frame_height=256, frame_width=128, target_file_mb=32)
        shards, counts = prepare(data_args, Path(workdir))
        print(f"{counts['frames']} stored training frames, 256x128 JPEG, decoded at "
              f"{args.height}x{args.width}")
        rows = [] if args.skip_measure else measured(args, shards)
        lines = simulated(args, shards)
    for mode in args.decode_at:
        mine = [row for row in rows if row["decode_at"] == mode]
        if not mine:
            continue
        capped = [row for row in mine if row["decoders"]]
        base = capped[0]
        for row in capped[1:]:
            print(f"{mode}: {row['decoders']} decoders / {base['decoders']}: "
                  f"{row['frames_per_s'] / base['frames_per_s']:.2f}x frames/s")
        per_cpu = min(row["frames_per_core_s"] for row in mine)
        print(f"{mode}: on paper, at the slowest measured rate per CPU-second "
              f"({per_cpu:.0f}): " + ", ".join(f"{n} CPUs {n * per_cpu:,.0f} frames/s"
                                                for n in (4, 16, 88, 88 + 8 * 32)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "rows": rows, "simulated": lines}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
