"""`ray job submit` of jobs/train_mars.py to a cluster started with `ray start --head` on 127.0.0.1."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, stop_process_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_for_dashboard(url: str, token: str, head: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url} after {timeout} s")


@pytest.fixture()
def head_node():
    """A separate single-node Ray cluster; `--block` makes SIGTERM stop exactly the processes it started
    (`ray stop` would also stop the test session's own cluster). Ray >= 2.59 authenticates every request to
    a cluster started with `ray start`: the head and the job client share this test's own token."""
    token = secrets.token_hex(16)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={free_port()}",
         # its own agent ports: the defaults are taken by the test session's cluster on this host
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
         "--num-cpus=8", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(url, token, head)
        yield url, env
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(command: list[str], url: str, submission_id: str, env: dict) -> tuple[int, str]:
    """`ray job submit` until the head has taken the job -> (exit code, output). Two answers mean it has not
    yet: "No available agent" (the job agent registers a little after the dashboard answers; nothing runs)
    and a POST whose connection the loaded dashboard dropped ("Remote end closed connection without
    response", seen once in CI; kuberay's e2e tests meet it too). After the second the job may exist all
    the same: `ray job status` of its submission id answers (it exits 0 for a job in any state), and its
    logs are followed instead, its status read once it ends."""
    ray = [str(BIN / "ray"), "job"]
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        output = done.stdout + done.stderr
        dropped = "Remote end closed connection" in output
        if not ("No available agent" in output or dropped) or time.monotonic() > deadline:
            return done.returncode, output
        if dropped and subprocess.run(ray + ["status", "--address", url, submission_id], env=env,
                                      capture_output=True, timeout=120).returncode == 0:
            logs = subprocess.run(ray + ["logs", "--follow", "--address", url, submission_id], env=env,
                                  capture_output=True, text=True, timeout=600)
            status = subprocess.run(ray + ["status", "--address", url, submission_id], env=env,
                                    capture_output=True, text=True, timeout=120)
            output = logs.stdout + logs.stderr + status.stdout + status.stderr
            return (0 if f"Job '{submission_id}' succeeded" in output else 1), output
        time.sleep(2)


@pytest.mark.e2e  # a head node and a whole job: make test-e2e
def test_ray_job_submit_trains_and_evaluates(head_node, tmp_path):
    url, env = head_node
    submission_id = f"submitted-{secrets.token_hex(4)}"
    command = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(REPO),
               "--submission-id", submission_id, "--",
               "python", "jobs/train_mars.py", "--storage-path", str(tmp_path), "--name", "submitted",
               "--set", "train.iterations=6", "--set", "train.checkpoint_every=6",
               "--set", "train.log_every=3"]
    returncode, output = submit(command, url, submission_id, env)
    assert returncode == 0, output[-4000:]
    assert "succeeded" in output
    metrics_path = tmp_path / "submitted" / "metrics.json"
    assert str(metrics_path) in output
    metrics = json.loads(metrics_path.read_text())
    assert 0 <= metrics["modes"]["stal"]["mAP"] <= 1
    # the worker's progress lines reach the job's output and its log.txt once each (Ray Train's print patch
    # doubled them)
    log = (tmp_path / "submitted" / "log.txt").read_text()
    assert output.count("iteration 3/6 (50%)") == log.count("iteration 3/6 (50%)") == 1, log[-4000:]
