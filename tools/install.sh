#!/usr/bin/env bash
# Install stal_ray with EXTRAS and every package at its version in requirements.lock into the virtual
# environment VENV (created with $PYTHON when missing): the one installation of `make venv`, CI and the
# cluster's nodes (cluster/*.yaml).
#
#   tools/install.sh VENV [EXTRAS]        e.g. tools/install.sh .venv test,tensorboard,pose
#
# With uv (on PATH, else installed into VENV by pip), which checks every file against the lock's sha256
# hashes; when uv cannot be had, pip with the lock's pins as constraints (tools/lock.py pins). torch goes first
# so that nothing else picks its build: a wheel found with no index (PIP_FIND_LINKS or pip's find-links
# setting), else from TORCH_INDEX (the Makefile's default: PyTorch's CPU index on a machine without an NVIDIA
# GPU), else PyPI's CUDA 13 build with the nvidia-* wheels the lock pins for the GPU nodes.
set -euo pipefail
venv=$1
extras=${2:-}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
# unset: PyTorch's CPU index where no NVIDIA GPU is listed; set and empty: PyPI (the CUDA 13 build)
if [ -z "${TORCH_INDEX+set}" ]; then
  TORCH_INDEX=$(nvidia-smi -L > /dev/null 2>&1 || echo https://download.pytorch.org/whl/cpu)
fi
UV_PIN=${UV_PIN:-uv==0.13.9}
LOCK=requirements.lock
project=".${extras:+[$extras]}"

test -x "$venv/bin/python" || "$PYTHON" -m venv "$venv"
py="$venv/bin/python"
# what pip is configured with here (pip.conf), uv reads from the environment
pip_setting() {
  "$py" -m pip config list 2> /dev/null | sed -nE "s/^(global|:env:)\.$1='(.*)'\$/\2/p" | head -n 1
}
find_links=${PIP_FIND_LINKS:-$(pip_setting find-links)}
cert=$(pip_setting cert)
if [ -z "${SSL_CERT_FILE:-}" ] && [ -n "$cert" ]; then export SSL_CERT_FILE=$cert; fi

with_uv() {
  local uv install
  uv=$(command -v uv || true)
  if [ -z "$uv" ]; then
    "$py" -m pip install --quiet --disable-pip-version-check "$UV_PIN" 2> /dev/null || return 1
    uv="$venv/bin/uv"
  fi
  install=("$uv" pip install --quiet --python "$py")
  # a local torch wheel first (no index at all), as pip would take it from its find-links
  if ! { [ -n "$find_links" ] &&
         "${install[@]}" --no-deps --no-index --find-links "$find_links" "$TORCH_PIN" 2> /dev/null; }; then
    if [ -n "$TORCH_INDEX" ]; then
      "${install[@]}" --no-deps --index-url "$TORCH_INDEX" "$TORCH_PIN" || return 1
    fi  # else torch comes from PyPI with the rest, checked against the lock's hashes
  fi
  "${install[@]}" --constraint "$LOCK" -e "$project"
}

if ! with_uv; then
  echo "tools/install.sh: uv could not install here; installing with pip" >&2
  pins="$venv/lock-pins.txt"
  "$py" tools/lock.py pins > "$pins"
  pip=("$py" -m pip install --quiet --constraint "$pins")
  "${pip[@]}" --upgrade pip
  "${pip[@]}" --no-deps --no-index "$TORCH_PIN" 2> /dev/null ||
    "${pip[@]}" --no-deps ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_PIN"
  "${pip[@]}" -e "$project"
fi

# Bytecode for every installed module and the project's own (pip writes it as it installs, uv does not):
# without it each Python process, every Ray worker of every job, compiles ray's and torch's modules again
# wherever PYTHONDONTWRITEBYTECODE is set, as in many container images; a test run took twice as long
# (docs/benchmarks.md, "Set-up and test times"). Up-to-date files are skipped (3 s); a file no Python can
# compile (some packages ship such data) only stays uncompiled, hence the exit status ignored.
"$py" -m compileall -q -j 0 "$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  stal_ray > /dev/null || true
