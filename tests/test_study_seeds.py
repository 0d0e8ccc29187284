"""A study over training seeds: each seed's row, mean ± spread, paired differences; jobs/study.py --seeds."""

import json

import numpy as np
import pytest

from stal_ray.study import run as study_run
from stal_ray.study.seeds import MODES, seeds_table


def results(maps: dict[str, float], within=0.5, frame=0.3, queries=50) -> dict:
    """A results.json with the fields the seeds table reads."""
    return {"attention_ablation": {mode: {"mAP": maps[mode]} for mode in MODES},
            "occlusion": {"stal": {"within_part_ratio": within, "frame_ratio": frame}}, "num_query": queries}


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 2 and cells[0] not in ("study", "group") and not cells[0].startswith("---"):
            rows[cells[0]] = cells[2:]
    return rows


def test_the_table_gives_each_seed_then_mean_and_spread_of_the_paired_differences():
    rng = np.random.default_rng(0)
    maps = [dict(zip(MODES, rng.uniform(0.3, 0.9, 4), strict=True)) for _ in range(3)]
    text = seeds_table({f"seed-{s}": results(m) for s, m in enumerate(maps)})
    rows = table_rows(text)
    assert set(rows) == {"seed-0", "seed-1", "seed-2", "seed"}
    stal_gain = np.array([100 * (m["stal"] - m["baseline"]) for m in maps])
    for s in range(3):
        assert rows[f"seed-{s}"][5] == f"{stal_gain[s]:.1f}"
    # the group's cell: mean ± sample standard deviation (ddof=1) of the per-seed differences, not the
    # difference of the means' spreads
    assert rows["seed"][5] == f"{stal_gain.mean():.1f} ± {stal_gain.std(ddof=1):.1f}"
    stal = np.array([100 * m["stal"] for m in maps])
    assert rows["seed"][3] == f"{stal.mean():.1f} ± {stal.std(ddof=1):.1f}"


def test_a_single_study_has_no_spread_and_missing_ratios_show_as_a_dash():
    maps = dict(zip(MODES, (0.5, 0.6, 0.55, 0.7), strict=True))
    rows = table_rows(seeds_table({"occ0-s0": results(maps, within=float("nan"))}))
    assert rows["occ0"][3] == "70.0" and rows["occ0"][6] == "–"


def test_run_seeds_runs_one_study_per_seed_and_writes_the_table(tmp_path, monkeypatch):
    """Each seed's study gets train.seed = S and its own folder; seeds.md gathers their results.json."""
    seen = []

    def fake_study(config, data, out, **options):
        seen.append((config.train.seed, out, options["command"]))
        gain = 0.1 + 0.01 * config.train.seed
        maps = {"baseline": 0.5, "tan": 0.55, "san": 0.5, "stal": 0.5 + gain}
        folder = tmp_path / "out" / f"seed-{config.train.seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(results(maps)))
        return str(folder / "report.md")

    monkeypatch.setattr(study_run, "run_study", fake_study)
    monkeypatch.setattr(study_run, "as_prepared", lambda data: type("Data", (), {"endpoint_url": None})())
    from stal_ray.config import load_config

    target = study_run.run_seeds(load_config(None), "data", str(tmp_path / "out"), [0, 2], command="study")
    assert [(seed, out.rsplit("/", 1)[-1]) for seed, out, _ in seen] == [(0, "seed-0"), (2, "seed-2")]
    rows = table_rows((tmp_path / "out" / "seeds.md").read_text())
    assert target == str(tmp_path / "out" / "seeds.md")
    assert rows["seed-0"][5] == "10.0" and rows["seed-2"][5] == "12.0"
    assert rows["seed"][5] == f"11.0 ± {np.std([10.0, 12.0], ddof=1):.1f}"


@pytest.mark.parametrize("seeds", [["1", "1"], ["-1"]])
def test_the_job_refuses_repeated_or_negative_seeds(seeds, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("study_job",
                                                  Path(__file__).parents[1] / "jobs" / "study.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    with pytest.raises(SystemExit):
        job.parse_args(["--out", "x", "--seeds", *seeds])
    assert "--seeds must be distinct training seeds >= 0" in capsys.readouterr().err
