"""Ray cluster launcher files in cluster/: Ray's own validation as in `ray up`, node types, setup, README."""

import copy
import importlib.util
import ipaddress
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from click import ClickException
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
CONFIGS = ("aws_gpu.yaml", "local.yaml")
JOBS = {"prepare_mars.py", "train_mars.py", "evaluate_mars.py", "tune_stal.py"}
DLAMI_SSM = "resolve:ssm:/aws/service/deeplearning/ami/"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def prepared(config: dict) -> dict:
    """What `ray up` checks (commands._bootstrap_config): defaults of the provider filled in, then Ray's own
    validation against ray/autoscaler/ray-schema.json plus its cross-field checks. The AWS resource
    autodetection in between needs EC2 access; the files give `resources` themselves."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


@pytest.mark.parametrize("name", CONFIGS)
def test_config_passes_rays_validation(name):
    config = prepared(load(name))
    assert config["head_node_type"] in config["available_node_types"]


def test_aws_node_types():
    config = prepared(load("aws_gpu.yaml"))
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "tasks would run on the head"
    assert not head["resources"].get("GPU")
    workers = {name: spec for name, spec in types.items() if name != config["head_node_type"]}
    gpu = [spec for spec in workers.values() if spec["resources"].get("GPU", 0) > 0]
    cpu = [spec for spec in workers.values() if spec not in gpu and spec["resources"].get("CPU", 0) > 0]
    assert gpu and cpu, "needs a GPU worker type and a CPU worker type"
    for spec in workers.values():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"]
        # S3 access for the workers comes from an instance profile (the head's is created by `ray up`)
        assert "IamInstanceProfile" in spec["node_config"]
    for spec in types.values():
        image = spec["node_config"]["ImageId"]
        assert image.startswith(DLAMI_SSM) or re.fullmatch(r"ami-[0-9a-f]{8,17}", image), image
    assert gpu[0]["node_config"]["InstanceType"] == "p4d.24xlarge" and gpu[0]["resources"]["GPU"] == 8


def test_local_hosts():
    config = prepared(load("local.yaml"))
    provider = config["provider"]
    assert provider["type"] == "local"
    hosts = [provider["head_ip"], *provider["worker_ips"]]
    for host in hosts:
        ipaddress.ip_address(host)
    assert len(set(hosts)) == len(hosts)
    assert config["auth"]["ssh_user"] and config["auth"]["ssh_private_key"]
    node_type = config["available_node_types"][config["head_node_type"]]
    assert node_type["min_workers"] == node_type["max_workers"] == len(provider["worker_ips"])


@pytest.mark.parametrize("name", CONFIGS)
def test_setup_installs_the_project_from_the_lock_as_make_venv_does(name):
    config = load(name)
    commands = config["setup_commands"]
    makefile = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"^export TORCH_PIN \?= (\S+)$", makefile, re.M).group(1)
    # one installation everywhere: the Makefile's .venv and every node run tools/install.sh
    assert re.search(r"^\tPYTHON=\S+ tools/install.sh \$\(VENV\)", makefile, re.M)
    installs = [command for command in commands if "tools/install.sh ~/stal-venv" in command]
    assert len(installs) == 1 and installs[0].startswith("cd ~/stal_ray && "), commands
    # the pose models on every node (estimate_pose.py): onnxruntime-gpu where there is a GPU, else the CPU
    # build, never both (they are one module)
    assert "if nvidia-smi -L > /dev/null 2>&1; then extra=pose-gpu; else extra=pose; fi" in installs[0]
    assert installs[0].endswith('tools/install.sh ~/stal-venv "$extra"')
    assert f"TORCH_PIN=${{TORCH_PIN:-{torch_pin}}}" in (REPO / "tools" / "install.sh").read_text()
    # anything installed besides goes by the lock's pins too
    for command in commands + config["head_setup_commands"]:
        if "pip install" in command:
            assert "--constraint ~/stal-venv/lock-pins.txt" in command and "lock.py pins" in command, command
    # the lock pins the Ray these tests run (the client of `ray job submit` must be the cluster's) and torch
    pins = [line.split(" ; ")[0] for line in lock_tool().pins((REPO / "requirements.lock").read_text())]
    assert f"ray=={ray.__version__}" in pins and torch_pin in pins
    # every node must find the environment's ray and python, also the entrypoints of `ray job submit`
    for start in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        venv_first = 'export PATH="$HOME/stal-venv/bin:$PATH"' in start
        assert start.startswith("~/stal-venv/bin/ray stop") or venv_first, start


@pytest.mark.parametrize("name", CONFIGS)
def test_file_mounts_hold_what_pip_install_needs(name):
    mounts = load(name)["file_mounts"]
    for remote, local in mounts.items():
        assert remote.startswith("~/stal_ray/")
        assert (REPO / local).exists(), f"{local} is not in the repository (ray up runs from its root)"
    readme = re.search(r'^readme = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    needed = {"pyproject.toml", readme, "stal_ray", "requirements.lock", "tools"}
    assert needed <= {Path(local).as_posix() for local in mounts.values()}


def lock_tool():
    spec = importlib.util.spec_from_file_location("lock_tool", REPO / "tools" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_resources(config):
    del config["available_node_types"]["cpu_worker"]["resources"]


def _no_node_config(config):
    del config["available_node_types"]["gpu_worker"]["node_config"]


def _unknown_key(config):
    config["worker_count"] = 4


def _unknown_node_type_key(config):
    config["available_node_types"]["gpu_worker"]["instance_type"] = "p4d.24xlarge"


def _fractional_gpu(config):
    config["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5


def _bad_head_type(config):
    config["head_node_type"] = "gpu_head"


def _too_many_min_workers(config):
    config["available_node_types"]["cpu_worker"]["min_workers"] = config["max_workers"] + 1


@pytest.mark.parametrize(("break_it", "error"), [
    (_no_resources, jsonschema.ValidationError),
    (_no_node_config, jsonschema.ValidationError),
    (_unknown_key, jsonschema.ValidationError),
    (_unknown_node_type_key, jsonschema.ValidationError),
    (_fractional_gpu, jsonschema.ValidationError),
    (_bad_head_type, (KeyError, ValueError)),
    (_too_many_min_workers, ValueError),
])
def test_broken_aws_config_is_rejected(break_it, error):
    config = load("aws_gpu.yaml")
    prepared(config)
    break_it(config)
    with pytest.raises(error):
        prepared(config)


def test_broken_local_config_is_rejected():
    config = load("local.yaml")
    del config["provider"]["worker_ips"]
    with pytest.raises(ClickException):
        prepared(config)
    config = load("local.yaml")
    config["worker_setup_command"] = ["pip install -e ."]  # a misspelt key is an error, not ignored
    with pytest.raises(jsonschema.ValidationError):
        prepared(config)


def readme_commands() -> list[str]:
    """Shell commands of cluster/README.md's code blocks, continuation lines joined."""
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"^```(?:bash|sh)?\n(.*?)^```", text, re.S | re.M)
    assert blocks, "no code blocks in cluster/README.md"
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()]
    return commands


def job_invocations() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every `python jobs/X.py ...` in cluster/README.md's code blocks."""
    found = []
    for command in readme_commands():
        if "python jobs/" not in command:
            continue
        words = shlex.split(command)
        for i, word in enumerate(words[:-1]):
            if word == "python" and words[i + 1].startswith("jobs/"):
                found.append((words[i + 1], words[i + 2:]))
    return found


def test_readme_shows_the_whole_workflow():
    commands = " ".join(readme_commands())
    for step in ("ray up cluster/aws_gpu.yaml", "ray dashboard cluster/aws_gpu.yaml",
                 "ray down cluster/aws_gpu.yaml",
                 "ray job submit --address http://localhost:8265 --working-dir . -- "
                 "python jobs/train_mars.py --config configs/mars_resnet50.yaml --data s3://my-bucket/mars "
                 "--num-workers 8 --use-gpu",
                 "tensorboard --logdir s3://", "--storage-path s3://"):
        assert step in commands, step
    scripts = {Path(script).name for script, _ in job_invocations()}
    assert scripts == JOBS


def test_readme_jobs_and_configs_exist():
    invocations = job_invocations()
    for script, args in invocations:
        name = Path(script).name
        assert script == f"jobs/{name}"
        assert (REPO / script).is_file(), f"{script} does not exist"
        if "--config" in args:
            config = args[args.index("--config") + 1]
            assert re.fullmatch(r"configs/[\w.-]+\.yaml", config) and (REPO / config).is_file(), config
    mentioned = set(re.findall(r"\bconfigs/[\w.-]+\.yaml", (CLUSTER / "README.md").read_text()))
    assert mentioned, "cluster/README.md names no config file"
    for config in mentioned:
        assert (REPO / config).is_file(), f"{config} does not exist"


@pytest.mark.parametrize("job", sorted(JOBS))
def test_readme_job_commands_parse(job):
    """Every job invocation in the README passes that job's own argument parser."""
    spec = importlib.util.spec_from_file_location(job[:-3], REPO / "jobs" / job)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = [args for script, args in job_invocations() if script == f"jobs/{job}"]
    assert calls
    for args in calls:
        try:
            module.parse_args(args)
        except SystemExit:
            pytest.fail(f"jobs/{job} rejects the README's arguments {args}")


def test_aws_file_installs_and_starts_the_head_as_the_launched_local_file():
    """What tests/test_cluster_launch.py runs of local.yaml is what aws_gpu.yaml runs on its nodes too: the
    same copies, the same setup commands and the same head start but for the AWS file's object manager port
    (cluster/README.md, "Launched here")."""
    aws, local = load("aws_gpu.yaml"), load("local.yaml")
    for key in ("file_mounts", "rsync_exclude", "initialization_commands", "setup_commands"):
        assert aws[key] == local[key], key
    aws_head = aws["head_start_ray_commands"]
    assert [command.replace(" --object-manager-port=8076", "") for command in aws_head] == \
        local["head_start_ray_commands"]
