"""Benchmark (issue 32, "Measure and report"): what losing a node costs an elastic run, and what resuming a
2-worker ZeRO checkpoint on another number of workers costs. Real runs on this host: two `ray start` nodes on
127.0.0.1 (bench/multinode_cluster.py, the cluster of tests/test_multinode.py), one train worker per node
(train.worker_resource=trainer), the tiny model of the tests on their synthetic set, storage in a local
folder (both nodes share this host's disk).

runs:   (a) an elastic run (train.min_workers=1, num_workers=2) to the end, then its test mAP;
        (b) the same run and seed, the second node SIGKILLed (its `ray start`, raylet and workers, by process
            id) once a report reaches --kill-at; the node does not return, the run ends on one worker.
            Iterations lost: the iteration rank 0 (on the head) had printed at the kill minus the last
            checkpoint's (every report carries one: every train.checkpoint_every and at every epoch's end);
            recovery: seconds from the kill to the first report of the one-worker group; its test mAP.
resume: a ZeRO 1 and a ZeRO 2 checkpoint written by 2 DeepSpeed ranks (gloo, CPU; the code path of
        tests/test_checkpoint_world_size.py) loaded by 1, 2 and 3 ranks: seconds of load_checkpoint and
        seconds from the start of the load to the end of the first optimiser step after it.

    python bench/node_loss.py                      # both parts, JSON in bench/results/node_loss.json
    python bench/node_loss.py --parts resume
"""

import argparse
import json
import multiprocessing
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multinode_cluster import Cluster, alive_nodes, cluster_env, free_port, wait_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# the tiny settings of tests/test_train.py
OVERRIDES = [
    "model.backbone=tiny", "model.feature_dim=32", "model.pose_source=keypoints",
    "data.seq_len=2", "data.height=32", "data.width=16", "data.identities_per_batch=2",
    "data.clips_per_identity=2", "data.decode_concurrency=1", "train.lr=0.01",
]
TINY = ["model.backbone=tiny", "model.feature_dim=16", "data.seq_len=2", "data.height=32", "data.width=16",
        "data.identities_per_batch=2", "data.clips_per_identity=2"]


# ------------------------------------------------------------------------------------------ node loss runs

def _report_log_class():
    from ray.train import UserCallback

    class ReportLog(UserCallback):
        """In the controller: every report's time, iteration, workers and whether it carried a checkpoint."""

        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics:
                with open(self.path, "a") as out:
                    out.write(json.dumps({"time": time.time(), "iteration": metrics[0]["iteration"],
                                          "workers": metrics[0]["workers"],
                                          "checkpoint": checkpoint is not None}) + "\n")

    return ReportLog


def worker_logs(nodes: Cluster) -> dict[Path, int]:
    """The head session's worker logs -> their sizes now."""
    return {file: file.stat().st_size for file in Path(nodes.temp_dir).glob("session_*/logs/worker-*.out")}


def last_progress_iteration(nodes: Cluster, since: dict[Path, int]) -> int:
    """The highest `iteration N/M` progress line (train.log_every=1, printed by rank 0) written to the head
    session's worker logs after `since`: the step the run had reached (rank 0 runs on the head node)."""
    found = []
    for file in worker_logs(nodes):
        with open(file, "rb") as log:
            log.seek(since.get(file, 0))
            text = log.read().decode(errors="replace")
        found += [int(match) for match in re.findall(r"^iteration (\d+)/", text, flags=re.M)]
    return max(found, default=0)


def reports(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def shards(args, root: Path) -> str:
    from stal_ray.data.prepared.shards import write_shards
    from stal_ray.data.releases.mars import read_mars
    from stal_ray.data.synthetic.generator import write_synthetic_release

    release = write_synthetic_release(str(root / "release"), identities=args.identities,
                                      test_identities=args.test_identities, cameras=2,
                                      tracklets_per_identity=(2, 3), frames_per_tracklet=(4, 8),
                                      height=32, width=16, junk_tracklets=1, distractor_tracklets=1)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False)
    return out


def test_map(result, data: str, out_dir: str) -> float:
    from stal_ray.evaluate.evaluate import evaluate

    return evaluate(result.model_path, data, out_dir)["modes"]["stal"]["mAP"]


def node_loss(args, tmp: Path) -> dict:
    import ray

    from stal_ray.config import load_config
    from stal_ray.train.trainer import train

    data = shards(args, tmp)
    env = cluster_env()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
    nodes = Cluster(tmp, env)
    report_log = _report_log_class()
    out: dict = {"iterations": args.iterations, "checkpoint_every": args.checkpoint_every, "seed": args.seed,
                 "identities": args.identities, "test_identities": args.test_identities}
    try:
        nodes.wait_for_head()
        nodes.start_second()
        ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
        wait_for(lambda: alive_nodes(ray) == 2, 120, "the second node to join")

        def config():
            return load_config(None, OVERRIDES + [
                f"train.storage_path={tmp}/runs", "train.num_workers=2", "train.min_workers=1",
                "train.worker_resource=trainer", f"train.checkpoint_every={args.checkpoint_every}",
                "train.log_every=1", f"train.iterations={args.iterations}", "train.max_failures=3",
                f"train.seed={args.seed}"])

        # (a) uninterrupted
        log_a = tmp / "a.jsonl"
        started = time.time()
        result = train(config(), data, name="uninterrupted", callbacks=[report_log(str(log_a))])
        out["a_train_s"] = time.time() - started
        out["a_workers"] = sorted({r["workers"] for r in reports(log_a)})
        out["a_final_iteration"] = result.metrics.get("iteration")
        out["a_mAP"] = test_map(result, data, f"{tmp}/eval-a")
        print(f"(a) done: {out}", flush=True)
        if args.repeat:
            # the same run again: how far two uninterrupted runs of one seed differ (Ray Data's order)
            result = train(config(), data, name="uninterrupted-again",
                           callbacks=[report_log(str(tmp / "a2.jsonl"))])
            out["a_again_mAP"] = test_map(result, data, f"{tmp}/eval-a2")

        # (b) the second node killed mid-run
        log_b = tmp / "b.jsonl"
        outcome: dict = {}

        def run():
            try:
                outcome["result"] = train(config(), data, name="interrupted",
                                          callbacks=[report_log(str(log_b))])
            except BaseException as error:  # noqa: BLE001 (handed to the main thread)
                outcome["error"] = error

        logs_of_a = worker_logs(nodes)
        thread = threading.Thread(target=run, daemon=True)
        started = time.time()
        thread.start()
        # killed by rank 0's progress line, not at a report: a report carries a checkpoint, so a kill just
        # after one would lose nothing
        wait_for(lambda: last_progress_iteration(nodes, logs_of_a) >= args.kill_at
                 or "error" in outcome, 600, f"rank 0 to reach iteration {args.kill_at}")
        if "error" in outcome:
            raise outcome["error"]
        killed_at = time.time()
        before = reports(log_b)
        killed = nodes.kill_second()
        reached = last_progress_iteration(nodes, logs_of_a)
        wait_for(lambda: any(r["workers"] == 1 for r in reports(log_b)) or "error" in outcome, 600,
                 "a report of the one-worker group")
        thread.join(timeout=1200)
        if "error" in outcome:
            raise outcome["error"]
        out["b_train_s"] = time.time() - started
        after = [r for r in reports(log_b) if r["time"] > killed_at]
        first = next(r for r in after if r["workers"] == 1)
        last_checkpoint = max((r["iteration"] for r in before if r["checkpoint"]), default=0)
        out.update(
            b_killed_processes=len(killed),
            b_last_report_before_kill=before[-1]["iteration"],
            b_iteration_at_kill=reached,
            b_last_checkpoint=last_checkpoint,
            b_iterations_lost=reached - last_checkpoint,
            b_first_iteration_after=first["iteration"],
            b_recovery_s=first["time"] - killed_at,
            b_reports_of_two_after_kill=sum(1 for r in after if r["workers"] == 2),
            b_final_iteration=outcome["result"].metrics.get("iteration"),
            b_mAP=test_map(outcome["result"], data, f"{tmp}/eval-b"),
        )
        out["mAP_difference"] = out["b_mAP"] - out["a_mAP"]
        return out
    finally:
        ray.shutdown()
        nodes.stop()


# ---------------------------------------------------------------------------------- resume at another size

def _rank(rank: int, world: int, port: int, zero_stage: int, directory: str, mode: str, out: str) -> None:
    """One DeepSpeed rank (as tests/test_checkpoint_world_size.py): 'save' trains 3 steps and saves; 'load'
    times load_checkpoint and the first step after it, written to `out` by rank 0."""
    os.environ.update(LOCAL_RANK="0", RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    import torch
    import torch.distributed as dist

    from stal_ray.config import load_config
    from stal_ray.model.stal import STAL
    from stal_ray.objective import STALObjective
    from stal_ray.train.checkpoints import load_checkpoint
    from stal_ray.train.deepspeed import build_engine, skip_shared_memory_kernel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    skip_shared_memory_kernel()  # as build_engine does on CPU: no 20-40 s kernel build per new venv
    deepspeed.init_distributed("gloo", dist_init_required=False)
    config = load_config(None, TINY + [f"train.zero_stage={zero_stage}", "train.lr=0.1"])
    torch.manual_seed(0)
    engine, _ = build_engine(STAL.from_config(config, num_classes=4), config, on_gpu=False)
    objective = STALObjective.from_config(config)
    generator = torch.Generator().manual_seed(rank)

    def step():
        clips = torch.randn(4, 2, 3, 32, 16, generator=generator)
        labels = torch.tensor([0, 0, 1 + rank % 3, 1 + rank % 3])
        engine.backward(objective(engine(clips, None), labels, None).total)
        engine.step()

    if mode == "save":
        for _ in range(3):
            step()
        engine.save_checkpoint(directory, tag="engine", client_state={"loop_state": {"step": 3}})
    else:
        dist.barrier()
        started = time.perf_counter()
        load_checkpoint(engine, directory, tag="engine")
        loaded = time.perf_counter()
        step()
        dist.barrier()
        stepped = time.perf_counter()
        if rank == 0:
            Path(out).write_text(json.dumps({"load_s": loaded - started, "first_step_s": stepped - started}))
    dist.barrier()
    dist.destroy_process_group()


def _ranks(world: int, zero_stage: int, directory: Path, mode: str, out: Path) -> None:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_rank, args=(rank, world, port, zero_stage, str(directory), mode,
                                                     str(out))) for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    if [process.exitcode for process in processes] != [0] * world:
        raise RuntimeError(f"{mode} on {world} ranks (ZeRO {zero_stage}) failed")


def resume(tmp: Path) -> list[dict]:
    rows = []
    for zero_stage in (1, 2):
        directory = tmp / f"zero{zero_stage}"
        _ranks(2, zero_stage, directory, "save", tmp / "unused")
        for world in (2, 1, 3):
            out = tmp / f"resume-{zero_stage}-{world}.json"
            _ranks(world, zero_stage, directory, "load", out)
            rows.append({"zero_stage": zero_stage, "saved_by": 2, "workers": world,
                         **json.loads(out.read_text())})
            print(f"resume: {rows[-1]}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------- main

def table(results: dict) -> str:
    lines = []
    runs = results.get("node_loss")
    if runs:
        lines += [f"node loss (2 nodes on 127.0.0.1, seed {runs['seed']}, {runs['iterations']} iterations, "
                  f"{runs['identities']}+{runs['test_identities']} synthetic identities, "
                  f"checkpoint every {runs['checkpoint_every']}):",
                  f"  (a) uninterrupted   train {runs['a_train_s']:7.1f} s   workers {runs['a_workers']}   "
                  f"test mAP {runs['a_mAP']:.4f}",
                  *([f"      the same run again: test mAP {runs['a_again_mAP']:.4f} "
                     f"({runs['a_again_mAP'] - runs['a_mAP']:+.4f})"] if "a_again_mAP" in runs else []),
                  f"  (b) node killed     train {runs['b_train_s']:7.1f} s   test mAP {runs['b_mAP']:.4f}   "
                  f"mAP (b) - (a) {runs['mAP_difference']:+.4f}",
                  f"      killed {runs['b_killed_processes']} processes at iteration "
                  f"{runs['b_iteration_at_kill']} (rank 0's progress line); "
                  f"last checkpoint {runs['b_last_checkpoint']}: "
                  f"{runs['b_iterations_lost']} iterations lost",
                  f"      first one-worker report: iteration {runs['b_first_iteration_after']}, "
                  f"{runs['b_recovery_s']:.1f} s after the kill; final iteration {runs['b_final_iteration']}"]
    rows = results.get("resume")
    if rows:
        lines += ["resume of a 2-worker ZeRO checkpoint (DeepSpeed ranks on gloo, CPU):",
                  "  zero  workers  load_s  load+first_step_s"]
        lines += [f"  {r['zero_stage']:4d}  {r['workers']:7d}  {r['load_s']:6.2f}  {r['first_step_s']:17.2f}"
                  for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("runs", "resume"), default=["runs", "resume"])
    parser.add_argument("--iterations", type=int, default=80)
    parser.add_argument("--kill-at", type=int, default=30, help="kill once rank 0 reaches this iteration")
    parser.add_argument("--identities", type=int, default=8, help="training identities of the synthetic set")
    parser.add_argument("--test-identities", type=int, default=8)
    parser.add_argument("--no-repeat", dest="repeat", action="store_false",
                        help="skip the second uninterrupted run (the mAP difference between two of them)")
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "node_loss.json"))
    args = parser.parse_args()
    results: dict = {"host_cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="node-loss-") as tmp:
        if "resume" in args.parts:
            (Path(tmp) / "resume").mkdir()
            results["resume"] = resume(Path(tmp) / "resume")
        if "runs" in args.parts:
            (Path(tmp) / "runs").mkdir()
            results["node_loss"] = node_loss(args, Path(tmp) / "runs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(args.out)


if __name__ == "__main__":
    main()
