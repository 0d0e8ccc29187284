"""Start or join Ray from a job: the cluster of `ray job submit` / `ray start`, else a local one."""

import os
import sys

import ray
import ray.data

# Logical CPUs of a local Ray on a small machine: train workers and the Ray Data decoding tasks each ask for
# one CPU, and with only as many as there are cores they wait on each other forever (DESIGN.md, "Testing").
LOCAL_MIN_CPUS = 8


def init_ray(**kwargs) -> None:
    """Join the cluster named by RAY_ADDRESS (set by `ray job submit`) or started with `ray start` on this
    host; otherwise start a local one with at least LOCAL_MIN_CPUS logical CPUs."""
    # progress bars where someone watches a terminal; in a job's log file they are lines of escape codes
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    if ray.is_initialized():
        return
    try:
        ray.init(address="auto", **kwargs)
    except ConnectionError:
        ray.init(num_cpus=max(LOCAL_MIN_CPUS, os.cpu_count() or 1), **kwargs)
