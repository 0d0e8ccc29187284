"""Two Ray nodes on 127.0.0.1 (`ray start --block` processes), the second one killed by process id: shared by
tests/test_multinode.py and bench/node_loss.py. Imports neither stal_ray nor the tests."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")
TRAINER = '--resources={"trainer": 1}'


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (free when asked)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen, timeout: float = 5) -> None:
    """End a process started with start_new_session=True and everything it started (e.g. `ray start
    --head --block`): SIGTERM to its group, SIGKILL to the group if it has not gone within `timeout` seconds
    (a `ray start --block` head takes about 30 s to stop gracefully; a test's throwaway cluster need not)."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for(predicate, timeout: float, what: str, every: float = 0.5) -> None:
    """Poll `predicate` every `every` seconds until it holds; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def alive_nodes(ray) -> int:
    return sum(1 for node in ray.nodes() if node["Alive"])


def cluster_env(**extra: str) -> dict[str, str]:
    """The nodes' environment. RAY_AUTH_MODE: `ray start --head` turns token authentication on by itself when
    ~/.ray/auth_token exists (another cluster on this machine may have made one), and then refuses the
    second node and the driver; the driver must set it too."""
    return {**os.environ, "RAY_DEDUP_LOGS": "0", "RAY_AUTH_MODE": "disabled", **extra}


class HeadStartError(RuntimeError):
    """The head node's `ray start` exited before it had started."""


class Cluster:
    """A head node and a second node, each a `ray start --block` process in its own session; one train
    worker per node (the `trainer` resource, train.worker_resource=trainer)."""

    def __init__(self, tmp: Path, env: dict[str, str], head_cpus: int = 6, second_cpus: int = 3):
        self.port, self.env, self.tmp, self.second_cpus = free_port(), env, Path(tmp), second_cpus
        # a short session folder of its own (Ray's socket paths must fit in 107 bytes)
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
        self.head = self._start("head", ["--head", f"--port={self.port}", f"--num-cpus={head_cpus}", TRAINER,
                                         f"--ray-client-server-port={free_port()}",
                                         f"--dashboard-port={free_port()}",
                                         "--include-dashboard=false", f"--temp-dir={self.temp_dir}"])
        self.address = f"127.0.0.1:{self.port}"
        self.second = None

    def _start(self, name: str, arguments: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "a")
        # every port of its own: two nodes share this host, and other Ray clusters may run on it
        ports = [f"--{flag}={free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")]
        return subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1",
                                 "--object-store-memory=150000000", *ports, *arguments],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def wait_for_head(self, timeout: float = 120) -> None:
        """Until the head's `ray start` has finished its start (it blocks from then on) and answers `ray
        status`; HeadStartError if it exits first (on a loaded machine its GCS can miss the start's deadline,
        "The current node timed out during startup", and a driver that joined it would wait forever)."""
        log = self.tmp / "head.log"

        def started() -> bool:
            if self.head.poll() is not None:
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise HeadStartError(f"ray start --head exited with {self.head.returncode} ({log}):\n{tail}")
            return (log.exists() and "block forever" in log.read_text()
                    and subprocess.run([RAY, "status", f"--address={self.address}"], env=self.env,
                                       capture_output=True).returncode == 0)

        wait_for(started, timeout, "the head node")

    def start_second(self) -> None:
        self.second = self._start("second", [f"--address={self.address}", f"--num-cpus={self.second_cpus}",
                                             TRAINER])

    def kill_second(self) -> list[int]:
        """SIGKILL the second node's `ray start`, raylet and every process under it (its workers) -> pids."""
        root = psutil.Process(self.second.pid)
        processes = [root, *root.children(recursive=True)]
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.second.wait()
        return [process.pid for process in processes]

    def stop(self) -> None:
        for process in (self.second, self.head):
            if process is not None and process.poll() is None:
                stop_process_group(process, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
