"""Item `stream` of bench/gpu_check.py: the Ray Data training stream into the GPU.

1. Normalisation on the device: the same P groups collated as uint8 clips, moved and normalised on the
   device (train/loop.py's model_input), and as the CPU's float clips (data/batches.py, normalize=True):
   torch.equal, for both backbones' preprocessing (ImageNet RGB, Caffe BGR).
2. Supply: one epoch over a third of the training identities, uint8 batches, decoding tasks on all but two
   of the machine's CPUs: frames/s, against the frames/s the train item's step consumes (goal: >= 1x).
3. Demand: a training run fed by the stream (train/trainer.py's TorchTrainer, the stream config's model, bf16
   on a GPU) for the profile's iterations, reporting twice: the first window pays the stream's start
   (planning, first reads, worker start), paid once per epoch (~2000 iterations on MARS); the second is the
   steady state, where the goal is: data wait < 5% of the step time.
"""

import os
import tempfile
import time

import torch

from bench.gpu_items.common import ItemResult, Profile, connect_ray, training_reports, verdict

DATA_WAIT_GOAL = 0.05


def stream_config(profile: Profile, device: torch.device, overrides=()):
    from stal_ray.config import load_config

    decoders = max(2, (os.cpu_count() or 1) - 2)
    precision = "bf16" if device.type == "cuda" else "fp32"
    return load_config(profile.stream_config, ["model.pretrained=none", f"train.precision={precision}",
                                               f"data.decode_concurrency={decoders}", *overrides])


def normalisation_equal(shards: str, config, device: torch.device) -> dict[str, bool]:
    """{preprocess name: device-normalised uint8 clips == CPU float clips} on the stream's first P groups."""
    import numpy as np

    from stal_ray.core.preprocess import CAFFE_BGR, IMAGENET
    from stal_ray.data.stream.batches import TrainingBatches
    from stal_ray.data.stream.pipeline import training_dataset
    from stal_ray.train.loop import model_input

    p = config.data.identities_per_batch
    dataset = training_dataset(shards, config, epoch=0).limit(p)
    blocks = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    rows = {key: np.concatenate([block[key] for block in blocks]) for key in blocks[0]}
    groups = [{key: value[i] for key, value in rows.items()} for i in range(len(rows["label"]))]
    equal = {}
    for name, preprocess in (("ImageNet RGB", IMAGENET), ("Caffe BGR", CAFFE_BGR)):
        on_cpu = TrainingBatches(None, p, preprocess=preprocess, normalize=True)._collate(groups)["clips"]
        as_uint8 = TrainingBatches(None, p, preprocess=preprocess, normalize=False)
        on_device = model_input(as_uint8._collate(groups)["clips"], as_uint8, device, torch.float32)
        equal[name] = bool(torch.equal(on_device.cpu(), on_cpu))
    return equal


def supply(shards: str, config) -> dict:
    """Frames/s of one epoch of uint8 batches over a third of the training identities."""
    from stal_ray.data.stream.batches import training_batches
    from stal_ray.data.stream.pipeline import identity_labels, training_dataset

    identities = identity_labels(shards)
    excluded = identities[max(config.data.identities_per_batch * 2, len(identities) // 3):]
    start = time.perf_counter()
    batches = training_batches(training_dataset(shards, config, epoch=0, exclude_identities=excluded),
                               config.data.identities_per_batch, seed=0, normalize=False)
    frames = sum(batch["clips"].shape[0] * config.data.seq_len for batch in batches)
    seconds = time.perf_counter() - start
    return {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds,
            "identities": len(identities) - len(excluded)}


def fed_run(shards: str, profile: Profile, device: torch.device) -> list[dict]:
    """The reports of a TorchTrainer run fed by the stream: one per window of iterations."""
    from stal_ray.train.trainer import build_trainer

    n = profile.fed_iterations
    config = stream_config(profile, device, [
        f"train.iterations={n}", f"train.checkpoint_every={max(1, n // 2)}", "train.num_workers=1",
        f"train.use_gpu={'true' if device.type == 'cuda' else 'false'}", "train.keep_checkpoints=10",
        f"train.storage_path={tempfile.mkdtemp(prefix='gpu-check-fed-')}"])
    return training_reports(build_trainer(config, shards, name="fed"))


def run(result: ItemResult, profile: Profile, args) -> None:
    device = torch.device(args.device)
    shards = args.context["shards"]
    config = stream_config(profile, device)
    with result.phase("Ray connection"):
        connect_ray()
    with result.phase("normalisation"):
        equal = normalisation_equal(shards, config, device)
    for name, same in equal.items():
        result.check(f"uint8 normalised on {device.type} == CPU float ({name})",
                     "equal" if same else "differ", "torch.equal", verdict(same))
    data = config.data
    with result.phase("stream alone"):
        supplied = supply(shards, config)
    result.row(name=f"stream alone, {data.decode_concurrency} decoding tasks, {data.height}x{data.width}",
               frames=supplied["frames"], seconds=supplied["seconds"], frames_per_s=supplied["frames_per_s"])
    consumed = args.context.get("step_frames_per_s")
    if consumed:
        ratio = supplied["frames_per_s"] / consumed
        result.row(name="the step's consumption (train item, under Ray Train)", frames_per_s=consumed)
        result.check("stream frames/s over the step's", f"{ratio:.2f}x", ">= 1x",
                     verdict(ratio >= 1) if device.type == "cuda" else "n/a on cpu")
    with result.phase("fed run (TorchTrainer)"):
        reports = fed_run(shards, profile, device)
    for index, report in enumerate(reports):
        window = "first window (stream start)" if index == 0 else "steady window"
        result.row(name=f"fed run, {window}", iteration=int(report["iteration"]),
                   epoch=int(report["epoch"]), frames_per_s=report["clips_per_s"] * data.seq_len,
                   data_wait_share=report["data_wait_share"],
                   run_data_wait_share=report["data_wait_share_run"])
    epochs = {int(report["epoch"]) for report in reports}
    if len(reports) < 2:
        result.check("data wait, steady window", "-", f"< {DATA_WAIT_GOAL:.0%}",
                     "FAIL: the run reported once")
        return
    steady = reports[-1]["data_wait_share"]
    note = "" if len(epochs) == 1 else " (an epoch ended inside the run: its start is in the window)"
    result.check("data wait, steady window" + note, f"{steady:.1%}", f"< {DATA_WAIT_GOAL:.0%}",
                 verdict(steady < DATA_WAIT_GOAL) if device.type == "cuda" else "n/a on cpu")
