"""A ZeRO 1/2 checkpoint written by 2 workers resumes on 1 and on 3 with its optimiser state (SGD momentum)
carried over, read through the safe checkpoint engine (issue 15) all the same."""

import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from conftest import free_port

# minutes on 2 cores (every worker a process importing DeepSpeed): `make test-multinode`
pytestmark = pytest.mark.multinode

TINY = ["model.backbone=tiny", "model.feature_dim=16", "data.seq_len=2", "data.height=32", "data.width=16",
        "data.identities_per_batch=2", "data.clips_per_identity=2"]


def _worker(rank: int, world: int, port: int, zero_stage: int, directory: str, mode: str, out: str) -> None:
    """One DeepSpeed rank: 'save' trains 3 steps and saves; 'load' resumes. Either writes every parameter's
    full momentum (gathered over the partitions by DeepSpeed) to `out` on rank 0."""
    os.environ.update(LOCAL_RANK="0", RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_optimizer_state

    from stal_ray.config import load_config
    from stal_ray.model.stal import STAL
    from stal_ray.objective import STALObjective
    from stal_ray.train.checkpoints import UnsafeCheckpointError, load_checkpoint
    from stal_ray.train.deepspeed import build_engine, skip_shared_memory_kernel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    skip_shared_memory_kernel()  # as build_engine does on CPU: no 20-40 s kernel build per new venv
    deepspeed.init_distributed("gloo", dist_init_required=False)
    config = load_config(None, TINY + [f"train.zero_stage={zero_stage}", "train.lr=0.1"])
    torch.manual_seed(0)
    engine, _ = build_engine(STAL.from_config(config, num_classes=4), config, on_gpu=False)
    if mode == "save":
        objective = STALObjective.from_config(config)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(3):
            clips = torch.randn(4, 2, 3, 32, 16, generator=generator)
            labels = torch.tensor([0, 0, 1 + rank % 3, 1 + rank % 3])
            loss = objective(engine(clips, None), labels, None).total
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(directory, tag="engine", client_state={"loop_state": {"step": 3}})
    else:
        try:
            _, client_state = load_checkpoint(engine, directory, tag="engine")
        except UnsafeCheckpointError as error:
            Path(out + ".refused").write_text(str(error))
            return
        assert client_state["loop_state"] == {"step": 3}
    # DeepSpeed links each parameter to its slice of the optimiser state at the first step; a resumed engine
    # has not stepped yet
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    momentum = {name: safe_get_full_optimizer_state(param, "momentum_buffer").clone()
                for name, param in engine.module.named_parameters()}
    weights = {name: param.detach().clone() for name, param in engine.module.named_parameters()}
    if rank == 0:
        torch.save({"momentum": momentum, "weights": weights}, out)
    dist.barrier()
    dist.destroy_process_group()


def _run(world: int, zero_stage: int, directory: Path, mode: str, out: Path) -> None:
    context = multiprocessing.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_worker, args=(rank, world, port, zero_stage, str(directory), mode,
                                                       str(out)))
                 for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    assert [process.exitcode for process in processes] == [0] * world, f"{mode} on {world} workers failed"


@pytest.fixture(scope="module")
def two_worker_checkpoints(tmp_path_factory):
    """ZeRO stage -> a folder holding `checkpoint/` (written by 2 workers) and `saved.pt` (their momentum)."""
    folders = {}
    for zero_stage in (1, 2):
        folders[zero_stage] = tmp_path_factory.mktemp(f"zero{zero_stage}")
        _run(2, zero_stage, folders[zero_stage] / "checkpoint", "save", folders[zero_stage] / "saved.pt")
    return folders


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_a_checkpoint_of_two_workers_resumes_on_one_two_and_three_with_its_momentum(two_worker_checkpoints,
                                                                               tmp_path, zero_stage):
    folder = two_worker_checkpoints[zero_stage]
    saved = torch.load(folder / "saved.pt", weights_only=True)
    assert any(m.abs().sum() > 0 for m in saved["momentum"].values()), "training left no momentum to carry"
    for world in (1, 2, 3):
        _run(world, zero_stage, folder / "checkpoint", "load", tmp_path / f"resumed-{world}.pt")
        resumed = torch.load(tmp_path / f"resumed-{world}.pt", weights_only=True)
        for kind in ("momentum", "weights"):
            assert resumed[kind].keys() == saved[kind].keys()
            for name, value in saved[kind].items():
                torch.testing.assert_close(resumed[kind][name], value, rtol=0, atol=0,
                                           msg=f"{kind} of {name} on {world} workers")


def test_a_planted_partition_is_refused_at_another_world_size(two_worker_checkpoints, tmp_path):
    """The re-cut path reads every partition through the safe engine too (on a copy of the stage 1
    checkpoint)."""
    import shutil

    shutil.copytree(two_worker_checkpoints[1] / "checkpoint", tmp_path / "checkpoint")
    marker = tmp_path / "ran"
    from test_checkpoints import plant

    plant(next((tmp_path / "checkpoint" / "engine").glob("*zero_pp_rank_1_*optim_states.pt")), marker)
    context = multiprocessing.get_context("spawn")
    process = context.Process(target=_worker, args=(0, 1, free_port(), 1, str(tmp_path / "checkpoint"),
                                                    "load", str(tmp_path / "resumed.pt")))
    process.start()
    process.join(timeout=180)
    assert process.exitcode == 0
    assert not marker.exists(), "the payload planted in a ZeRO partition ran"
    refused = (tmp_path / "resumed.pt.refused").read_text()
    assert "zero_pp_rank_1_" in refused and "refused to load" in refused
