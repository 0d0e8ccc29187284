"""Figures of several studies (seeds, data sets) side by side with their mean and spread: the issue-17 tables.

    python bench/study_seeds.py /tmp/attn/occ0-clip-s0 /tmp/attn/occ0-clip-s1 ...   (study --out folders)

One row per study: mAP (%) of the attention ablation (baseline, tan, san, stal; d = d_l + α·d_g), the
differences to baseline, the hidden/visible score of the same part and the occluded/clean frame score; then
mean ± sample standard deviation per group of studies with the same configuration changes and data.
"""

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

MODES = ("baseline", "tan", "san", "stal")
COLUMNS = ("baseline", "tan", "san", "stal", "tan − baseline", "stal − baseline", "hidden/visible",
           "occluded/clean frame")


def figures(results: dict) -> list[float]:
    maps = {m: 100 * results["attention_ablation"][m]["mAP"] for m in MODES}
    occlusion = results["occlusion"].get("stal", {})
    return [*maps.values(), maps["tan"] - maps["baseline"], maps["stal"] - maps["baseline"],
            occlusion.get("within_part_ratio", float("nan")), occlusion.get("frame_ratio", float("nan"))]


def _cell(value: float, spread: float | None, index: int) -> str:
    digits = 1 if index < 6 else 3
    text = "–" if np.isnan(value) else f"{value:.{digits}f}"
    if spread is None or np.isnan(value):
        return text
    return text if np.isnan(spread) else f"{text} ± {spread:.{digits}f}"


def main(folders: list[str]) -> None:
    groups = defaultdict(list)
    print("| study | queries | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 2))
    for folder in folders:
        results = json.loads((Path(folder) / "results.json").read_text())
        row = figures(results)
        print(f"| {Path(folder).name} | {results['num_query']} | "
              + " | ".join(_cell(v, None, i) for i, v in enumerate(row)) + " |")
        groups[Path(folder).name.rsplit("-s", 1)[0]].append(row)
    print("\n| group | studies | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 2))
    for group, rows in groups.items():
        values = np.asarray(rows)
        spread = values.std(0, ddof=1) if len(values) > 1 else np.full(values.shape[1], np.nan)
        print(f"| {group} | {len(values)} | " + " | ".join(
            _cell(m, s, i) for i, (m, s) in enumerate(zip(values.mean(0), spread, strict=True))) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
