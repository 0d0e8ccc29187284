"""Start Ray for a job: the cluster it is told to join (RAY_ADDRESS, `ray job submit`, --address), else a
private local one. Never another job's cluster found on the machine: it would share that job's resources,
lifetime and working directory."""

import argparse
import os
import sys

# Logical CPUs of a local Ray on a small machine: train workers and the Ray Data decoding tasks each ask for
# one CPU, and with only as many as there are cores they wait on each other forever (DESIGN.md, "Testing").
LOCAL_MIN_CPUS = 8
# Ray Train 2.60 patches print() in its workers to also log each line, and its logger writes to the same
# stdout: every worker line reached the driver (and log.txt) twice. Ray Train passes the variable on to its
# workers; a user who sets it keeps theirs.
PRINT_PATCH_VARIABLE = "RAY_TRAIN_ENABLE_PRINT_PATCH"


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """--address ADDRESS (args.address): the Ray cluster to join."""
    parser.add_argument("--address", metavar="ADDRESS", default=None,
                        help="Ray cluster to join, e.g. 10.0.0.5:6379 or auto (the cluster `ray start` "
                             "started on this host); default: RAY_ADDRESS (set by `ray job submit`), else a "
                             "private local Ray that ends with this job")


def init_ray(address: str | None = None, **kwargs) -> None:
    """Join the cluster at `address`, else at RAY_ADDRESS (which `ray job submit` sets for its jobs); with
    neither, start a private local Ray with at least LOCAL_MIN_CPUS logical CPUs (address="local": a bare
    ray.init() would attach to any cluster `ray start` left on this machine)."""
    import ray  # here, not at the top: a job's --help is answered before Ray is imported
    import ray.data

    os.environ.setdefault(PRINT_PATCH_VARIABLE, "0")
    # progress bars where someone watches a terminal; in a job's log file they are lines of escape codes
    ray.data.DataContext.get_current().enable_progress_bars = sys.stdout.isatty()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=max(LOCAL_MIN_CPUS, os.cpu_count() or 1), **kwargs)
