"""Benchmark: a STAL training step under Ray Train + DeepSpeed against a plain PyTorch loop, same run.

1. Overhead: the same model, batch (already in memory) and optimiser, stepped (a) in this process by plain
   PyTorch (forward, Eq. 3 objective, backward, SGD step) and (b) inside a one-worker TorchTrainer through
   the DeepSpeed engine that training uses. Goal: (b) / (a) <= 1.10.
2. Data wait: the real training loop fed by the Ray Data stream; the share of the whole run's step time
   spent waiting for the next batch (data_wait_share_run, epoch starts included). Every epoch starts a new
   Ray Data execution (planning, read tasks, decoding actors, the shuffle buffer): a few seconds, paid once
   per epoch. A MARS epoch is ~2000 iterations of the paper's batch; the embedded synthetic set's is ~28 of
   the tiny config's, so it pays that start every 28 steps. The goal (< 5%) is checked on a synthetic set
   with long epochs (--long-identities, ~500 iterations each, still 4x shorter than MARS's); the embedded
   set's share is printed too.

    python bench/train.py --backbone tiny --steps 30
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stal_ray.config import load_config  # noqa: E402
from stal_ray.data.source import resolve_data  # noqa: E402
from stal_ray.data.synthetic.generator import ensure_synthetic_shards  # noqa: E402
from stal_ray.model.stal import STAL  # noqa: E402
from stal_ray.objective import STALObjective  # noqa: E402
from stal_ray.train.deepspeed import build_engine  # noqa: E402
from stal_ray.train.optimizer import build_optimizer  # noqa: E402
from stal_ray.train.trainer import train  # noqa: E402

OVERHEAD_GOAL, DATA_WAIT_GOAL = 1.10, 0.05


def fixed_batch(config, num_classes: int):
    torch.manual_seed(0)
    data = config.data
    clips = data.identities_per_batch * data.clips_per_identity
    images = torch.randn(clips, data.seq_len, 3, data.height, data.width)
    labels = torch.arange(data.identities_per_batch).repeat_interleave(data.clips_per_identity) % num_classes
    # joints anywhere in the frame, fully confident: what a `keypoints` pose source reads with every clip
    keypoints = torch.rand(clips, data.seq_len, 14, 3) * torch.tensor([data.width, data.height, 0.0])
    keypoints[..., 2] = 1.0
    return images, labels, keypoints


def step_times(step, steps: int) -> list[float]:
    step()  # warm-up: allocations, DeepSpeed's first-step set-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def plain_steps(config, num_classes: int, steps: int) -> list[float]:
    model = STAL.from_config(config, num_classes)
    objective = STALObjective.from_config(config)
    optimizer, scheduler = build_optimizer(model, config)
    clips, labels, keypoints = fixed_batch(config, num_classes)

    def step():
        optimizer.zero_grad(set_to_none=True)
        objective(model(clips, keypoints), labels, keypoints).total.backward()
        optimizer.step()
        scheduler.step()

    return step_times(step, steps)


def deepspeed_worker(loop_config: dict) -> None:
    from stal_ray.config import config_from_dict

    config = config_from_dict(loop_config["config"])
    num_classes, steps = loop_config["num_classes"], loop_config["steps"]
    model = STAL.from_config(config, num_classes)
    objective = STALObjective.from_config(config)
    engine, _ = build_engine(model, config, on_gpu=False)
    clips, labels, keypoints = fixed_batch(config, num_classes)

    def step():
        loss = objective(engine(clips, keypoints), labels, keypoints).total
        engine.backward(loss)
        engine.step()

    times = step_times(step, steps)
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "times.json").write_text(json.dumps(times))
        ray.train.report({"median": statistics.median(times)},
                         checkpoint=ray.train.Checkpoint.from_directory(directory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic_tiny.yaml")
    parser.add_argument("--backbone", default=None, help="override model.backbone")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both loops (same for both)")
    parser.add_argument("--long-identities", type=int, default=300,
                        help="training identities of the long-epoch data set")
    parser.add_argument("--long-iterations", type=int, default=600,
                        help="iterations fed from the long-epoch data set (past one epoch's end)")
    parser.add_argument("--out", default="bench/results/train.json")
    args = parser.parse_args()
    overrides = [f"model.backbone={args.backbone}"] if args.backbone else []
    config = load_config(args.config, overrides)
    num_classes = 24
    torch.set_num_threads(args.threads)
    storage = tempfile.mkdtemp(prefix="bench-train-")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    ray.data.DataContext.get_current().enable_progress_bars = False

    plain = statistics.median(plain_steps(config, num_classes, args.steps))
    trainer = TorchTrainer(
        deepspeed_worker,
        train_loop_config={"config": config.to_dict(), "num_classes": num_classes, "steps": args.steps},
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(name="overhead", storage_path=storage))
    under_ray = trainer.fit().metrics["median"]

    def fed_run(data: str, iterations: int, name: str) -> dict:
        fed = load_config(args.config, overrides + [f"train.storage_path={storage}",
                                                    f"train.iterations={iterations}",
                                                    f"train.checkpoint_every={iterations}"])
        metrics = train(fed, data, name=name).metrics
        # epochs started: every one began with a new Ray Data execution
        return {"share": metrics["data_wait_share_run"], "iterations": iterations,
                "epochs": metrics["epoch"] + 1, "clips_per_s": metrics["clips_per_s"]}

    short = fed_run(resolve_data(None).uri, args.steps * 3, "data-wait-embedded")
    long_data = ensure_synthetic_shards(identities=args.long_identities, test_identities=4,
                                        frames_per_tracklet=(10, 24))
    long = fed_run(long_data, args.long_iterations, "data-wait-long-epochs")
    data_wait = long["share"]
    ratio = under_ray / plain

    overhead_ok, wait_ok = ratio <= OVERHEAD_GOAL, data_wait < DATA_WAIT_GOAL
    rows = [("plain PyTorch step", f"{plain * 1e3:9.1f} ms"),
            ("TorchTrainer + DeepSpeed step", f"{under_ray * 1e3:9.1f} ms"),
            ("overhead ratio", f"{ratio:9.3f}  goal <= {OVERHEAD_GOAL}: {'PASS' if overhead_ok else 'FAIL'}"),
            ("data wait, embedded set",
             f"{short['share']:9.1%}  {short['iterations']} iterations, {short['epochs']} epochs started"),
            ("data wait, long epochs",
             f"{data_wait:9.1%}  {long['iterations']} iterations, {long['epochs']} epochs started; goal < "
             f"{DATA_WAIT_GOAL:.0%}: {'PASS' if wait_ok else 'FAIL'}")]
    print(f"backbone {config.model.backbone}, batch {config.data.identities_per_batch}x"
          f"{config.data.clips_per_identity} clips of {config.data.seq_len} frames "
          f"{config.data.height}x{config.data.width}, {args.steps} steps, {args.threads} torch thread(s)")
    for name, value in rows:
        print(f"  {name:42s}{value}")
    result = {"backbone": config.model.backbone, "steps": args.steps, "threads": args.threads,
              "plain_step_s": plain, "deepspeed_step_s": under_ray, "overhead_ratio": ratio,
              "overhead_pass": overhead_ok, "data_wait_embedded": short, "data_wait_long_epochs": long,
              "data_wait_share": data_wait, "data_wait_pass": wait_ok}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
