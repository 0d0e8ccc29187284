# Two commands a new user needs: `make train` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned to the CPU wheel on disk: anything that depends on torch would otherwise pull a CUDA build.
TORCH_PIN ?= torch==2.13.0
# Ray on a small machine: see DESIGN.md "Testing".
export RAY_DEDUP_LOGS ?= 0

.PHONY: venv train test bench lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

train: venv
	$(PY) jobs/train_mars.py $(ARGS)

test: venv
	$(PY) -m pytest -q tests $(ARGS)

bench: venv
	$(PY) bench/model.py $(ARGS)
	$(PY) bench/data.py
	$(PY) bench/train.py
	$(PY) bench/ranking.py

lint: venv
	$(VENV)/bin/ruff check stal_ray jobs tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
