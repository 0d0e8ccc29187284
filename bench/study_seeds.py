"""Figures of several studies (seeds, data sets) side by side with their mean and spread: the issue-17 tables.

    python bench/study_seeds.py /tmp/attn/occ0-clip-s0 /tmp/attn/occ0-clip-s1 ...   (study --out folders)

One row per study: mAP (%) of the attention ablation (baseline, tan, san, stal; d = d_l + α·d_g), the
differences to baseline, the hidden/visible score of the same part and the occluded/clean frame score; then
mean ± sample standard deviation per group of studies with the same name but for a trailing "-sN" (the
table of stal_ray/study/seeds.py, which `jobs/study.py --seeds` writes itself).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stal_ray.study.seeds import seeds_table  # noqa: E402


def main(folders: list[str]) -> None:
    print(seeds_table({Path(f).name: json.loads((Path(f) / "results.json").read_text()) for f in folders}))


if __name__ == "__main__":
    main(sys.argv[1:])
