"""A DeepSpeed engine on CPU starts without JIT-compiling a C++ kernel: the shared-memory all-reduce that
DeepSpeed's CPU backend builds serves only tensor-parallel inference, and its build cost 20-40 s of both
cores of a 2-core machine at every new virtualenv path (train/deepspeed.py, skip_shared_memory_kernel)."""

import subprocess
import sys
from pathlib import Path

from conftest import free_port

REPO = Path(__file__).resolve().parents[1]

ENGINE_STEP = """
import sys, torch, torch.distributed as dist
from stal_ray.config import load_config
from stal_ray.model.stal import STAL
from stal_ray.objective import STALObjective
from stal_ray.train.deepspeed import build_engine

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
config = load_config(None, ["model.backbone=tiny", "model.feature_dim=16", "data.seq_len=2",
                            "data.height=32", "data.width=16"])
torch.manual_seed(0)
engine, _ = build_engine(STAL.from_config(config, num_classes=3), config, on_gpu=False)
before = [p.detach().clone() for p in engine.module.parameters()]
clips, labels = torch.randn(4, 2, 3, 32, 16), torch.tensor([0, 0, 1, 1])
engine.backward(STALObjective.from_config(config)(engine(clips, None), labels, None).total)
engine.step()
changed = any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
print("STEPPED" if changed else "UNCHANGED")
"""


def test_a_cpu_engine_trains_a_step_without_building_a_kernel(tmp_path):
    extensions = tmp_path / "torch_extensions"  # where torch.utils.cpp_extension would build
    env = {"TORCH_EXTENSIONS_DIR": str(extensions), "PATH": "/usr/bin:/bin", "LOCAL_RANK": "0", "RANK": "0",
           "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(REPO)}
    completed = subprocess.run([sys.executable, "-c", ENGINE_STEP, str(tmp_path / "rendezvous")], env=env,
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "STEPPED", completed.stdout[-2000:]
    built = sorted(str(path.relative_to(extensions)) for path in extensions.rglob("*"))
    assert built == [], f"a kernel was compiled at the engine's start: {built}"
