"""Item `train` of bench/gpu_check.py: the training step of each backbone at its MARS config's batch (P x K
clips of T frames, bf16 on a GPU), plain PyTorch in this process and through the DeepSpeed engine in a
one-worker TorchTrainer (the path train/loop.py takes), on one batch already on the device.

Per backbone and path: step time, clips/s, frames/s, peak device memory and MFU: the step's FLOPs, counted
once with torch's FlopCounterMode as bench/model.py counts them (each convolution gradient costs its
forward), over the device's dense bf16 peak. Goals: MFU >= 40% for ResNet-50 under Ray Train; the
TorchTrainer + DeepSpeed step within 1.10x of the plain one (bench/train.py's goal). Plain bf16 is
torch.autocast over fp32 weights; DeepSpeed's bf16 holds bf16 weights with fp32 master copies.
"""

import gc
import json
import threading
import time
from pathlib import Path

import torch

from bench.gpu_items.common import (
    ItemResult,
    Profile,
    bf16_peak_flops,
    connect_ray,
    median,
    peak_memory_gib,
    step_times,
    verdict,
)

MFU_GOAL, OVERHEAD_GOAL = 0.40, 1.10
MFU_BACKBONE = "resnet50"
MARS_IDENTITIES = 625  # MARS's training identities: the classifier's outputs


def step_config(config_file: str, precision: str):
    from stal_ray.config import load_config

    # random weights on purpose: the ImageNet file changes no FLOP and no step time
    return load_config(config_file, ["model.pretrained=none", f"train.precision={precision}"])


def num_classes(config) -> int:
    return 24 if config.model.backbone == "tiny" else MARS_IDENTITIES


def fixed_batch(config, device: torch.device, dtype: torch.dtype):
    """One P x K batch of random clips on the device, as the loop hands them to the model; keypoints only
    for the `keypoints` pose source (the MARS configs learn them: their batches carry none)."""
    generator = torch.Generator().manual_seed(0)
    data = config.data
    clips = data.identities_per_batch * data.clips_per_identity
    images = torch.randn(clips, data.seq_len, 3, data.height, data.width, generator=generator)
    labels = torch.arange(data.identities_per_batch).repeat_interleave(data.clips_per_identity)
    keypoints = None
    if config.model.pose_source == "keypoints":
        keypoints = torch.rand(clips, data.seq_len, 14, 3, generator=generator)
        keypoints *= torch.tensor([data.width, data.height, 0.0])
        keypoints[..., 2] = 1.0
        keypoints = keypoints.to(device, dtype)
    return images.to(device, dtype), labels.to(device), keypoints


def step_flops(model, objective, clips, labels, keypoints, autocast) -> int:
    from bench.model import flops_of

    def step():
        with autocast():
            out = model(clips, keypoints)
        objective(out, labels, keypoints).total.backward()

    flops = flops_of(step)
    model.zero_grad(set_to_none=True)
    return flops


def plain(config, device: torch.device, profile: Profile) -> dict:
    """The plain PyTorch step: forward (autocast bf16 on a GPU), the objective in fp32, backward, SGD."""
    from stal_ray.model.stal import STAL
    from stal_ray.objective import STALObjective
    from stal_ray.train.optimizer import build_optimizer

    bf16 = config.train.precision == "bf16"
    torch.manual_seed(0)
    model = STAL.from_config(config, num_classes(config)).to(device).train()
    objective = STALObjective.from_config(config)
    optimizer, scheduler = build_optimizer(model, config)
    clips, labels, keypoints = fixed_batch(config, device, torch.float32)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    flops = step_flops(model, objective, clips, labels, keypoints, autocast)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = model(clips, keypoints)
        objective(out, labels, keypoints).total.backward()
        optimizer.step()
        scheduler.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = step_times(step, device, profile.steps, profile.warm_up)
    return {"step_s": median(times), "flops": flops, "peak_memory_gib": peak_memory_gib(device)}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ray_worker(loop_config: dict) -> None:
    """TorchTrainer worker: each backbone's step through build_engine (as train/loop.py builds it), one JSON
    line per backbone appended to loop_config['out'] as soon as it is measured."""
    import ray.train
    import ray.train.torch

    from stal_ray.config import config_from_dict
    from stal_ray.model.stal import STAL
    from stal_ray.objective import STALObjective
    from stal_ray.train.deepspeed import build_engine

    device = ray.train.torch.get_device()
    for entry in loop_config["entries"]:
        config = config_from_dict(entry)
        torch.manual_seed(0)
        model = STAL.from_config(config, num_classes(config)).to(device)
        objective = STALObjective.from_config(config)
        engine, _ = build_engine(model, config, on_gpu=device.type == "cuda")
        dtype = next(engine.module.parameters()).dtype
        clips, labels, keypoints = fixed_batch(config, device, dtype)

        def step(engine=engine, clips=clips, labels=labels, keypoints=keypoints, objective=objective):
            loss = objective(engine(clips, keypoints), labels, keypoints).total
            engine.backward(loss)
            engine.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = step_times(step, device, loop_config["steps"], loop_config["warm_up"])
        line = {"backbone": config.model.backbone, "step_s": median(times),
                "peak_memory_gib": peak_memory_gib(device), "dtype": str(dtype)}
        with open(loop_config["out"], "a") as out:
            out.write(json.dumps(line) + "\n")
        del engine, model, clips, step
        release(device)
    ray.train.report({"backbones": len(loop_config["entries"])})


def under_ray(configs: list, device: torch.device, profile: Profile, lines: Path, on_line) -> None:
    """All backbones in one TorchTrainer run (one worker start); on_line(dict) as each arrives."""
    import tempfile

    import ray.train
    from ray.train.torch import TorchTrainer

    lines.write_text("")
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config={"entries": [c.to_dict() for c in configs], "steps": profile.steps,
                           "warm_up": profile.warm_up, "out": str(lines)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=device.type == "cuda"),
        run_config=ray.train.RunConfig(name="gpu-check-step", storage_path=tempfile.mkdtemp(
            prefix="gpu-check-step-")))
    failure: list[BaseException] = []

    def fit():
        try:
            trainer.fit()
        except BaseException as error:  # noqa: BLE001 - re-raised in the item's thread below
            failure.append(error)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    seen = 0
    while thread.is_alive() or seen < len(lines.read_text().splitlines()):
        got = lines.read_text().splitlines()
        for line in got[seen:]:
            on_line(json.loads(line))
        seen = len(got)
        thread.join(timeout=1.0)
    if failure:
        raise failure[0]


def run(result: ItemResult, profile: Profile, args) -> None:
    device = torch.device(args.device)
    peak = bf16_peak_flops(device, args.peak_tflops)
    precision = "bf16" if device.type == "cuda" else "fp32"
    result.set(precision=precision, peak_flops=peak)
    configs, measured = [], {}
    for backbone, config_file in profile.backbones:
        config = step_config(config_file, precision)
        configs.append(config)
        data = config.data
        frames = data.identities_per_batch * data.clips_per_identity * data.seq_len
        start = time.perf_counter()
        with result.phase(f"{backbone}: plain steps"):
            measured[backbone] = {"frames": frames, "plain": plain(config, device, profile)}
        release(device)  # the plain model's memory, before the next one (and the Ray worker) on the device
        result.row(**row(backbone, "plain PyTorch", config, measured[backbone]["plain"],
                         measured[backbone]["plain"]["flops"], peak, time.perf_counter() - start))
        print(f"{backbone}: plain step measured in {time.perf_counter() - start:.1f} s", flush=True)

    def on_line(line: dict) -> None:
        backbone = line["backbone"]
        measured[backbone]["ray"] = line
        print(f"{backbone}: step under Ray Train measured", flush=True)
        config = configs[[b for b, _ in profile.backbones].index(backbone)]
        result.row(**row(backbone, "TorchTrainer + DeepSpeed", config, line,
                         measured[backbone]["plain"]["flops"], peak, None))
        if backbone == profile.backbones[0][0]:  # the stream item's model: what its stream must supply
            result.set(step_frames_per_s=result.data["rows"][-1]["frames_per_s"])

    with result.phase("Ray connection"):
        connect_ray()
    print("starting the TorchTrainer", flush=True)
    try:
        with result.phase("TorchTrainer run (worker start, DeepSpeed, steps)"):
            under_ray(configs, device, profile, Path(str(result.path) + ".ray.jsonl"), on_line)
    finally:  # a worker that failed on the second backbone still leaves the first one's verdicts
        goals(result, measured, device, peak)


def goals(result: ItemResult, measured: dict, device: torch.device, peak: float | None) -> None:
    for backbone, sizes in measured.items():
        if "ray" not in sizes:
            continue
        ratio = sizes["ray"]["step_s"] / sizes["plain"]["step_s"]
        result.check(f"{backbone}: TorchTrainer + DeepSpeed / plain step", f"{ratio:.3f}",
                     f"<= {OVERHEAD_GOAL}", verdict(ratio <= OVERHEAD_GOAL) if device.type == "cuda"
                     else "n/a on cpu")
    resnet = measured.get(MFU_BACKBONE, {}).get("ray")
    if resnet is not None and peak:
        mfu = measured[MFU_BACKBONE]["plain"]["flops"] / resnet["step_s"] / peak
        result.check("ResNet-50 step MFU (bf16, under Ray Train)", f"{mfu:.1%}", f">= {MFU_GOAL:.0%}",
                     verdict(mfu >= MFU_GOAL))
    elif device.type != "cuda":
        result.check("ResNet-50 step MFU (bf16, under Ray Train)", "-", f">= {MFU_GOAL:.0%}", "n/a on cpu")
    elif resnet is not None:
        result.check("ResNet-50 step MFU (bf16, under Ray Train)", "-", f">= {MFU_GOAL:.0%}",
                     "skipped: this GPU's bf16 peak is not in the table (pass --peak-tflops)")
    else:
        result.check("ResNet-50 step MFU (bf16, under Ray Train)", "-", f">= {MFU_GOAL:.0%}",
                     "n/a: no ResNet-50 in this profile (--quick)")


def row(backbone: str, path: str, config, measured: dict, flops: int, peak: float | None,
        seconds: float | None) -> dict:
    data = config.data
    clips = data.identities_per_batch * data.clips_per_identity
    step = measured["step_s"]
    return {"name": f"{backbone} {data.height}x{data.width}, {path}",
            "batch": f"{data.identities_per_batch}x{data.clips_per_identity}x{data.seq_len}",
            "step_ms": step * 1e3, "clips_per_s": clips / step, "frames_per_s": clips * data.seq_len / step,
            "peak_memory_gib": measured.get("peak_memory_gib"), "gflop_per_step": flops / 1e9,
            "mfu": flops / step / peak if peak else None, "seconds": seconds}
