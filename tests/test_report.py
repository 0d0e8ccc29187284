"""The evaluation report (stal_ray.evaluate.report): metrics.json's exact schema, the plots, the table."""

import json

import numpy as np
import pytest
from PIL import Image

from stal_ray.evaluate.ranking import RankingResult
from stal_ray.evaluate.report import (
    Metrics,
    format_table,
    plot_attention,
    plot_cmc,
    shown_frames,
    write_metrics,
)


def result(m_ap: float, curve: list[float], ap: str = "trapezoid") -> RankingResult:
    curve = np.asarray(curve + [curve[-1]] * (30 - len(curve)))
    return RankingResult(mAP=m_ap, cmc={r: float(curve[r - 1]) for r in (1, 5, 10, 20)}, cmc_curve=curve,
                         num_query=10, skipped_queries=1, average_precision=np.full(9, m_ap), ap=ap,
                         mAP_step=m_ap + 0.125, mINP=m_ap / 2)


@pytest.fixture
def results() -> dict[str, RankingResult]:
    return {"stal": result(0.5, [0.6, 0.7, 0.7, 0.8, 0.9]), "global": result(0.25, [0.3, 0.5, 0.6])}


def test_metrics_json_has_exactly_the_agreed_schema(tmp_path, results):
    model = {"path": "run/model.pt", "iteration": 40, "selected_by": "best val_mAP", "score": 0.7}
    path = write_metrics(str(tmp_path / "out"), Metrics(results, fusion_rate=0.3, protocol="official",
                                                        num_query=10, num_gallery=40, num_test_ids=7,
                                                        skipped=1, model=model))
    assert path == str(tmp_path / "out" / "metrics.json")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    definitions = metrics.pop("definitions")
    assert metrics.pop("model") == model
    assert metrics.pop("dataset") == {}  # evaluate() fills it: data.protocol.cross_dataset
    assert metrics == {
        "modes": {"stal": {"mAP": 0.5, "mAP_step": 0.625, "mINP": 0.25,
                           "cmc": {"1": 0.6, "5": 0.9, "10": 0.9, "20": 0.9},
                           "percent": {"Rank-1": 60.0, "Rank-5": 90.0, "Rank-10": 90.0, "Rank-20": 90.0,
                                       "mAP": 50.0, "mAP_step": 62.5, "mINP": 25.0}},
                  "global": {"mAP": 0.25, "mAP_step": 0.375, "mINP": 0.125,
                             "cmc": {"1": 0.3, "5": 0.6, "10": 0.6, "20": 0.6},
                             "percent": {"Rank-1": 30.0, "Rank-5": 60.0, "Rank-10": 60.0, "Rank-20": 60.0,
                                         "mAP": 25.0, "mAP_step": 37.5, "mINP": 12.5}}},
        "ap_rule": "trapezoid",
        "fusion_rate": 0.3, "protocol": "official", "num_query": 10, "num_gallery": 40, "num_test_ids": 7,
        "skipped_queries": 1,
    }
    assert list(metrics["modes"]["stal"]["cmc"]) == ["1", "5", "10", "20"]  # in rank order
    assert list(metrics["modes"]["stal"]["percent"])[:4] == ["Rank-1", "Rank-5", "Rank-10", "Rank-20"]
    # every number says which formula it is
    assert set(definitions) == {"mAP", "mAP_step", "mINP", "cmc", "percent", "ties"}
    assert "trapezoid" in definitions["mAP"] and "official MARS" in definitions["mAP"]
    assert "step rule" in definitions["mAP_step"] and "fast-reid" in definitions["mINP"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.json"]  # no temporary file left


def test_metrics_json_names_the_rerank_settings_only_when_reranked(tmp_path, results):
    common = dict(fusion_rate=0.3, protocol="official", num_query=10, num_gallery=40, num_test_ids=7,
                  skipped=1)
    write_metrics(str(tmp_path / "on"), Metrics(results, **common, rerank={"k1": 20, "k2": 6, "lambda": 0.3}))
    write_metrics(str(tmp_path / "off"), Metrics(results, **common))
    assert json.loads((tmp_path / "on" / "metrics.json").read_text())["rerank"] == {"k1": 20, "k2": 6,
                                                                                     "lambda": 0.3}
    assert "rerank" not in json.loads((tmp_path / "off" / "metrics.json").read_text())


def test_metrics_json_of_the_torchreid_protocol_names_the_step_rule(tmp_path):
    step = {"stal": result(0.5, [0.6, 0.9], ap="step")}
    write_metrics(str(tmp_path), Metrics(step, fusion_rate=0.3, protocol="torchreid", num_query=10,
                                         num_gallery=40, num_test_ids=7, skipped=1))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    definitions = metrics["definitions"]
    assert metrics["ap_rule"] == "step" and definitions["mAP"] == definitions["mAP_step"]


def test_results_under_two_ap_rules_are_refused(tmp_path):
    mixed = {"stal": result(0.5, [0.6]), "global": result(0.5, [0.6], ap="step")}
    with pytest.raises(ValueError, match="mix AP rules"):
        format_table(mixed)


def test_table_lists_every_mode_in_percent_under_torchreid_names(results):
    table = format_table(results).splitlines()
    assert table[0].split() == ["mode", "Rank-1", "Rank-5", "Rank-10", "Rank-20", "mAP", "mAP_step", "mINP"]
    assert table[2].split() == ["stal", "60.0%", "90.0%", "90.0%", "90.0%", "50.0%", "62.5%", "25.0%"]
    assert table[3].split()[:3] == ["global", "30.0%", "60.0%"]
    assert table[4].startswith("mAP: trapezoid rule of the official MARS code; mAP_step: step rule")
    step = format_table({"stal": result(0.5, [0.6, 0.9], ap="step")}).splitlines()
    assert step[0].split()[-2:] == ["mAP", "mINP"] and step[-1].startswith("mAP: step rule")


def test_cmc_plot_is_a_png(tmp_path, results):
    path = plot_cmc(str(tmp_path / "cmc.png"), results)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200


def test_attention_plot_with_and_without_frames(tmp_path):
    rng = np.random.default_rng(0)
    scores = {3: rng.random((11, 6)), 9: rng.random((4, 6))}
    frames = {3: rng.integers(0, 255, (len(shown_frames(11)), 32, 16, 3), dtype=np.uint8)}
    for name, kwargs in (("both", {"frames": frames, "captions": {3: "identity 1, camera 2"}}),
                         ("plain", {}), ("empty", None)):
        sampled = {} if kwargs is None else scores
        path = plot_attention(str(tmp_path / f"{name}.png"), sampled, **(kwargs or {}))
        with Image.open(path) as image:
            assert image.format == "PNG"


def test_shown_frames_are_evenly_spaced_and_distinct():
    assert shown_frames(3).tolist() == [0, 1, 2]
    assert shown_frames(15, 8).tolist() == [0, 2, 4, 6, 8, 10, 12, 14]
    assert shown_frames(1).tolist() == [0]
