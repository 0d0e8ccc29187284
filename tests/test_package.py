"""The installable package (issue 33): the wheel holds the library, the jobs (stal_ray.jobs, linked from
jobs/), the configs (stal_ray/configs, linked from configs/), a console script per job, the LICENSE and the
metadata; installed into a fresh virtual environment and run outside the checkout, a console script answers
--help and trains from a packaged config given by name."""

import configparser
import email.parser
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
# console script -> the job file whose main() it calls
SCRIPTS = {
    "stal-prepare-mars": "prepare_mars", "stal-prepare-data": "prepare_data",
    "stal-estimate-pose": "estimate_pose", "stal-train": "train_mars", "stal-evaluate": "evaluate_mars",
    "stal-tune": "tune_stal", "stal-study": "study", "stal-splits": "splits",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built without network (the build backend from this environment) from a copy of what it is
    made of, links kept as git and rsync -a keep them, so setuptools' build/ stays out of the checkout."""
    pytest.importorskip("setuptools", minversion="77")  # pyproject.toml's [build-system]
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    for name in ("stal_ray", "jobs", "configs"):
        shutil.copytree(REPO / name, source / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    assert (source / "stal_ray" / "jobs").is_symlink() and (source / "stal_ray" / "configs").is_symlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--wheel-dir", str(tmp / "dist"), str(source)],
                   check=True, capture_output=True, text=True, timeout=300)
    (built,) = (tmp / "dist").glob("stal_ray-*.whl")
    return built


def test_the_wheel_holds_jobs_configs_scripts_license_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{info}/entry_points.txt").decode())
        packaged_yaml = {name: archive.read(name) for name in names if name.startswith("stal_ray/configs/")}
    # one package at the top: no bare jobs/ or configs/ beside it in site-packages
    assert {name.split("/")[0] for name in names} == {"stal_ray", info}
    # every job of the checkout, as a module of stal_ray.jobs
    jobs = sorted(path.name for path in (REPO / "jobs").glob("*.py"))
    assert {f"stal_ray/jobs/{job}" for job in jobs} <= names and "stal_ray/jobs/__init__.py" in names
    # every config, byte for byte (their base: chains are relative: they resolve among themselves)
    assert packaged_yaml == {f"stal_ray/configs/{path.name}": path.read_bytes()
                             for path in (REPO / "configs").glob("*.yaml")}
    assert "stal_ray/configs/mars_resnet50.yaml" in names and "stal_ray/config.py" in names
    # a console script per job, each the main() of a job the wheel holds
    scripts = dict(entry_points["console_scripts"])
    assert scripts == {script: f"stal_ray.jobs.{job}:main" for script, job in SCRIPTS.items()}
    assert all(f"stal_ray/jobs/{job}.py" in names for job in SCRIPTS.values())
    # the LICENSE and the metadata
    assert f"{info}/licenses/LICENSE" in names
    assert metadata["License-Expression"] == "Apache-2.0"
    classifiers = metadata.get_all("Classifier")
    assert {f"Programming Language :: Python :: 3.{minor}" for minor in (11, 12)} <= set(classifiers)
    assert any(classifier.startswith("Topic :: Scientific/Engineering") for classifier in classifiers)
    assert "person re-identification" in metadata["Keywords"] and metadata["Requires-Python"]
    assert metadata["Description-Content-Type"] == "text/markdown" and "stal_ray" in metadata.get_payload()
    # ranges, not pins: the package installs beside another Ray; requirements.lock holds the exact versions
    requirements = [Requirement(text) for text in metadata.get_all("Requires-Dist")]
    ray = next(r for r in requirements if r.name == "ray")
    assert ray.specifier.contains("2.60.0") and ray.specifier.contains("2.61.0")
    assert not any(spec.operator in ("==", "===") for r in requirements for spec in r.specifier)


def install_in_fresh_environment(wheel: Path, root: Path) -> Path:
    """A virtual environment of its own (no system site-packages, no pip) with the wheel installed, that
    then finds the dependencies in this environment's site-packages through a .pth file (no network), after
    its own: the wheel's stal_ray, not the checkout's editable one, is the one imported. The .pth comes after
    the install, so that pip never sees (nor offers to uninstall) this environment's stal_ray."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    # nothing of the checkout in sight either (PYTHONPATH, an egg-info in the working directory)
    alone = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300, cwd=root.parent, env=alone)
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    ours = [path for path in sys.path if path.endswith("site-packages") and Path(path).is_dir()]
    Path(own, "_stal_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    return python


@pytest.mark.e2e  # a virtual environment, the wheel installed, --help and a short training: ~2 minutes
def test_installed_outside_the_checkout_the_console_scripts_help_and_train(wheel, tmp_path):
    python = install_in_fresh_environment(wheel, tmp_path / "venv")
    bin_ = tmp_path / "venv" / "bin"
    assert all((bin_ / script).is_file() for script in SCRIPTS)
    work = tmp_path / "work"  # outside the checkout, nothing of it on the path
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "RAY_ADDRESS")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PATH=f"{bin_}{os.pathsep}{env['PATH']}")

    def run(*command: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)

    # the installed files, not the checkout's (the job found, not imported: that takes the heavy stack)
    where = run(str(python), "-c", "import importlib.util as u, stal_ray.config as c; print(c.__file__); "
                "print(c.PACKAGED_CONFIGS); print(u.find_spec('stal_ray.jobs.train_mars').origin)",
                timeout=60)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(line.startswith(str(tmp_path / "venv")) for line in where.stdout.split()), where.stdout

    started = time.monotonic()
    helped = run(str(bin_ / "stal-train"), "--help", timeout=180)
    help_seconds = time.monotonic() - started
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "usage: stal-train" in helped.stdout and "mars_resnet50" in helped.stdout
    print(f"stal-train --help: {help_seconds:.1f} s")

    started = time.monotonic()
    trained = run(str(bin_ / "stal-train"), "--config", "synthetic_tiny",
                  "--storage-path", str(tmp_path / "runs"), "--name", "packaged", "--no-eval",
                  "--set", "train.iterations=4",
                  "--set", "train.checkpoint_every=4", "--set", "train.log_every=2", timeout=600)
    print(f"stal-train of 4 iterations: {time.monotonic() - started:.1f} s")
    output = trained.stdout + trained.stderr
    assert trained.returncode == 0, output[-4000:]
    run_folder = tmp_path / "runs" / "packaged"
    assert (run_folder / "model.pt").is_file(), output[-4000:]
    assert "backbone: tiny" in (run_folder / "config.yaml").read_text()
    assert "iteration 4/4" in output, output[-4000:]
