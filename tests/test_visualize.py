"""Ranked galleries (stal_ray/evaluate/visualize.py): on a hand-made ranking, the borders say match or not and
the query's identity in its own camera is skipped; the worst queries are those of the lowest AP; and end to
end, an evaluation with eval.visualize draws one image per shown query and mode, the cells being the ranked
list the metrics use."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stal_ray.config import load_config
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.evaluate import visualize
from stal_ray.evaluate.evaluate import evaluate
from stal_ray.evaluate.ranking import evaluate_ranking
from stal_ray.model.export import save_model
from stal_ray.model.stal import STAL

JOB = Path(__file__).resolve().parents[1] / "jobs" / "evaluate_mars.py"

# ------------------------------------------------------------------------------------- a hand-made ranking

# two queries, both of identity 1 in camera 1, and a gallery whose nearest entry is that identity and camera
Q_PIDS, Q_CAMS = np.array([1, 1]), np.array([1, 1])
G_PIDS = np.array([1, 2, 1, 3, 0, 1])
G_CAMS = np.array([1, 2, 2, 1, 3, 3])
G_TRACKLETS = np.array([10, 11, 12, 13, 14, 15])
DIST = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
                 [0.0, 0.5, 0.4, 0.3, 0.2, 0.1]])


def hand_made(k: int = 4) -> list[visualize.RankedQuery]:
    ids = dict(q_pids=Q_PIDS, g_pids=G_PIDS, q_cams=Q_CAMS, g_cams=G_CAMS)
    result = evaluate_ranking(DIST, *ids.values(), ap="step")
    chosen = visualize.chosen_queries(result.evaluated, result.average_precision, sample=2, worst=1)
    tracklets = {"q": np.array([1, 2]), "g": G_TRACKLETS}
    return visualize.ranked_queries(chosen, DIST[list(chosen)], ids, tracklets, result.evaluated,
                                    result.average_precision, k)


def frames_of(tracklets, height=32, width=16) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {int(t): rng.integers(0, 256, (4, height, width, 3), dtype=np.uint8) for t in tracklets}


def test_the_top_k_skips_the_query_identity_in_its_camera_and_borders_say_match():
    by_query = {ranked.query: ranked for ranked in hand_made()}
    first, second = by_query[0], by_query[1]
    # tracklet 10 (identity 1, camera 1) is nearest to both but never ranked: the protocol drops it
    assert first.tracklets.tolist() == [11, 12, 13, 14]
    assert second.tracklets.tolist() == [15, 14, 13, 12]
    assert first.matches.tolist() == [False, True, False, False]
    assert second.matches.tolist() == [True, False, False, True]
    assert first.distances.tolist() == [0.1, 0.2, 0.3, 0.4]
    assert first.identities.tolist() == [2, 1, 3, 0] and first.cameras.tolist() == [2, 2, 1, 3]

    for ranked in (first, second):
        image = np.asarray(visualize.draw_ranked(ranked, frames_of([1, 2, *G_TRACKLETS]), "stal"))
        where = visualize.layout(len(ranked.gallery), (visualize.FRAME_HEIGHT // 2, visualize.FRAME_HEIGHT))
        assert image.shape[0] == where.size[1]
        assert len(where.gallery) == 4
        for (x0, y0, x1, y1), match in zip(where.gallery, ranked.matches, strict=True):
            colour = visualize.MATCH if match else visualize.MISMATCH
            inside = visualize.BORDER // 2
            # the four sides of the cell's border
            for x, y in ((x0 + inside, (y0 + y1) // 2), (x1 - 1 - inside, (y0 + y1) // 2),
                         ((x0 + x1) // 2, y0 + inside), ((x0 + x1) // 2, y1 - 1 - inside)):
                assert tuple(image[y, x]) == colour, (ranked.query, x, y)
        x0, y0, x1, y1 = where.query
        assert tuple(image[(y0 + y1) // 2, x0 + 1]) == visualize.QUERY


def test_a_missing_frame_is_drawn_grey_and_k_beyond_the_gallery_shows_what_there_is():
    ranked = hand_made(k=50)[0]
    assert len(ranked.gallery) == 5  # six entries, one of the query's identity in its camera
    image = np.asarray(visualize.draw_ranked(ranked, {}, "global"))
    where = visualize.layout(5, (visualize.FRAME_HEIGHT // 2, visualize.FRAME_HEIGHT))
    x0, y0, x1, y1 = where.gallery[0]
    assert tuple(image[(y0 + y1) // 2, (x0 + x1) // 2]) == visualize.MISSING


def test_the_worst_queries_are_those_of_the_lowest_ap_and_the_sample_is_seeded():
    evaluated = np.array([True, False, True, True, True, True, False, True])
    average_precision = np.array([0.9, 0.1, 0.5, 0.1, 0.7, 0.3])  # of rows 0, 2, 3, 4, 5, 7
    chosen = visualize.chosen_queries(evaluated, average_precision, sample=0, worst=3)
    assert list(chosen) == [2, 4, 7] and all(why == ("worst",) for why in chosen.values())
    sampled = visualize.chosen_queries(evaluated, average_precision, sample=3, worst=0, seed=5)
    assert sampled == visualize.chosen_queries(evaluated, average_precision, sample=3, worst=0, seed=5)
    assert len(sampled) == 3 and set(sampled) <= {0, 2, 3, 4, 5, 7}  # queries without a match are not drawn
    both = visualize.chosen_queries(evaluated, average_precision, sample=6, worst=2)
    assert both[2] == both[4] == ("worst", "sample") and len(both) == 6


# ------------------------------------------------------------------------------ an evaluation end to end

K = 3
MODES_DRAWN = ("stal", "global")


@pytest.fixture(scope="module")
def drawn(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize_data")
    release = write_synthetic_release(str(root / "release"), identities=4, test_identities=4, cameras=3,
                                      tracklets_per_identity=(2, 3), frames_per_tracklet=(3, 9), height=32,
                                      width=16, junk_tracklets=1, distractor_tracklets=2)
    shards = str(root / "shards")
    write_shards(read_mars(release), shards, target_file_bytes=20_000, progress=False)
    # eval.visualize in the model's config, as a training run with --set eval.visualize=3 records it
    config = load_config(None, ["model.backbone=tiny", "model.feature_dim=8", "model.pose_source=keypoints",
                                "data.seq_len=4", "data.height=32", "data.width=16",
                                "data.decode_concurrency=1", f"eval.visualize={K}"])
    config.data.root = shards
    torch.manual_seed(0)
    model_path = str(root / "model.pt")
    save_model(model_path, STAL.from_config(config, num_classes=4), config, num_classes=4)
    out = root / "out"
    metrics = evaluate(model_path, shards, str(out), modes=MODES_DRAWN, save_distances=True)
    return out, metrics, model_path, shards


def test_an_evaluation_draws_one_image_per_shown_query_and_mode(drawn):
    out, metrics, _, _ = drawn
    index = json.loads((out / "ranked" / "index.json").read_text())
    assert index["top_k"] == K and list(index["modes"]) == list(MODES_DRAWN)
    assert (out / "ranked" / "index.html").exists()
    for mode in MODES_DRAWN:
        entries = index["modes"][mode]
        files = sorted(p.name for p in (out / "ranked" / mode).iterdir())
        assert files == sorted(Path(entry["file"]).name for entry in entries)
        # every evaluated query is shown here (fewer than the 10 sampled), none twice
        assert len(entries) == len({entry["query"] for entry in entries}) == metrics["num_query"] - \
            metrics["skipped_queries"]
        for entry in entries:
            assert Path(entry["file"]).name.startswith(f"q{entry['query']:04d}_")
            assert len(entry["gallery"]) == K
            assert [g["match"] for g in entry["gallery"]] == [g["identity"] == entry["identity"]
                                                              for g in entry["gallery"]]
            assert not any(g["identity"] == entry["identity"] and g["camera"] == entry["camera"]
                           for g in entry["gallery"])
            with Image.open(out / "ranked" / entry["file"]) as image:
                assert image.format == "PNG"
                pixels = np.asarray(image.convert("RGB"))
            # the cells: runs of border colour along a line through their top borders
            y = visualize.MARGIN + visualize.LINE + visualize.PAD + 1
            row = [tuple(p) for p in pixels[y]]
            coloured = [p in (visualize.MATCH, visualize.MISMATCH) for p in row]
            runs = sum(1 for i, c in enumerate(coloured) if c and (i == 0 or not coloured[i - 1]))
            assert runs == K
            greens = sum(1 for i, p in enumerate(row) if p == visualize.MATCH and row[i - 1] != p)
            assert greens == sum(g["match"] for g in entry["gallery"])


def test_the_cells_are_the_ranked_list_the_metrics_use_and_the_worst_have_the_lowest_ap(drawn):
    out, _, _, _ = drawn
    index = json.loads((out / "ranked" / "index.json").read_text())
    saved = np.load(out / "distances.npz")  # the first mode's (stal) distance and what it ranks
    assert str(saved["mode"]) == "stal"
    result = evaluate_ranking(saved["dist"], saved["q_pids"], saved["g_pids"], saved["q_cams"],
                              saved["g_cams"], ap="trapezoid")
    ap_of = dict(zip(np.flatnonzero(result.evaluated).tolist(), result.average_precision.tolist(),
                     strict=True))
    entries = index["modes"]["stal"]
    for entry in entries:
        q = entry["query"]
        assert saved["q_tracklets"][q] == entry["tracklet"]
        columns = visualize.top_k(saved["dist"][q], int(saved["q_pids"][q]), int(saved["q_cams"][q]),
                                  saved["g_pids"], saved["g_cams"], K)
        assert [g["tracklet"] for g in entry["gallery"]] == saved["g_tracklets"][columns].tolist()
        assert [g["distance"] for g in entry["gallery"]] == pytest.approx(saved["dist"][q, columns].tolist())
        assert entry["average_precision"] == pytest.approx(ap_of[q])
    worst = [entry["query"] for entry in entries if "worst" in entry["reasons"]]
    lowest = sorted(ap_of, key=lambda q: (ap_of[q], q))[:visualize.WORST_QUERIES]
    assert worst == lowest


def test_the_job_passes_visualize_on():
    spec = importlib.util.spec_from_file_location("evaluate_mars", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.parse_args(["--model", "m.pt", "--out", "o", "--visualize", "5"]).visualize == 5
    assert job.parse_args(["--model", "m.pt", "--out", "o"]).visualize is None


def test_a_negative_k_is_refused_with_the_flag_and_the_fix(drawn, tmp_path):
    _, _, model_path, shards = drawn
    with pytest.raises(ValueError, match=r"--visualize \(eval.visualize\) -1 is invalid: .* or 0 for none"):
        evaluate(model_path, shards, str(tmp_path), visualize_top=-1)
