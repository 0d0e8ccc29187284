"""The items' processes: each item of bench/gpu_check.py runs in a process of its own (its time limit stops
the whole process group), forked from one template process that imported torch, Ray, Ray Data, Ray Train
and the check's own modules once (a multiprocessing forkserver with those modules preloaded).

An item started as a fresh interpreter paid those imports again, about 3 CPU-seconds (1.5 s of its start-up
and 1 s of its Ray connection, most of it importing ray.data): seven times per run, a sixth of the CPU quick
mode's work. Forked, an item starts in a tenth of a second.

The template must stay fork-safe: it imports modules and does nothing else. No CUDA call (a CUDA driver
initialised before a fork cannot be used in the child: every item then initialises CUDA itself) and no
Ray connection; so deepspeed, whose import probes the accelerator, is not preloaded
(tests/test_gpu_check.py checks all three in a forked process). It starts after the orchestrator's ray.init,
which sets RAY_AUTH_MODE, a variable Ray reads when it is imported: a template started before could not
connect.
"""

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# what every item's driver imports before its own work; nothing here may touch a device
PRELOAD = ("bench.gpu_check", "ray.data", "ray.train.torch", "stal_ray.config")
STOP_GRACE_S = 5
REQUESTED_AT = "STAL_GPU_CHECK_REQUESTED_AT"  # time.perf_counter() when the item was asked for (monotonic)


def _context():
    # torch's availability check through NVML, which leaves the CUDA driver uninitialised: should anything
    # the template imports ask whether CUDA is available, the items forked from it can still use it (the
    # template takes the environment of its start, at the first item)
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))  # takes effect when the server starts, at the first item
    return context


def prepare() -> None:
    """Start the template process now (it imports PRELOAD in the background); else the first item does."""
    _context()
    multiprocessing.forkserver.ensure_running()


class StoppedError(RuntimeError):
    """An item was asked for after stop_all(): the check is ending."""


_started: list[multiprocessing.Process] = []
_lock = threading.Lock()
_stopping = False


def start(target: Callable, args: tuple, log: Path, env: dict[str, str]) -> multiprocessing.Process:
    """target(*args) in a process forked from the template, in a session of its own (stop() ends it and
    whatever it started), with stdout and stderr to `log` and the environment `env`."""
    env = {**env, REQUESTED_AT: repr(time.perf_counter())}
    with _lock:
        if _stopping:
            raise StoppedError("the GPU check is stopping: no further item is started")
        process = _context().Process(target=_enter, args=(target, args, str(log), env), daemon=False)
        process.start()
        _started.append(process)
    return process


def _enter(target: Callable, args: tuple, log: str, env: dict[str, str]) -> None:
    """The forked process's first steps: own session, the log as stdout and stderr, the caller's environment
    and working directory; then the target. Its return is exit 0, SystemExit(message) exit 1 with the
    message as the log's last line, an exception exit 1 with the traceback."""
    os.setsid()
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)
    os.chdir(REPO)
    target(*args)


def seconds_since_requested() -> float:
    """In an item's process: seconds from the orchestrator's request to now (the fork, the rest of the
    imports)."""
    return time.perf_counter() - float(os.environ[REQUESTED_AT])


def stop_all() -> None:
    """Stop every item process still running, and start no more: the orchestrator's way out, Ctrl-C
    included (an item runs in a session of its own, which the terminal's interrupt does not reach, and the
    interpreter's exit would wait for it)."""
    global _stopping
    with _lock:
        _stopping = True
        running = [process for process in _started if process.exitcode is None]
    for process in running:
        stop(process)


def stopping() -> bool:
    """Whether stop_all() has been called."""
    return _stopping


def stop(process: multiprocessing.Process) -> None:
    """SIGTERM to the process's group, SIGKILL after STOP_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # not in its own session yet (or gone): the process alone
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
        process.join(STOP_GRACE_S)
        if process.exitcode is not None:
            return
