"""requirements.lock: every package of stal_ray's environment at one version, for every Python that
pyproject.toml's requires-python claims and every platform the nodes run (CPU machines, and the GPU nodes'
CUDA wheels: torch's nvidia-* and triton, under their markers), each with its sha256 hashes. A universal lock
written by uv (`uv pip compile --universal`), read by uv and, without its hashes, by pip.

    python tools/lock.py UV             renew it (make lock): pyproject.toml's ranges and extras, torch at
                                        TORCH_PIN, the versions already in the lock kept where they still fit
    python tools/lock.py UV check       CI: for every claimed Python, the lock resolves on Linux x86_64 from
                                        wheels alone, to exactly its own pins
    python tools/lock.py pins           the lock's pins without hashes, for pip's --constraint (pip reads a
                                        hashed constraints file as a demand to hash every requirement)
"""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
EXTRAS = ("test", "tensorboard", "pose", "pose-gpu")  # pose and pose-gpu: never installed together
PROJECT = "stal_ray"
PLATFORM = "x86_64-manylinux_2_28"  # the nodes: Ubuntu 24.04 on AWS, the CPU machines that run the tests
SOURCE_ONLY = ("deepspeed",)  # published as a source distribution only: built on install
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def claimed_pythons(requires_python: str) -> list[str]:
    """The minor versions a `>=3.A,<3.B` requires-python claims: ['3.A', ..., '3.(B-1)']."""
    low = re.search(r">=\s*3\.(\d+)", requires_python)
    high = re.search(r"<\s*3\.(\d+)", requires_python)
    if not low or not high:
        raise ValueError(f"requires-python = {requires_python!r}: expected a range like '>=3.11,<3.13', "
                         "closed above, so the lock can be checked for every Python it claims")
    return [f"3.{minor}" for minor in range(int(low.group(1)), int(high.group(1)))]


def requires_python(pyproject: Path = REPO / "pyproject.toml") -> str:
    match = re.search(r'^requires-python\s*=\s*"([^"]+)"', pyproject.read_text(), re.MULTILINE)
    if not match:
        raise ValueError(f"{pyproject}: no requires-python")
    return match.group(1)


def pins(text: str) -> list[str]:
    """The lock's `name==version[ ; marker]` lines, without hashes or comments."""
    found = []
    for line in text.splitlines():
        match = PIN.match(line)
        if match:
            name, version, marker = match.groups()
            found.append(f"{name}=={version}" + (f" ; {marker}" if marker else ""))
    return found


def compile_lock(uv: str, torch_pin: str) -> None:
    extras = [arg for extra in EXTRAS for arg in ("--extra", extra)]
    # the torch pin from stdin ("-"): a file's name would go into the lock's annotations
    subprocess.run([uv, "pip", "compile", "pyproject.toml", "-", *extras, "--universal",
                    "--python-version", claimed_pythons(requires_python())[0], "--generate-hashes",
                    "--no-emit-package", PROJECT, "--custom-compile-command", "make lock",
                    "--output-file", str(LOCK)], cwd=REPO, check=True, input=torch_pin + "\n", text=True)


def check(uv: str) -> int:
    """0 when the lock resolves to its own pins for every claimed Python; else 1, with what differs."""
    locked = {line.split(" ; ")[0].lower() for line in pins(LOCK.read_text())}
    # a wheel for this Python and platform, for every package that publishes wheels at all
    wheels = [arg for pin in sorted(locked) if pin.split("==")[0] not in SOURCE_ONLY
              for arg in ("--only-binary", pin.split("==")[0])]
    failed = 0
    for python in claimed_pythons(requires_python()):
        result = subprocess.run([uv, "pip", "compile", str(LOCK), "--python-version", python,
                                 "--python-platform", PLATFORM, *wheels, "--no-header", "--no-annotate",
                                 "--quiet"], capture_output=True, text=True, cwd=REPO)
        resolved = {line.split(" ; ")[0].lower() for line in pins(result.stdout)}
        extra = sorted(resolved - locked)
        if result.returncode or extra:
            failed = 1
            why = result.stderr.strip() or f"it adds packages the lock lacks: {', '.join(extra)}"
            print(f"requirements.lock does not resolve for Python {python} on {PLATFORM}: {why}; run "
                  "`make lock`", file=sys.stderr)
        else:
            print(f"requirements.lock resolves for Python {python} on {PLATFORM}: {len(resolved)} packages")
    return failed


if __name__ == "__main__":
    if sys.argv[1:] == ["pins"]:
        print("\n".join(pins(LOCK.read_text())))
    elif len(sys.argv) == 3 and sys.argv[2] == "check":
        sys.exit(check(sys.argv[1]))
    elif len(sys.argv) == 2:
        compile_lock(sys.argv[1], os.environ.get("TORCH_PIN", "torch==2.13.0"))
    else:
        sys.exit(__doc__)
