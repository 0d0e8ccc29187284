"""requirements.lock: written by tools/lock.py from pip's report; it pins all that pyproject.toml asks for."""

import importlib.util
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, as the Makefile's

REPO = Path(__file__).resolve().parent.parent


def lock_tool():
    spec = importlib.util.spec_from_file_location("lock_tool", REPO / "tools" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def name_of(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-").replace(".", "-")


def test_pins_leave_out_the_project_and_torchs_build_label():
    report = {"install": [{"metadata": {"name": name, "version": version}} for name, version in (
        ("stal_ray", "0.1.0"), ("torch", "2.13.0+cpu"), ("Ray", "2.60.0"), ("typing_extensions", "4.16.0"))]}
    assert lock_tool().pins(report) == ["ray==2.60.0", "torch==2.13.0", "typing-extensions==4.16.0"]


def test_lock_pins_every_requirement_of_pyproject_once():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    wanted = project["dependencies"] + [requirement for extra in extras for requirement in extra]
    lines = [line for line in (REPO / "requirements.lock").read_text().splitlines()
             if line and not line.startswith("#")]
    pinned = [name_of(line) for line in lines]
    assert all(re.fullmatch(r"[a-z0-9-]+==[^=\s]+", line) for line in lines), "one name==version a line"
    assert len(pinned) == len(set(pinned)), "a package is pinned twice"
    missing = {name_of(r) for r in wanted} - set(pinned)
    assert not missing, f"not in requirements.lock: {sorted(missing)}; run `make lock`"
    ray_pin = next(r for r in project["dependencies"] if r.startswith("ray["))
    assert f"ray=={ray_pin.split('==')[1]}" in lines, "the lock's Ray is not pyproject's"
