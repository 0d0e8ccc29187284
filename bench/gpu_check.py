"""Benchmark: every path that only a GPU can show, in one command, each item under its own time limit.

Items (bench/gpu_items/), each run in its own process that joins one local Ray cluster, in this order, with
its time limit in a full run (480 s together, < 8 minutes with Ray's start; the README's GPU section says
what each is expected to take on one H100):

  data         90 s  the data set of the next items (kept under --workdir: a rerun reuses it)
  train       120 s  training step of ResNet-50 (256x128) and BN-Inception (224x224) at the MARS configs'
                     batch, bf16, plain PyTorch and TorchTrainer + DeepSpeed: clips/s, frames/s, peak memory,
                     MFU (goal >= 40% for ResNet-50), overhead ratio (goal <= 1.10)
  stream      100 s  Ray Data's frames/s with all CPUs against what the step consumes; the data-wait share of
                     a fed run (goal < 5%); uint8 batches normalised on the device equal the CPU float path
  evaluation   45 s  feature extraction frames/s; ranking of tied distances and of a 1980 x 11310 distance
                     matrix on the device equal to the CPU's
  pose         30 s  an ONNX SimCC pose model on onnxruntime's CUDA provider against its CPU provider
  determinism  75 s  two short runs with train.deterministic give identical losses
  decode       20 s  data.decode_at = consumer's decoders: nvJPEG (torchvision, optional) against the CPU's
                     libjpeg-turbo, frames/s and the difference in levels (goal: mean < 1)

An item past its limit is stopped (its process group killed) and the next one starts with what it left in
its JSON; the limits are cut to what is left of --budget. Each item's table ends with where its time went
(start-up, Ray connection, each TorchTrainer run, ...; `phases` in the JSON). Each item's process is forked
from a template that imported torch and Ray once (bench/gpu_items/processes.py). --quick runs evaluation and
determinism in a second lane beside train, stream, pose and decode: a tiny item is mostly process and actor
start-up, which two lanes overlap on the cores; a full run keeps one lane and Ray's defaults. Each item
prints a table; every goal gets PASS or
FAIL, or says why none applies (n/a on cpu: a GPU's goal on a CPU). All of it goes to --out (JSON), each
item's log to bench/results/gpu_check-logs/. Exit status 1 when a check fails or an item errs or times out;
130 on Ctrl-C, which stops the items still running and still writes and prints what the others measured.

    python bench/gpu_check.py                        # on the GPU (make gpu-check)
    python bench/gpu_check.py --device cpu --quick   # every item's code path on a CPU, tiny sizes (tests)
"""

import argparse
import importlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_items import processes  # noqa: E402
from bench.gpu_items.common import RAY_ADDRESS, ItemResult, profile  # noqa: E402

# name: (module, time limit in a full run, in a quick run, reads the data item's shards)
ITEMS = {
    "data": ("bench.gpu_items.data_set", 90, 120, False),
    "train": ("bench.gpu_items.train_step", 120, 120, False),
    "stream": ("bench.gpu_items.stream", 100, 120, True),
    "evaluation": ("bench.gpu_items.evaluation", 45, 120, True),
    "pose": ("bench.gpu_items.pose", 30, 120, False),
    "determinism": ("bench.gpu_items.determinism", 75, 120, True),
    "decode": ("bench.gpu_items.decode", 20, 60, False),
}
# Quick: ~1 minute in all on an idle 2-core machine; the limits leave room for a machine shared with others.
FULL_BUDGET_S, QUICK_BUDGET_S = 480, 600
MIN_ITEM_S = 10  # an item given less than this is not started
# Quick mode: after the data item, these items (each needs only the data set) run in a second lane beside the
# others, which keep their order (stream reads the train item's step rate): a tiny item is mostly the start-up
# of processes and Ray actors, waits that two lanes overlap on the CPU's cores. The lanes take about as long
# (on 2 cores: train 18 s + stream 30 s + pose 2 s + decode 1 s; evaluation 13 s + determinism 38 s). A full
# run keeps one lane: its items measure the GPU and the machine's CPUs, and must not share them.
QUICK_ALONGSIDE = ("evaluation", "determinism")
PRINTING = threading.Lock()  # one item's table at a time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"],
                        help="cuda (default when torch sees a GPU) or cpu")
    parser.add_argument("--quick", action="store_true",
                        help="tiny backbone, sizes and iterations: every item's code path in seconds")
    parser.add_argument("--only", nargs="+", choices=list(ITEMS), default=None, help="these items only")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all items together (default {FULL_BUDGET_S}, quick "
                             f"{QUICK_BUDGET_S})")
    parser.add_argument("--workdir", default=str(Path("~/.cache/stal_ray/gpu-check").expanduser()),
                        help="where the data item keeps its data set between runs")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU on a GPU missing from the built-in table")
    parser.add_argument("--pose-model", default=None,
                        help="an ONNX SimCC pose model (an RTMPose export) for the pose item (default: an "
                             "untrained stand-in of RTMPose-m's size, exported here)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--item", choices=list(ITEMS), help=argparse.SUPPRESS)  # one item, in its process
    parser.add_argument("--item-out", help=argparse.SUPPRESS)
    parser.add_argument("--context", default="{}", help=argparse.SUPPRESS)  # earlier items' results
    args = parser.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, f"bench/gpu_check.py: --device cuda, but torch {torch.__version__} sees no CUDA "
                       "device (torch.cuda.is_available() is False): run it where nvidia-smi lists a GPU, "
                       "with a CUDA build of torch (make venv), or pass --device cpu --quick\n")
    if args.device == "cpu" and not args.quick and args.item is None:
        print("note: a full run on a CPU takes far longer than its budget; --quick is the CPU mode",
              flush=True)
    return args


def run_item(args) -> None:
    """Child mode: one item, its results written to --item-out as it goes."""
    module = importlib.import_module(ITEMS[args.item][0])
    args.context = json.loads(args.context)
    if args.device == "cpu":
        import torch

        # as Ray's workers run (OMP_NUM_THREADS=1): like for like, and OpenMP threads that wait on each
        # other on a loaded machine cost seconds a step
        torch.set_num_threads(1)
    result = ItemResult(args.item_out)
    result.timed("start-up (fork, imports)", processes.seconds_since_requested())
    start = time.perf_counter()
    module.run(result, profile(args.quick), args)
    print(f"{args.item}: done in {time.perf_counter() - start:.1f} s", flush=True)


# Quick mode's Ray: a single local node has no preemption to watch (a watcher actor per TorchTrainer run), and
# the controller's poll every 0.5 s instead of 2 s ends a run of a few steps seconds sooner (both read by Ray
# Train from the driver's environment); no idle workers prestarted for the orchestrator's job, which runs no
# task. A full run keeps Ray's defaults.
QUICK_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
QUICK_RAY_SYSTEM = {"prestart_worker_first_driver": False}


def start_ray(args) -> str:
    import ray

    if args.quick:
        os.environ.update(QUICK_RAY_ENV)  # the item processes and Ray's own inherit it
    cpus = os.cpu_count() or 1
    # more logical CPUs than cores: train workers, read tasks and decoding tasks must not wait on each other
    # for a slot (docs/architecture.md, "Ray resources"); the stream item decodes on all cores but two
    ray.init(address="local", num_cpus=max(8, cpus + 2), include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=(512 << 20) if args.quick else 8 << 30,
             **({"_system_config": QUICK_RAY_SYSTEM} if args.quick else {}))
    return ray.get_runtime_context().gcs_address


def child_argv(args, name: str, out: Path, context: dict) -> list[str]:
    """The arguments of `main` in an item's process."""
    argv = ["--device", args.device, "--workdir", args.workdir, "--item", name, "--item-out", str(out),
            "--context", json.dumps(context)]
    if args.quick:
        argv.append("--quick")
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    if args.pose_model:
        argv += ["--pose-model", args.pose_model]
    return argv


def item_main(argv: list[str]) -> None:
    """An item's process (forked by bench/gpu_items/processes.py): main(argv), whose status it exits with."""
    sys.exit(main(argv))


def item_target(args, name: str, out: Path, context: dict) -> tuple:
    """What an item's process runs: (function, its arguments)."""
    return item_main, (child_argv(args, name, out, context),)


def run_one(args, name: str, limit: float, context: dict, logs: Path) -> dict:
    out = logs / f"{name}.json"
    out.unlink(missing_ok=True)
    log = logs / f"{name}.log"
    start = time.perf_counter()
    target, target_args = item_target(args, name, out, context)
    process = processes.start(target, target_args, log, env=dict(os.environ))
    process.join(limit)
    if process.exitcode is None:
        processes.stop(process)
        status = f"TIMEOUT: stopped at its limit of {limit:.0f} s"
    elif processes.stopping():
        status = "STOPPED: the check was interrupted"
    else:
        code = process.exitcode
        status = "ok" if code == 0 else f"error (exit {code}): {last_line(log)}"
    result = json.loads(out.read_text()) if out.exists() else {"rows": [], "checks": []}
    result.update(status=status, seconds=time.perf_counter() - start, limit_s=limit, log=str(log))
    return result


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else "(no output)"


def cell(key: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if key in ("mfu",) or key.endswith("share"):
            return f"{value:.1%}"
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def print_table(name: str, result: dict) -> None:
    print(f"\n[{name}] {result['status']} ({result['seconds']:.0f} s of {result['limit_s']:.0f} s)",
          flush=True)
    rows = result["rows"]
    if rows:
        keys = [k for row in rows for k in row if k != "name"]
        keys = list(dict.fromkeys(keys))
        width = max(len(row["name"]) for row in rows) + 2
        cells = [[cell(k, row.get(k)) for k in keys] for row in rows]
        widths = [max(len(k), *(len(c[i]) for c in cells)) + 2 for i, k in enumerate(keys)]
        print(f"{'':<{width}}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths, strict=True)))
        for row, line in zip(rows, cells, strict=True):
            print(f"{row['name']:<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(line, widths, strict=True)))
    for check in result["checks"]:
        print(f"  {check['name']}: {check['value']} (goal {check['goal']}): {check['verdict']}")
    if result.get("phases"):
        print("  time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["phases"].items()))
    sys.stdout.flush()


def failed(result: dict) -> bool:
    return result["status"] != "ok" or any(c["verdict"].startswith("FAIL") for c in result["checks"])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.item:
        run_item(args)
        return 0
    import ray
    import torch

    budget = args.budget or (QUICK_BUDGET_S if args.quick else FULL_BUDGET_S)
    names = args.only or list(ITEMS)
    logs = Path(args.out).resolve().parent / "gpu_check-logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"GPU check ({'quick' if args.quick else 'full'}) on {device}, budget {budget:.0f} s", flush=True)
    os.environ[RAY_ADDRESS] = start_ray(args)
    # the items' template process imports Ray after its start (ray.init sets variables, such as
    # RAY_AUTH_MODE, that Ray reads when it is imported): a template started before cannot connect
    processes.prepare()
    ray_start_s = time.perf_counter() - started
    print(f"Ray started in {ray_start_s:.1f} s", flush=True)
    results, context = {}, {}

    def run_lane(lane: list[str]) -> None:
        for name in lane:
            module, full_limit, quick_limit, needs_data = ITEMS[name]
            left = budget - (time.perf_counter() - started)
            limit = min(quick_limit if args.quick else full_limit, left)
            if needs_data and "shards" not in context:
                results[name] = skipped("not run: the data item gave no data set")
            elif limit < MIN_ITEM_S:
                results[name] = skipped(f"not run: {left:.0f} s of the budget left")
            else:
                results[name] = run_one(args, name, limit, context, logs)
            context.update({key: value for key, value in results[name].items()
                            if key in ("shards", "step_frames_per_s")})
            with PRINTING:
                print_table(name, results[name])

    pool, interrupted = None, False
    try:
        if "data" not in names and any(ITEMS[name][3] for name in names):
            context["shards"] = prepare_data(args, logs, budget - (time.perf_counter() - started))
        run_lane([name for name in names if name == "data"])
        rest = [name for name in names if name != "data"]
        if args.quick:  # two lanes at once, each item under its own limit as in a full run
            lanes = [[name for name in rest if name not in QUICK_ALONGSIDE],
                     [name for name in rest if name in QUICK_ALONGSIDE]]
            pool = ThreadPoolExecutor(len(lanes))
            for lane in [pool.submit(run_lane, lane) for lane in lanes]:
                lane.result()
        else:
            run_lane(rest)
    except KeyboardInterrupt:  # Ctrl-C: what the items measured so far is still written and printed
        interrupted = True
    finally:
        processes.stop_all()  # the items still running (each in a session of its own), and no more
        if pool is not None:
            pool.shutdown(wait=True)  # the lanes end as their items stop
        ray.shutdown()
    results = {name: results[name] for name in names if name in results}  # in the items' order
    total = time.perf_counter() - started
    bad = [name for name, result in results.items() if failed(result)]
    summary = {"device": device, "profile": profile(args.quick).to_dict(), "budget_s": budget,
               "seconds": total, "ray_start_s": ray_start_s, "items": results, "failed": bad}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nchecks, {total:.0f} s in all (budget {budget:.0f} s):")
    for name, result in results.items():
        for check in result["checks"]:
            print(f"  {name:<12}{check['name']:<58}{check['value']:>12}  goal {check['goal']:<13} "
                  f"{check['verdict']}")
        if result["status"] != "ok":
            print(f"  {name:<12}{result['status']}")
    if interrupted:
        ran = ", ".join(results) or "none"
        print(f"INTERRUPTED (Ctrl-C): the running items were stopped; items with a result: {ran}")
    else:
        print(("FAILED: " + ", ".join(bad)) if bad else "all items ran; no check failed")
    print(f"wrote {out}")
    return 130 if interrupted else 1 if bad else 0


def prepare_data(args, logs: Path, left: float) -> str:
    """The data item's shards when --only left it out (the items that read them still need them)."""
    result = run_one(args, "data", min(ITEMS["data"][1 if not args.quick else 2], left), {}, logs)
    if "shards" not in result:
        raise SystemExit(f"bench/gpu_check.py: the data set could not be prepared ({result['status']}); "
                         f"see {result['log']}")
    return result["shards"]


def skipped(why: str) -> dict:
    return {"status": why, "rows": [], "checks": [], "seconds": 0.0, "limit_s": 0.0}


if __name__ == "__main__":
    # under its package name, so that the function an item's process runs (item_main) pickles by reference
    # into the process that forks it
    sys.exit(importlib.import_module("bench.gpu_check").main())
