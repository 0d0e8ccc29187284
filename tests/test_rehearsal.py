"""The real job, rehearsed: README's commands for MARS on a cluster, run as README writes them (read from it,
so the docs cannot drift from what runs), on cluster/local.yaml launched over SSH on 127.0.0.1 (the launch of
tests/test_cluster_launch.py) with S3 on moto's server: prepare a MARS-structured release, estimate pose,
train configs/mars_resnet50.yaml, evaluate, tune two trials, train again from Tune's best.yaml on S3.

The only edits made to README's commands (SUBSTITUTIONS, applied by `rehearsed`), each because this machine
is not a GPU cluster with the real MARS on it:
* `s3://bucket/` -> a bucket on the moto server (its endpoint and fake credentials are set in the
  environment of this machine's commands and of the cluster's host: no `--endpoint-url` is added);
* `/data/MARS` -> a small release with MARS's structure (bench/scale.py's index and frame pool: every
  EVERY-th identity of the real index, tracklets cut to MAX_FRAMES frames);
* `--use-gpu` dropped and train.use_gpu=false set (no GPU; the MARS configs ask for one), `--num-workers N`
  -> 1 and `--num-samples N` -> 2 (2 CPU cores);
* the jobs that train get `--set` settings that shrink the run (SHRINK: iterations, image size, frames and
  clips per batch) and `model.pretrained` -> the same kind of file (ResNet-50 with torchvision's names, seeded
  random values) served by a local HTTP server with its sha256 in its name, as torchvision's is.
The cluster file is changed as test_cluster_launch.py changes it (head 127.0.0.1, no workers, free ports) and
given 8 logical CPUs (`--num-cpus`, as ray_init gives a local Ray on a small machine). `ray job submit`
finds the cluster through RAY_ADDRESS (the dashboard's address), as after `ray dashboard`.

Slow (the host's first install, then ResNet-50 on CPU): only with STAL_TEST_REHEARSAL=1 (`make
test-rehearsal`, which .ci/run runs after `make test`), and it needs what the launch test needs (root or
passwordless sudo, port 22). test_every_readme_job_command_is_rehearsed_or_tested always runs.
"""

import functools
import hashlib
import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_cluster_launch import BIN, REPO, as_root, launch_copy, ray, ssh_server

README = REPO / "README.md"
SECTION = "On a Ray cluster ("  # the paragraph whose bash block is the path rehearsed
EVERY, MAX_FRAMES, POOL = 40, 3, 256
SHRINK = ("train.iterations=2", "train.checkpoint_every=1", "train.log_every=1", "tune.grace_iterations=1",
          "data.height=64", "data.width=32", "data.seq_len=3", "data.identities_per_batch=2",
          "data.clips_per_identity=2", "eval.batch_size=16")
TRAINING_JOBS = ("jobs/train_mars.py", "jobs/tune_stal.py")


def readme_commands() -> list[list[str]]:
    """The commands of README's cluster section: its bash block, continuation lines joined, comments
    dropped, each split as the shell would."""
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(SECTION):], re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [words for line in lines if (words := shlex.split(line, comments=True))]


def rehearsed(command: list[str], *, bucket: str, release: str, weights_url: str) -> list[str]:
    """README's command with SUBSTITUTIONS (the module docstring) and nothing else."""
    out, words = [], iter(command)
    for word in words:
        if word == "--use-gpu":
            continue
        out.append(word.replace("s3://bucket/", f"{bucket}/").replace("/data/MARS", release))
        if word == "--num-workers":
            next(words)
            out.append("1")
        elif word == "--num-samples":
            next(words)
            out.append("2")
    if any(job in command for job in TRAINING_JOBS):
        out += [item for setting in (*SHRINK, "train.use_gpu=false", "train.num_workers=1",
                                     f"model.pretrained={weights_url}")
                for item in ("--set", setting)]
    return out



def test_the_readme_path_is_whole():
    """README's cluster section goes release -> pose -> train -> evaluate -> tune -> train from best.yaml."""
    jobs = [next(word for word in command if word.startswith("jobs/")) for command in readme_commands()]
    assert jobs == ["jobs/prepare_mars.py", "jobs/estimate_pose.py", "jobs/train_mars.py",
                    "jobs/evaluate_mars.py", "jobs/tune_stal.py", "jobs/train_mars.py"]
    commands = readme_commands()
    assert commands[-1][commands[-1].index("--config") + 1] == "s3://bucket/ray_results/mars-tune/best.yaml"
    assert "--name" in commands[4] and commands[4][commands[4].index("--name") + 1] == "mars-tune"


def test_every_readme_job_command_is_rehearsed_or_tested():
    """Every job a README command runs is in the rehearsal or named by another test file."""
    rehearsed_jobs = {word for command in readme_commands() for word in command if word.startswith("jobs/")}
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), re.S)
    in_readme = {match for block in blocks for match in re.findall(r"jobs/\w+\.py", block)}
    tests = "\n".join(path.read_text() for path in (REPO / "tests").glob("test_*.py")
                      if path.name != "test_rehearsal.py")
    untested = {job for job in in_readme - rehearsed_jobs
                if job not in tests and f"import {Path(job).stem}" not in tests}
    assert not untested, f"README runs {sorted(untested)}, which no test runs"


# ------------------------------------------------------------------------------------------ the rehearsal

def small_mars_release(root: Path) -> str:
    """bench/scale.py's MARS-structured release, every EVERY-th identity, tracklets cut to MAX_FRAMES."""
    sys.path.insert(0, str(REPO))
    from bench.scale import scaled_index, write_pool, write_release

    index = scaled_index(EVERY)
    for split in ("train", "test"):
        table = index[split]
        lengths = np.minimum(table[:, 1] - table[:, 0] + 1, MAX_FRAMES)
        last = np.cumsum(lengths)
        table[:, 0], table[:, 1] = last - lengths + 1, last
    write_release(root / "MARS", index, write_pool(root / "pool", POOL))
    return str(root / "MARS")


@pytest.fixture
def weights(tmp_path):
    """URL of ResNet-50 weights with torchvision's names (seeded: the same file, so the host's cache keeps
    one), named <stem>-<sha256 prefix>.pth as torchvision's are, served over HTTP on 127.0.0.1."""
    import torch

    from stal_ray.model.backbones import build_backbone

    folder = tmp_path / "weights"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(build_backbone("resnet50").state_dict(), folder / "resnet50.pth")
    digest = hashlib.sha256((folder / "resnet50.pth").read_bytes()).hexdigest()[:8]
    (folder / "resnet50.pth").rename(folder / f"resnet50-{digest}.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/resnet50-{digest}.pth"
    server.shutdown()


def run(command: list[str], env: dict[str, str], timeout: float = 1800) -> str:
    """A README command from the repository root with this environment's `python` and `ray` first on PATH;
    a submission refused with "No available agent" (the head's job agent registers a little after `ray up`)
    is tried again. Returns its output; fails the test when it fails."""
    deadline = time.monotonic() + 120
    while True:
        started = time.monotonic()
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        if "No available agent" not in output or time.monotonic() > deadline:
            break
        time.sleep(2)
    job = next(word for word in command if word.startswith("jobs/"))
    print(f"{job}: {time.monotonic() - started:.0f} s", flush=True)
    for line in re.findall(r"^(?:stream: |warning: the GPUs|test mAP |.*written \(version).*$", output, re.M):
        print(f"  {line[:300]}", flush=True)
    submitted = command[:3] == ["ray", "job", "submit"]
    assert done.returncode == 0 and (not submitted or "succeeded" in output), \
        f"{shlex.join(command)}\n{output[-8000:]}"
    return output


@pytest.mark.skipif(os.environ.get("STAL_TEST_REHEARSAL") != "1",
                    reason="the rehearsal takes ~20 minutes: STAL_TEST_REHEARSAL=1 (make test-rehearsal)")
def test_readme_cluster_path_runs_as_written(moto_server, make_bucket, weights, tmp_path):
    from stal_ray.core.storage import filesystem
    from stal_ray.data.prepared.manifest import read_manifest

    started = time.monotonic()
    bucket = make_bucket()
    release = small_mars_release(tmp_path)
    s3 = {"AWS_ENDPOINT_URL_S3": moto_server,
          **{name: os.environ[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                 "AWS_DEFAULT_REGION")}}
    with ssh_server(s3) as (user, key, root):
        cluster, ports = launch_copy(user, key, tmp_path, num_cpus=8)
        env = dict(os.environ, **s3, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
                   RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS=f"http://127.0.0.1:{ports['dashboard-port']}")
        try:
            up = ray("up", "-y", str(cluster), timeout=1800)
            assert up.returncode == 0, (up.stdout + up.stderr)[-6000:]
            print(f"ray up: {time.monotonic() - started:.0f} s", flush=True)
            outputs = [run(rehearsed(command, bucket=bucket, release=release, weights_url=weights), env)
                       for command in readme_commands()]
        finally:
            down = ray("down", "-y", str(cluster), timeout=600)
            as_root(root, f"rm -rf ~{user}/ray_results")
        assert down.returncode == 0, (down.stdout + down.stderr)[-6000:]
    print(f"rehearsal: {time.monotonic() - started:.0f} s", flush=True)

    data = f"{bucket}/mars"
    manifest = read_manifest(data, endpoint_url=moto_server)
    # estimate_pose.py's joints
    assert manifest.pose and manifest.counts["train"]["frames_with_keypoints"] > 0
    fs, _ = filesystem(data, endpoint_url=moto_server)
    results = f"{bucket}/ray_results"
    for path in (f"{results}/mars-r50/model.pt", f"{bucket}/eval/mars-r50/metrics.json",
                 f"{results}/mars-tune/best.yaml", f"{results}/mars-r50-tuned/metrics.json"):
        assert fs.exists(path), path
    train_output = outputs[2]
    assert re.search(r"^stream: ~[\d,]+ frames/s", train_output, re.M), train_output[-4000:]
    # the tuned run trained with the search's best settings, read from best.yaml on S3
    best = yaml.safe_load(fs.cat(f"{results}/mars-tune/best.yaml"))
    tuned = yaml.safe_load(fs.cat(f"{results}/mars-r50-tuned/config.yaml"))
    for key in ("local_weight", "margin_global", "margin_local"):
        assert tuned["train"][key] == best["train"][key], key
    metrics = json.loads(fs.cat(f"{bucket}/eval/mars-r50/metrics.json"))
    assert 0 <= metrics["modes"]["stal"]["mAP"] <= 1
