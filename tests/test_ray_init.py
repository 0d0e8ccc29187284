"""init_ray: a job joins a cluster only when told to (RAY_ADDRESS, --address); a cluster that `ray start`
left on the machine is not joined otherwise."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# what a job does first: init_ray with its --address (argv[1], empty for none); prints the GCS it is on
JOB = ("import sys, ray; from stal_ray.ray_init import init_ray; init_ray(sys.argv[1] or None); "
       "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")


@pytest.fixture()
def other_head():
    """A cluster started with `ray start --head` on this machine, as another job's (`--block`: SIGTERM stops
    exactly what it started). RAY_TMPDIR is private to the test, so the cluster is "the one on this machine"
    only for the processes given that environment, and other Ray users on the host are not disturbed."""
    temp = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray >= 2.59 authenticates every connection to a cluster started with `ray start`: the head and the
    # jobs share this test's own token
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=temp, PYTHONPATH=str(REPO), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(16))
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address_file = Path(temp) / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not come up (exit code {head.poll()})")
            time.sleep(1)
        yield address_file.read_text().strip(), env  # the address Ray advertises for the head
    finally:
        stop_process_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def gcs_of_job(env: dict, address: str = "") -> str:
    done = subprocess.run([sys.executable, "-c", JOB, address], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("GCS "))


def port(address: str) -> str:
    return address.rsplit(":", 1)[1]  # Ray may name the host by another of its IP addresses


def test_a_job_joins_a_cluster_only_when_told(other_head):
    address, env = other_head
    # `address` is in RAY_TMPDIR's ray_current_cluster: the cluster that ray.init(address="auto") joins
    assert port(gcs_of_job(env)) != port(address), "a job with no address joined another job's cluster"
    assert port(gcs_of_job(env, address)) == port(address)  # --address
    assert port(gcs_of_job(dict(env, RAY_ADDRESS=address))) == port(address)  # as `ray job submit` sets it
