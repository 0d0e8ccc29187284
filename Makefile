# Two commands a new user needs: `make train` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Every package at the version in requirements.lock, here, in CI (.ci/run) and on the cluster's nodes
# (cluster/*.yaml run the same tools/install.sh): one universal lock for Python 3.11 and 3.12, CPU machines and
# the GPU nodes' CUDA wheels, with hashes, installed by uv (pip when uv cannot be had). `make lock` renews it.
LOCK := requirements.lock
UV = $(or $(shell command -v uv 2>/dev/null),$(VENV)/bin/uv)
export TORCH_PIN ?= torch==2.13.0
# Where torch comes from, installed first so that nothing else picks its build. Without an NVIDIA GPU:
# PyTorch's CPU index (a 200 MB wheel; PyPI's Linux wheel is a CUDA build that pulls GBs of nvidia-* wheels).
# With one (nvidia-smi lists it): PyPI, whose torch 2.13.0 is built for CUDA 13 (NVIDIA driver >= 580). Set it:
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128    # CUDA 12.8, for an older driver
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu      # the CPU build on a GPU machine
# A torch wheel that pip finds with no index at all (find-links in pip.conf, PIP_FIND_LINKS) is used first.
export TORCH_INDEX ?= $(if $(shell nvidia-smi -L 2>/dev/null),,https://download.pytorch.org/whl/cpu)
# Extras of the project installed into .venv (tensorboard: the viewer for the runs' event files; pose: the
# pose models of jobs/estimate_pose.py, ~70 MB of wheels, ~220 MB installed with the test extra's additions).
EXTRAS ?= test,tensorboard,pose
# Ray on a small machine: see docs/architecture.md, "Ray resources".
export RAY_DEDUP_LOGS ?= 0

.PHONY: venv lock check-lock train test test-e2e test-multinode test-cluster test-rehearsal bench gpu-check lint tensorboard clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK) tools/install.sh
	PYTHON=$(PYTHON) tools/install.sh $(VENV) $(EXTRAS)
	touch $@

# Resolve pyproject.toml with uv into the universal requirements.lock (every Python that requires-python claims,
# every platform, hashes; torch at TORCH_PIN; the versions already locked kept where they still fit), then
# `make check-lock` and `make test`.
lock: venv
	$(PY) tools/lock.py $(UV)

# CI: the lock resolves, from wheels, to its own pins for every Python that pyproject.toml claims
check-lock: venv
	$(PY) tools/lock.py $(UV) check

train: venv
	$(PY) jobs/train_mars.py $(ARGS)

# The suite without the whole-job tests (marked e2e): under 15 minutes on 2 cores
test: venv
	$(PY) -m pytest -q tests -m "not e2e and not multinode" $(ARGS)

# Whole jobs end to end (splits, study, Tune, ray job submit, and the cluster launch where it may run): CI runs
# it after `make test`
test-e2e: venv
	$(PY) -m pytest -q tests -m e2e $(ARGS)

# Several Ray nodes on 127.0.0.1 (`ray start` processes): a node killed during training, checkpoints resumed
# on another number of workers; CI runs it after `make test-e2e`
test-multinode: venv
	$(PY) -m pytest -q tests -m multinode $(ARGS)

# cluster/local.yaml launched over SSH on 127.0.0.1 (`ray up`, a job, `ray down`): it adds the account stal-host
# and an sshd on port 22 to this machine (root or passwordless sudo), so `make test` skips it unless CI runs it
test-cluster: venv
	STAL_TEST_CLUSTER_LAUNCH=1 $(PY) -m pytest -q -s tests/test_cluster_launch.py $(ARGS)

# README's cluster commands as written (tests/test_rehearsal.py): the launch above, S3 on moto, a small
# MARS-structured release, pose, ResNet-50 trained, evaluated, tuned and trained again from best.yaml (~20 min)
test-rehearsal: venv
	STAL_TEST_CLUSTER_LAUNCH=1 STAL_TEST_REHEARSAL=1 $(PY) -m pytest -q -s tests/test_rehearsal.py $(ARGS)

bench: venv
	$(PY) bench/model.py $(ARGS)
	$(PY) bench/decode.py
	$(PY) bench/data.py
	$(PY) bench/train.py
	$(PY) bench/ranking.py

# Every GPU path in one run (< 8 minutes on one H100): bench/gpu_check.py, the README's GPU section.
# On a CPU: make gpu-check ARGS="--device cpu --quick"
gpu-check: venv
	$(PY) bench/gpu_check.py $(ARGS)

# ruff, then the package's layers and forbidden imports (pyproject.toml, [tool.importlinter]); CI runs it
# before `make test`
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The event files of every run under ~/ray_results (or LOGDIR=...), on http://localhost:6006
LOGDIR ?= ~/ray_results
tensorboard: venv
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
