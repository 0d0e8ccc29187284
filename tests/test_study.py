"""The study (jobs/study.py): its measurements against plain references on random data, and the whole job
end to end on a local Ray cluster, checked against the evaluation job on the same model."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stal_ray.core.skeleton import PART_NAMES
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.evaluate.distance import TrackletFeatures
from stal_ray.evaluate.evaluate import evaluate
from stal_ray.evaluate.features import FeatureSet
from stal_ray.study import analysis
from stal_ray.study.units import UnitScores, hidden_parts, unit_scores

JOB = Path(__file__).resolve().parents[1] / "jobs" / "study.py"
R = len(PART_NAMES)


def random_feature_set(seed: int = 0, people: int = 5, per_person: int = 3, dim: int = 4) -> FeatureSet:
    generator = torch.Generator().manual_seed(seed)
    n = people * per_person
    identity = np.repeat(np.arange(1, people + 1), per_person)
    camera = np.tile(np.arange(1, per_person + 1), people)
    features = TrackletFeatures(
        g=torch.randn(n, 8, generator=generator), f_attended=torch.randn(n, R, dim, generator=generator),
        f_temporal=torch.randn(n, R, dim, generator=generator),
        f_mean=torch.randn(n, R, dim, generator=generator),
        part_scores=torch.rand(n, R, generator=generator) + 0.1)
    return FeatureSet(features=features, tracklet=np.arange(n), identity=identity, camera=camera,
                      is_query=camera == 1, num_frames=np.full(n, 8), corrupt_frames=np.zeros(n, np.int64))


def plain_rank1_and_ap(distance: np.ndarray, fs: FeatureSet, query, gallery) -> tuple[float, float]:
    """Rank-1 and mAP by a loop, MARS protocol: same identity and camera entries left out of each query's
    gallery (no junk here)."""
    hits, aps = [], []
    for qi, q in enumerate(query):
        keep = [g for g in range(len(gallery)) if not (fs.identity[gallery[g]] == fs.identity[q]
                                                       and fs.camera[gallery[g]] == fs.camera[q])]
        order = sorted(keep, key=lambda g: distance[qi, g])
        match = [fs.identity[gallery[g]] == fs.identity[q] for g in order]
        hits.append(match[0])
        found = np.flatnonzero(match)
        aps.append(np.mean([(k + 1) / (position + 1) for k, position in enumerate(found)]))
    return float(np.mean(hits)), float(np.mean(aps))


@pytest.mark.parametrize("part", range(R))
def test_each_part_is_ranked_by_its_own_feature_distance(part):
    fs = random_feature_set()
    ranker = analysis.Ranker(fs)
    result = analysis.per_part(ranker)[PART_NAMES[part]]
    f = fs.features.f_attended[:, part].numpy()
    distance = np.linalg.norm(f[ranker.query][:, None] - f[ranker.gallery][None], axis=-1)
    rank1, m_ap = plain_rank1_and_ap(distance, fs, ranker.query, ranker.gallery)
    # the official protocol's mAP is the trapezoid rule; the loop computes the step rule kept beside it
    assert result.cmc[1] == pytest.approx(rank1) and result.mAP_step == pytest.approx(m_ap)
    assert result.ap == "trapezoid" and result.mAP < result.mAP_step


def test_sequence_length_grid_pairs_query_and_gallery_extractions():
    short, full = random_feature_set(seed=1), random_feature_set(seed=2)
    labels, grid = analysis.sequence_lengths({"1": short, "all": full}, alpha=0.3)
    assert labels == ["1", "all"]
    for i, query_set in enumerate((short, full)):
        for j, gallery_set in enumerate((short, full)):
            ranker = analysis.Ranker(query_set)
            mixed = FeatureSet(**{**vars(query_set), "features": TrackletFeatures(**{
                name: torch.where(torch.from_numpy(query_set.is_query).view(-1, *[1] * (value.dim() - 1)),
                                  value, getattr(gallery_set.features, name))
                for name, value in vars(query_set.features).items()})})
            assert grid[i, j] == pytest.approx(analysis.Ranker(mixed).mode("stal", 0.3).cmc[1])
            assert ranker.query.tolist() == analysis.Ranker(mixed).query.tolist()


def test_a_part_is_hidden_when_none_of_its_joints_is_visible():
    keypoints = np.ones((2, 14, 3))
    keypoints[0, [11, 12, 13], 2] = 0  # left hip, knee, ankle: the left leg (P5)
    keypoints[1, [11, 12], 2] = 0  # the ankle still visible
    hidden = hidden_parts(keypoints)
    assert hidden[0].tolist() == [name == "left_leg" for name in PART_NAMES]
    assert not hidden[1].any()


def test_unit_scores_are_relative_to_their_tracklet_and_skip_padding():
    scores = np.ones((3, 2, R))
    scores[0, 0, 0] = 3.0  # tracklet 7: one high unit among 2 frames
    scores[2, 1] = 100.0  # tracklet 9's padded frame: must not count
    hidden = np.zeros((3, 2, R), bool)
    hidden[1, 0, 2] = True
    units = unit_scores([{"tracklet": np.array([7, 8, 9]), "chunk": np.array([0, 0, 0]),
                           "frames": np.array([2, 2, 1]), "scores": scores, "hidden": hidden,
                           "has_keypoints": np.array([True] * 3)}])
    assert len(units.score) == 2 * R + 2 * R + R
    for tracklet in (7, 8, 9):
        assert units.score[units.tracklet == tracklet].mean() == pytest.approx(1.0)
    assert units.score[(units.tracklet == 7) & (units.frame == 0) & (units.part == 0)][0] == pytest.approx(
        3 / (14 / 12))
    assert units.hidden.sum() == 1 and units.has_keypoints


def test_occlusion_summary_compares_hidden_units_with_visible_units_of_their_part():
    # part 0: hidden 0.5 vs visible 1.0 (tracklet 1) and hidden 0.9 vs 1.2 (tracklet 2); part 1 never hidden,
    # and high: it lifts the visible mean over all units, which the within-part figures leave out
    units = UnitScores(tracklet=np.array([1, 1, 1, 2, 2, 2]), frame=np.array([0, 1, 0, 0, 1, 0]),
                       part=np.array([0, 0, 1, 0, 0, 1]), score=np.array([0.5, 1.0, 1.5, 0.9, 1.2, 0.9]),
                       raw=np.linspace(0.1, 0.6, 6),
                       hidden=np.array([True, False, False, True, False, False]),
                       has_keypoints=True)
    summary = analysis.occlusion_summary(units)
    assert summary.hidden_mean == pytest.approx(0.7)
    assert summary.visible_mean == pytest.approx((1.0 + 1.5 + 1.2 + 0.9) / 4)
    assert summary.by_part[PART_NAMES[0]] == pytest.approx(((1.0 + 1.2) / 2, 0.7, 2))
    assert summary.within_part_ratio == pytest.approx(0.7 / 1.1)
    assert (summary.pairs_compared, summary.pairs_lower) == (2, 2)
    assert summary.raw_percentiles == pytest.approx((0.125, 0.575))
    # frames (mean score over parts): half hidden 1.0 and 0.9, clean 1.0 and 1.2
    assert summary.frame_ratio == pytest.approx(0.95 / 1.1)
    assert analysis.most_occluded(units, 1) == [1]  # a tie on share: the lower tracklet id first


def test_paired_counts_say_how_many_queries_a_difference_rests_on():
    fs = random_feature_set()
    results = analysis.attention_ablation(analysis.Ranker(fs), alpha=0.3)
    paired = analysis.paired_with(results, "baseline")
    assert paired["baseline"] == (0, 0)
    for mode, (better, worse) in paired.items():
        difference = results[mode].average_precision - results["baseline"].average_precision
        assert (better, worse) == ((difference > 1e-9).sum(), (difference < -1e-9).sum())


@pytest.fixture(scope="module")
def occluded_shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("study_data")
    release = write_synthetic_release(str(root / "release"), identities=5, test_identities=4, cameras=2,
                                      tracklets_per_identity=(2, 3), frames_per_tracklet=(4, 7), height=32,
                                      width=16, occlusion=0.6, junk_tracklets=1, distractor_tracklets=1)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False)
    return out


@pytest.mark.e2e  # the whole study: make test-e2e
def test_the_study_job_writes_every_table_and_figure(ray_cluster, occluded_shards, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("study_job", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    out = tmp_path / "study"
    settings = ["model.feature_dim=32", "data.seq_len=2", "data.height=32", "data.width=16",
                "data.identities_per_batch=2", "data.decode_concurrency=1", "train.iterations=4",
                "train.checkpoint_every=4", "train.log_every=2"]
    # the STAN variants (stan_no_bn, stan_clip_fc) left out: the same code path as stal, two trainings less
    argv = ["--data", occluded_shards, "--out", str(out), "--sequence-lengths", "1", "4", "all",
            "--variants", "global_alone", "local_alone", "no_ran"]
    argv += [a for s in settings for a in ("--set", s)]
    assert job.main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(str(out / "report.md"))

    report = (out / "report.md").read_text()
    for heading in ("Attention ablation", "Branch ablation", "Body parts", "Fusion rate", "Attention maps",
                    "STAN: BatchNorm, and one FC"):
        assert heading in report
    for picture in ("attention_ablation", "branch_ablation", "parts_cmc", "parts_attention", "fusion_rate",
                    "sequence_length", "attention_maps"):
        assert f"({picture}.png)" in report
        with Image.open(out / f"{picture}.png") as image:
            assert image.size[0] > 100
    assert "python jobs/study.py --data" in report

    results = json.loads((out / "results.json").read_text())
    assert set(results["attention_ablation"]) == {"baseline", "tan", "san", "stal"}
    assert set(results["attention_ablation_local"]) == {"baseline", "tan", "san", "stal"}
    assert len(results["branch_ablation"]) == 6 and len(results["fusion_rate_sweep"]) == 11
    assert results["sequence_length"]["labels"] == ["1", "4", "all"]
    assert np.asarray(results["sequence_length"]["rank1"]).shape == (3, 3)
    assert results["has_keypoints"] and results["occlusion"]["stal"]["hidden_units"] > 0
    assert set(results["stan_batchnorm"]) == {"stal"} and set(results["train_seconds"]) == {
        "stal", "global_alone", "local_alone", "no_ran"}
    # the same model through the evaluation job ranks the same
    metrics = evaluate(str(out / "runs" / "stal" / "model.pt"), occluded_shards, str(tmp_path / "eval"))
    for mode in ("stal", "baseline", "tan", "san", "global", "local"):
        expected = metrics["modes"][mode]["mAP"]
        study = (results["attention_ablation"].get(mode)
                 or results["branch_ablation"][f"{mode} branch of STAL"])
        assert study["mAP"] == pytest.approx(expected, abs=1e-6)
