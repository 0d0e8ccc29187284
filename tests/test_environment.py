"""The environment that `make venv` builds (tools/install.sh): every module a Ray worker imports comes with
its bytecode, so that no process compiles ray's or torch's sources at its start. Where
PYTHONDONTWRITEBYTECODE is set (as in many container images, and on the machines these tests run on)
Python never writes what it compiles, and without install.sh's compileall every Ray worker of every job
compiled them again: `make test` took 757 s instead of 366 s (docs/benchmarks.md, "Set-up and test
times")."""

import importlib
import importlib.util
from pathlib import Path

import pytest

# what a training worker imports: Ray, Ray Data and Train, torch, DeepSpeed, pyarrow, and the project's code
WORKER_MODULES = ["ray", "ray.data", "ray.train.torch", "torch", "torch.nn.functional", "deepspeed",
                  "pyarrow", "fsspec", "numpy", "stal_ray.train.loop", "stal_ray.data.stream.pipeline"]


@pytest.mark.parametrize("name", WORKER_MODULES)
def test_every_module_a_worker_imports_has_its_bytecode(name):
    source = importlib.import_module(name).__file__
    cached = Path(importlib.util.cache_from_source(source))
    assert cached.exists(), (f"{name}: no bytecode at {cached}; every Ray worker compiles {source} again at "
                             "its start: run `make venv` (tools/install.sh compiles the environment)")
