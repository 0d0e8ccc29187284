"""A study over several training seeds: each seed's figures, their mean ± spread, and the paired differences.

One training seed says little on a small test set: on the occlusion study's data STAL's mAP moved by up to 20
points between seeds while its gain over the baseline ranking of the same model moved by a few (issue 36).
What a comparison can claim is the difference paired by seed (stal − baseline of the same trained model),
its mean and its standard deviation over seeds; `seeds_table` writes that from the results.json of each
seed's study (jobs/study.py --seeds writes one per seed, `<out>/seed-S/`), and bench/study_seeds.py from any
study folders.
"""

from collections import defaultdict

import numpy as np

MODES = ("baseline", "tan", "san", "stal")
COLUMNS = ("baseline", "tan", "san", "stal", "tan − baseline", "stal − baseline", "hidden/visible",
           "occluded/clean frame")
PERCENT_COLUMNS = 6  # the mAP columns and the paired differences, in points; the ratios after them


def figures(results: dict) -> list[float]:
    """One study's row: mAP (%) of each ranking of the stal model, the paired differences, the ratios."""
    maps = {m: 100 * results["attention_ablation"][m]["mAP"] for m in MODES}
    occlusion = results["occlusion"].get("stal", {})
    return [*maps.values(), maps["tan"] - maps["baseline"], maps["stal"] - maps["baseline"],
            occlusion.get("within_part_ratio", float("nan")), occlusion.get("frame_ratio", float("nan"))]


def _cell(value: float, spread: float | None, index: int) -> str:
    digits = 1 if index < PERCENT_COLUMNS else 3
    text = "–" if np.isnan(value) else f"{value:.{digits}f}"
    if spread is None or np.isnan(value) or np.isnan(spread):
        return text
    return f"{text} ± {spread:.{digits}f}"


def _header() -> str:
    return " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 2)


def _without_seed(name: str) -> str:
    head, _, tail = name.rpartition("-")
    return head if head and tail.removeprefix("s").isdigit() else name


def seeds_table(studies: dict[str, dict], group_of=None) -> str:
    """Markdown: one row per study (name -> its results.json), then mean ± sample standard deviation per
    group of studies.

    group_of(study name) -> group name; default: the name without its trailing "-sN" or "-N" (seed-0 ..
    seed-2 make one group, as do occ0-frame-s0 .. -s2)."""
    group_of = group_of or _without_seed
    groups = defaultdict(list)
    lines = ["| study | queries | " + _header()]
    for name, results in studies.items():
        row = figures(results)
        lines.append(f"| {name} | {results['num_query']} | "
                     + " | ".join(_cell(v, None, i) for i, v in enumerate(row)) + " |")
        groups[group_of(name)].append(row)
    lines += ["", "| group | studies | " + _header()]
    for group, rows in groups.items():
        values = np.asarray(rows)
        spread = values.std(0, ddof=1) if len(values) > 1 else np.full(values.shape[1], np.nan)
        lines.append(f"| {group} | {len(values)} | " + " | ".join(
            _cell(m, s, i) for i, (m, s) in enumerate(zip(values.mean(0), spread, strict=True))) + " |")
    return "\n".join(lines) + "\n"
