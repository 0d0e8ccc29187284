# Two commands a new user needs: `make train` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Every package at the version in requirements.lock, here, in CI (.ci/run) and on the cluster's nodes
# (cluster/*.yaml install from the same file): pinned versions, so pip never backtracks. `make lock` renews it.
LOCK := requirements.lock
PIP := $(PY) -m pip install --quiet --constraint $(LOCK)
TORCH_PIN ?= torch==2.13.0
# Where torch comes from, installed first so that nothing else picks its build. Without an NVIDIA GPU:
# PyTorch's CPU index (a 200 MB wheel; PyPI's Linux wheel is a CUDA build that pulls GBs of nvidia-* wheels).
# With one (nvidia-smi lists it): PyPI, whose torch 2.13.0 is built for CUDA 13 (NVIDIA driver >= 580). Set it:
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128    # CUDA 12.8, for an older driver
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu      # the CPU build on a GPU machine
# A torch wheel that pip finds with no index at all (find-links in pip.conf, PIP_FIND_LINKS) is used first.
TORCH_INDEX ?= $(if $(shell nvidia-smi -L 2>/dev/null),,https://download.pytorch.org/whl/cpu)
# Extras of the project installed into .venv (tensorboard: the viewer for the runs' event files; pose: the
# pose models of jobs/estimate_pose.py, ~70 MB of wheels, ~220 MB installed with the test extra's additions).
EXTRAS ?= test,tensorboard,pose
# Ray on a small machine: see docs/architecture.md, "Ray resources".
export RAY_DEDUP_LOGS ?= 0

.PHONY: venv lock train test test-e2e test-multinode test-cluster bench lint tensorboard clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) --no-deps --no-index $(TORCH_PIN) 2>/dev/null || \
	  $(PIP) --no-deps $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PIN)
	$(PIP) -e ".[$(EXTRAS)]"
	touch $@

# Resolve pyproject.toml afresh (newest versions its ranges allow, torch at TORCH_PIN) into requirements.lock;
# run it on Linux x86_64 with Python 3.11, the platform the lock is tested on, then `make test`.
# Needs no .venv: pip only resolves (--dry-run), whatever is installed.
lock:
	$(PYTHON) -m pip install --quiet --dry-run --ignore-installed --report $(LOCK).json pip $(TORCH_PIN) \
	  -e ".[test,tensorboard,pose]"
	$(PYTHON) tools/lock.py $(LOCK).json > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm $(LOCK).json

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

bench: venv
	$(PY) bench/model.py $(ARGS)
	$(PY) bench/decode.py
	$(PY) bench/data.py
	$(PY) bench/train.py
	$(PY) bench/ranking.py

lint: venv
	$(VENV)/bin/ruff check stal_ray jobs tests bench tools

# The event files of every run under ~/ray_results (or LOGDIR=...), on http://localhost:6006
LOGDIR ?= ~/ray_results
tensorboard: venv
	$(VENV)/bin/tensorboard --logdir $(LOGDIR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
