"""Resuming never runs code planted in a checkpoint: every DeepSpeed file is read with weights_only=True."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port
from test_train import make_config, shards_uri  # noqa: F401 (shards_uri is a fixture)

from stal_ray.config import load_config
from stal_ray.model.stal import STAL
from stal_ray.train.checkpoints import UnsafeCheckpointError, load_checkpoint
from stal_ray.train.deepspeed import build_engine
from stal_ray.train.trainer import train


class Payload:
    """Unpickling runs `touch <marker>`: what an attacker who can write to the storage path would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by a pickle that would run a command when loaded with weights_only=False."""
    torch.save({"module": Payload(marker)}, path)


@pytest.fixture(scope="module")
def single_process_group():
    """torch.distributed of one process and the variables DeepSpeed reads (what Ray Train sets up for a
    worker), for DeepSpeed engines without Ray; one for the module, as DeepSpeed keeps the groups it made."""
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in dict(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                MASTER_PORT=str(port)).items():
            env.setenv(name, value)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


TINY = ["model.backbone=tiny", "model.feature_dim=16", "data.seq_len=2", "data.height=32", "data.width=16"]


def engine_for(zero_stage: int):
    config = load_config(None, TINY + [f"train.zero_stage={zero_stage}"])
    torch.manual_seed(0)
    return build_engine(STAL.from_config(config, num_classes=3), config, on_gpu=False)[0]


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_a_saved_checkpoint_loads_safely_and_a_planted_file_is_refused(single_process_group, tmp_path,
                                                                      zero_stage):
    engine = engine_for(zero_stage)
    engine.save_checkpoint(str(tmp_path), tag="engine", client_state={"loop_state": {"step": 7}})
    _, client_state = load_checkpoint(engine_for(zero_stage), str(tmp_path), tag="engine")
    assert client_state["loop_state"] == {"step": 7}
    files = sorted((tmp_path / "engine").glob("*.pt"))
    assert len(files) == (1 if zero_stage == 0 else 2)  # model states (+ ZeRO optimiser states)
    for file in files:
        original = file.read_bytes()
        marker = tmp_path / f"ran-{file.stem}"
        plant(file, marker)
        with pytest.raises(UnsafeCheckpointError, match=f"{file}: refused to load"):
            load_checkpoint(engine_for(zero_stage), str(tmp_path), tag="engine")
        assert not marker.exists(), f"the payload planted in {file.name} ran"
        file.write_bytes(original)


def test_resuming_from_a_planted_checkpoint_does_not_run_it(ray_cluster, shards_uri, tmp_path):  # noqa: F811
    """The attack of issue 15: a run folder's engine/mp_rank_00_model_states.pt replaced by a pickle whose
    __reduce__ runs a command; resuming that run (same name) must not run it, and must name the file."""
    storage = tmp_path / "runs"
    train(make_config(storage, "train.iterations=2", "train.max_failures=0"), shards_uri, name="victim")
    targets = sorted((storage / "victim").glob("checkpoint_*/engine/mp_rank_00_model_states.pt"))
    assert targets, "the first run reported no checkpoint"
    marker = tmp_path / "payload-ran"
    for target in targets:
        plant(target, marker)
    with pytest.raises(Exception, match=r"victim/checkpoint_\w+/engine/mp_rank_00_model_states.pt: "
                                        "refused to load"):
        train(make_config(storage, "train.iterations=4", "train.max_failures=0"), shards_uri, name="victim",
              allow_changed_config=True)
    assert not marker.exists(), "the planted payload ran on a worker"


def test_the_state_of_fp16_and_bf16_optimisers_loads(tmp_path):
    """What DeepSpeed's GPU-only optimisers add to a checkpoint (a dynamic loss scaler, fragment mappings)
    passes the safe load; written here as they write it, since CPU tests cannot train in fp16."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from stal_ray.train.checkpoints import SafeCheckpointEngine

    dynamic = CreateLossScaler(torch.half, 1, True, dict(init_scale=2**16, scale_window=1000, min_scale=1,
                                                          delayed_shift=2, consecutive_hysteresis=False))
    state = {"loss_scaler": dynamic, "static": CreateLossScaler(torch.bfloat16, 1, False, None),
             "zero_stage": ZeroStageEnum.gradients,
             "param_slice_mappings": [{"backbone.weight": fragment_address(numel=4, start=8)}],
             "single_partition_of_fp32_groups": [torch.arange(4.0)]}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = SafeCheckpointEngine().load(str(tmp_path / "optim_states.pt"))
    assert vars(loaded["loss_scaler"]) == vars(dynamic) and loaded["loss_scaler"].dynamic
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["param_slice_mappings"][0]["backbone.weight"] == fragment_address(numel=4, start=8)
