"""cluster/local.yaml launched for real, as a user would: `ray up` over SSH to an SSH server on 127.0.0.1 (the
head, no workers), `ray job submit` of jobs/train_mars.py, `ray down`; nothing of the cluster left running.

The "host" is an account of its own on this machine (HOST_USER): `ray up` and `ray down` run `ray stop` on the
head, which stops every Ray process its user may stop, so a cluster run by the test session's own user would
stop the session's Ray (and any other Ray of that user). The account and its home persist between runs, like a
user's host: the first launch installs ~/stal-venv from requirements.lock, later ones find it installed.
Ray's SSH runner always connects to port 22 (auth has no port), so the test's sshd listens on 127.0.0.1:22.
Needs root or passwordless sudo (a user account, an sshd; Debian's openssh-server, rsync and python3-venv are
installed with apt-get when missing; .ci/run installs them).

It changes the machine (a user account, port 22), so it runs only when asked: STAL_TEST_CLUSTER_LAUNCH=1,
which .ci/run and `make test-cluster` set."""

import configparser
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import free_port

# `ray up` over SSH: `make test-e2e` (and `make test-cluster`)
pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOST_USER = "stal-host"
SSHD = "/usr/sbin/sshd"
PACKAGES = ("openssh-server", "rsync", "python3-venv")  # the host's SSH server, Ray's file copy, the venv


def privilege() -> list[str]:
    """The prefix that runs a command as root: none as root, `sudo -n` with passwordless sudo; else skip."""
    if os.environ.get("STAL_TEST_CLUSTER_LAUNCH") != "1":
        pytest.skip(f"launching cluster/local.yaml adds the account {HOST_USER} and an sshd on 127.0.0.1:22 "
                    "to this machine: set STAL_TEST_CLUSTER_LAUNCH=1 to run it (.ci/run and make "
                    "test-cluster do)")
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    pytest.skip("launching cluster/local.yaml needs root or passwordless sudo: an sshd on 127.0.0.1:22 and a "
                f"user {HOST_USER!r} for the cluster (ray stop on the head would stop this session's Ray)")


def as_root(root: list[str], script: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*root, "sh", "-c", script], capture_output=True, text=True, timeout=timeout)


def install_packages(root: list[str]) -> None:
    """Debian's openssh-server, rsync and python3-venv, with apt-get when one is missing; else skip."""
    # the host's python3 (the login PATH's) with venv
    venv = subprocess.run(["/usr/bin/python3", "-c", "import ensurepip"], capture_output=True).returncode == 0
    if Path(SSHD).exists() and shutil.which("rsync") and venv:
        return
    if not shutil.which("apt-get"):
        pytest.skip(f"{' '.join(PACKAGES)} are missing and there is no apt-get to install them")
    done = as_root(root, "apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive "
                         f"apt-get -o DPkg::Lock::Timeout=300 install -y -qq {' '.join(PACKAGES)}")
    if done.returncode != 0:
        pytest.skip(f"apt-get could not install {' '.join(PACKAGES)}: {(done.stdout + done.stderr)[-1000:]}")


def pip_settings(directory: Path) -> dict[str, str]:
    """This machine's pip configuration for the host's sessions, which are another user's: the PIP_*
    variables and a merged copy of this user's pip.conf files (where the wheels come from: a local mirror,
    the CPU build of torch; without them the host's `pip install torch` takes PyPI's CUDA build, GBs), and
    uv's (UV_*) and the certificates this machine's installers trust (SSL_CERT_FILE, ...: uv, which the nodes
    install with, trusts only its own roots unless told, and a machine behind a TLS-inspecting proxy then
    fails with "invalid peer certificate")."""
    settings = {name: value for name, value in os.environ.items()
                if name.startswith(("PIP_", "UV_")) and name != "PIP_CONFIG_FILE"
                or name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")}
    files = [Path.home() / ".pip" / "pip.conf",
             Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "pip" / "pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    merged = configparser.ConfigParser(interpolation=None)
    merged.read([str(path) for path in files if path.is_file()])
    if merged.sections():
        with open(directory / "pip.conf", "w") as file:
            merged.write(file)
        (directory / "pip.conf").chmod(0o644)
        settings["PIP_CONFIG_FILE"] = str(directory / "pip.conf")
    return settings


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def host_processes() -> list[psutil.Process]:
    uid = pwd.getpwnam(HOST_USER).pw_uid
    return [proc for proc in psutil.process_iter(["uids", "name"]) if proc.info["uids"].real == uid]


def ray_processes() -> list[str]:
    """Name and command line of every process of the cluster's user but sshd's own (the Ray processes and
    anything they left behind)."""
    found = []
    for proc in host_processes():
        try:
            if proc.name() != "sshd":
                found.append(f"{proc.pid} {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def ssh_host():
    """(user, private key, prefix that runs a command as root) of an SSH server on 127.0.0.1:22 that lets
    only HOST_USER in, with this test's key."""
    with ssh_server() as host:
        yield host


@contextlib.contextmanager
def ssh_server(environment: dict[str, str] | None = None):
    """ssh_host's server; `environment`: more variables for the host's sessions (and so its Ray), e.g. the
    S3 endpoint and credentials of tests/test_rehearsal.py."""
    root = privilege()
    install_packages(root)
    if port_open(22):
        pytest.skip("127.0.0.1:22 is taken by another SSH server (Ray's SSH runner connects to port 22 only)")
    made = as_root(root, f"id -u {HOST_USER} >/dev/null 2>&1 || "
                         # password '*': no password login, but not a locked account (sshd refuses those)
                         f"useradd --create-home --shell /bin/bash --password '*' {HOST_USER}")
    assert made.returncode == 0, made.stderr
    home = Path(pwd.getpwnam(HOST_USER).pw_dir)
    keys = Path(tempfile.mkdtemp(prefix="stal-ssh-"))
    keys.chmod(0o755)  # sshd reads the authorized keys as HOST_USER
    for name in ("host_ed25519", "client_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "client_ed25519.pub").read_text())
    (keys / "authorized_keys").chmod(0o644)
    environment = {
        # the host's Ray keeps out of this machine's shared /tmp/ray (its sessions, session_latest)
        "RAY_TMPDIR": f"{home}/tmp", "RAY_USAGE_STATS_ENABLED": "0", **pip_settings(keys),
        **(environment or {})}
    config = keys / "sshd_config"
    config.write_text(f"""\
Port 22
ListenAddress 127.0.0.1
HostKey {keys}/host_ed25519
PidFile {keys}/sshd.pid
AuthorizedKeysFile {keys}/authorized_keys
StrictModes no
AllowUsers {HOST_USER}
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
SetEnv {" ".join(f'{name}="{value}"' for name, value in environment.items())}
""")
    checked = as_root(root, f"mkdir -p /run/sshd {home}/tmp && chown {HOST_USER} {home}/tmp && "
                            f"{SSHD} -t -f {config}")
    assert checked.returncode == 0, checked.stderr
    log = open(keys / "sshd.log", "w")
    sshd = subprocess.Popen([*root, SSHD, "-D", "-e", "-f", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not port_open(22):
            assert sshd.poll() is None, (keys / "sshd.log").read_text()
            assert time.monotonic() < deadline, "sshd does not listen on 127.0.0.1:22"
            time.sleep(0.2)
        yield HOST_USER, keys / "client_ed25519", root
    finally:
        # every process of the cluster's user, by id (ray down has stopped them when all went well)
        pids = " ".join(str(proc.pid) for proc in host_processes())
        if pids:
            as_root(root, f"kill -9 {pids}")
        as_root(root, f"kill {sshd.pid}")  # sudo passes the signal on to sshd
        sshd.wait(timeout=30)
        log.close()
        shutil.rmtree(keys, ignore_errors=True)


def launch_copy(user: str, key: Path, directory: Path, *,
                num_cpus: int | None = None) -> tuple[Path, dict[str, int]]:
    """cluster/local.yaml with the addresses (head 127.0.0.1, no workers), the user and the key changed, and
    (path, ports) of the copy. The head's ports move off Ray's defaults to free ones: this test session's own
    Ray holds the dashboard agent's 52365 (the head's agent would start without its HTTP server, and the job
    API would answer "No available agent"), and another Ray on this machine may hold 6379 or 8265 (a
    submission to 8265 would go to that cluster). num_cpus: the head's logical CPUs (default: its cores)."""
    config = yaml.safe_load((REPO / "cluster" / "local.yaml").read_text())
    config["provider"]["head_ip"] = "127.0.0.1"
    config["provider"]["worker_ips"] = []
    config["min_workers"] = config["max_workers"] = 0  # "at most len(worker_ips)"
    config["auth"] = {"ssh_user": user, "ssh_private_key": str(key)}
    ports = {"port": free_port(), "dashboard-port": free_port(), "dashboard-agent-listen-port": free_port()}
    start = config["head_start_ray_commands"]
    [head] = [i for i, command in enumerate(start) if "ray start --head" in command]
    assert " --port=6379 " in start[head]
    start[head] = start[head].replace(" --port=6379 ", " ") + "".join(
        f" --{option}={port}" for option, port in ports.items()) + (
        f" --num-cpus={num_cpus}" if num_cpus else "")
    path = directory / "local.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, ports


def ray(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """The Ray CLI of this environment (the user's machine), run from the repository root (file_mounts are
    relative to it)."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run([str(BIN / "ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_local_yaml_launches_trains_and_stops(ssh_host, tmp_path):
    user, key, root = ssh_host
    cluster, ports = launch_copy(user, key, tmp_path)
    cluster, dashboard = str(cluster), f"http://127.0.0.1:{ports['dashboard-port']}"
    name = f"launch-{os.getpid()}"
    started = time.monotonic()
    try:
        up = ray("up", "-y", cluster, timeout=1800)
        print(f"ray up: {time.monotonic() - started:.0f} s")
        assert up.returncode == 0, (up.stdout + up.stderr)[-6000:]
        # the head's job agent registers a little after `ray up` returns: until then a submission is refused
        # with "No available agent" (and nothing runs), so that one answer is retried
        deadline = time.monotonic() + 120
        while True:
            job = ray("job", "submit", "--address", dashboard, "--working-dir", ".", "--",
                      "python", "jobs/train_mars.py", "--name", name,
                      "--set", "train.iterations=1", "--set", "train.checkpoint_every=1", timeout=900)
            output = job.stdout + job.stderr
            if "No available agent" not in output or time.monotonic() > deadline:
                break
            time.sleep(2)
        print(f"ray up + ray job submit: {time.monotonic() - started:.0f} s")
        assert job.returncode == 0 and "succeeded" in output, output[-6000:]
        # the job prints where metrics.json is: the host's ~/ray_results/<name>/ (the default storage path)
        home = pwd.getpwnam(user).pw_dir
        metrics = re.findall(rf"^({re.escape(home)}/\S*/{name}/metrics\.json)$", output, re.M)
        assert metrics and as_root(root, f"test -s {metrics[-1]}").returncode == 0, output[-6000:]
    finally:
        stopping = time.monotonic()
        down = ray("down", "-y", cluster, timeout=600)
        print(f"ray down: {time.monotonic() - stopping:.0f} s")
        # the run's files on the host (the venv stays, as on a user's host)
        as_root(root, f"rm -rf ~{user}/ray_results/{name}")
    assert down.returncode == 0, (down.stdout + down.stderr)[-6000:]
    deadline = time.monotonic() + 60
    while (left := ray_processes()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"still running after ray down: {left}"
    assert not any(port_open(port) for port in ports.values()), ports
