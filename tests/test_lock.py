"""requirements.lock: uv's universal lock for every Python that pyproject.toml claims, with hashes and the GPU
nodes' CUDA packages; it pins all that pyproject.toml asks for, and pip's fallback reads its pins."""

import importlib.util
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the Makefile's

REPO = Path(__file__).resolve().parent.parent


def lock_tool():
    spec = importlib.util.spec_from_file_location("lock_tool", REPO / "tools" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def name_of(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-").replace(".", "-")


def test_pins_drop_hashes_and_comments_and_keep_markers():
    text = ("# header\nnumpy==2.4.6 ; python_full_version < '3.12' \\\n    --hash=sha256:00 \\\n"
            "    --hash=sha256:11\n    # via ray\nray==2.60.0 \\\n    --hash=sha256:22\n")
    assert lock_tool().pins(text) == ["numpy==2.4.6 ; python_full_version < '3.12'", "ray==2.60.0"]


def test_claimed_pythons_come_from_a_closed_requires_python():
    tool = lock_tool()
    assert tool.claimed_pythons(">=3.11,<3.13") == ["3.11", "3.12"]
    with pytest.raises(ValueError, match="closed above"):
        tool.claimed_pythons(">=3.10")


def test_lock_pins_every_requirement_of_pyproject_with_hashes_for_the_pythons_it_claims():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert lock_tool().claimed_pythons(project["requires-python"]) == ["3.11", "3.12"]  # the nodes' and CI's
    extras = project["optional-dependencies"].values()
    wanted = project["dependencies"] + [requirement for extra in extras for requirement in extra]
    text = (REPO / "requirements.lock").read_text()
    lines = lock_tool().pins(text)
    pinned = {name_of(line) for line in lines}
    missing = {name_of(r) for r in wanted} - pinned
    assert not missing, f"not in requirements.lock: {sorted(missing)}; run `make lock`"
    # every pin carries its hashes (uv checks every file it installs against them)
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert all("--hash=sha256:" in block for block in blocks if "==" in block)
    ray_range = Requirement(next(r for r in project["dependencies"] if r.startswith("ray[")))
    ray_locked = next(line.split(" ; ")[0].split("==")[1] for line in lines if line.startswith("ray=="))
    assert ray_range.specifier.contains(ray_locked), "the lock's Ray is outside pyproject's range"
    # the GPU nodes' CUDA build of torch resolves from the lock too, under a Linux marker
    assert any(line.startswith("triton==") and "sys_platform == 'linux'" in line for line in lines)
    assert any(line.startswith("nvidia-cudnn-cu") for line in lines)
    assert "torch==2.13.0" in lines


def test_the_package_asks_for_ranges_and_only_the_lock_pins():
    """An exact pin in the package's metadata would refuse every other version beside it (issue 33)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    for requirement in project["dependencies"] + [r for extra in extras for r in extra]:
        operators = {spec.operator for spec in Requirement(requirement).specifier}
        assert not operators & {"==", "==="}, f"{requirement}: an exact pin belongs in requirements.lock"
