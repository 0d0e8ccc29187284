"""The jobs: thin entry points that parse arguments, build a Config, call one library function and print.

Run from a checkout as files (`python jobs/train_mars.py`, `ray job submit -- python jobs/train_mars.py`);
installed, the same modules are `stal_ray.jobs.*` (stal_ray/jobs is a link to this folder, copied into the
wheel) and pyproject.toml's console scripts call their main(): stal-train, stal-evaluate, ...
"""
