"""Feature extraction (stal_ray.evaluate.features): chunk sums equal Eq. 9 over the whole tracklet, whatever
the batching, on a real local Ray cluster; the Parquet round trip."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from stal_ray.config import load_config
from stal_ray.data.prepared.manifest import read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.stream.pipeline import evaluation_dataset
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.evaluate.chunks import TrackletSums, chunk_sums
from stal_ray.evaluate.feature_store import load_features, save_features
from stal_ray.evaluate.features import extract_features
from stal_ray.model.export import save_model
from stal_ray.model.stal import STAL
from stal_ray.objective import aggregate_temporal, spatial_scores

T, H, W, D = 4, 32, 16, 8


def tiny_stal(attention: str = "stal") -> STAL:
    torch.manual_seed(0)
    return STAL("tiny", seq_len=T, image_size=(H, W), feature_dim=D, pose_source="prior",
                attention=attention).eval()


def chunked(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A tracklet (n, 3, H, W) as evaluation_dataset cuts it: chunks of T, the last padded with its last
    frame; (chunks (C, T, 3, H, W), valid (C,))."""
    n = len(frames)
    starts = range(0, n, T)
    valid = torch.tensor([min(T, n - s) for s in starts])
    index = torch.stack([torch.clamp(torch.arange(s, s + T), max=s + v - 1)
                         for s, v in zip(starts, valid.tolist(), strict=True)])
    return frames[index], valid


def rows(out, valid: torch.Tensor, tracklet: int, identity: int = 1, camera: int = 1,
         is_query: bool = False) -> dict[str, np.ndarray]:
    """What ChunkFeatures emits for these chunks."""
    c = len(valid)
    sums = {name: value.numpy() for name, value in chunk_sums(out, valid).items()}
    return {"tracklet": np.full(c, tracklet), "identity": np.full(c, identity), "camera": np.full(c, camera),
            "is_query": np.full(c, is_query), "chunk": np.arange(c), "corrupt_frames": np.zeros(c, np.int64),
            "scores": out.scores.numpy(), **sums}


def take(batch: dict[str, np.ndarray], index) -> dict[str, np.ndarray]:
    return {name: value[index] for name, value in batch.items()}


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


@torch.no_grad()
def test_chunked_aggregation_equals_one_pass():
    model = tiny_stal()
    torch.manual_seed(1)
    frames = torch.randn(11, 3, H, W)
    chunks, valid = chunked(frames)
    assert valid.tolist() == [4, 4, 3]
    out = model(chunks)
    totals = TrackletSums()
    totals.add(rows(out, valid, tracklet=7))
    features = totals.result().features

    # the same frames' outputs, padding dropped, scores normalised over the whole tracklet's 11×R map
    keep = torch.cat([torch.arange(c * T, c * T + v) for c, v in enumerate(valid.tolist())])
    f = out.f.flatten(0, 1)[keep][None]  # (1, 11, R, D)
    s = out.scores.flatten(0, 1)[keep][None]  # (1, 11, R)
    a = s / s.sum()
    torch.testing.assert_close(features.f_attended, aggregate_temporal(f, a))
    torch.testing.assert_close(features.parts("stal")[1], spatial_scores(a))
    temporal = a.mean(2, keepdim=True).expand_as(a)
    torch.testing.assert_close(features.f_temporal, aggregate_temporal(f, temporal))
    torch.testing.assert_close(features.f_mean, f.mean(1))
    torch.testing.assert_close(features.g, out.g_frames.flatten(0, 1)[keep].mean(0, keepdim=True))
    # the padded copies of frame 11 would have weighed in: the sums really leave them out
    assert not torch.allclose(features.f_mean, out.f.mean(1).mean(0, keepdim=True))


@torch.no_grad()
def test_chunks_in_any_order_and_batching_give_the_same_features():
    model = tiny_stal()
    torch.manual_seed(2)
    parts = []
    for tracklet, length in ((3, 9), (1, 5), (2, 2)):
        chunks, valid = chunked(torch.randn(length, 3, H, W))
        parts.append(rows(model(chunks), valid, tracklet=tracklet, identity=10 + tracklet))
    everything = concat(parts)
    together = TrackletSums()
    together.add(everything)
    one_by_one = TrackletSums()
    for index in np.random.default_rng(0).permutation(len(everything["tracklet"])):
        one_by_one.add(take(everything, [index]))
    a, b = together.result(), one_by_one.result()
    assert a.tracklet.tolist() == [1, 2, 3] and a.identity.tolist() == [11, 12, 13]
    assert a.num_frames.tolist() == [5, 2, 9]
    for name in ("g", "f_attended", "f_temporal", "f_mean", "part_scores"):
        torch.testing.assert_close(getattr(b.features, name), getattr(a.features, name), msg=name)


@torch.no_grad()
def test_a_chunk_delivered_twice_is_added_once():
    """Ray runs a call again after a lost node: a chunk that arrives twice counts once."""
    model = tiny_stal()
    torch.manual_seed(5)
    parts = []
    for tracklet, length in ((4, 9), (6, 5)):
        chunks, valid = chunked(torch.randn(length, 3, H, W))
        parts.append(rows(model(chunks), valid, tracklet=tracklet))
    everything = concat(parts)
    once, twice = TrackletSums(), TrackletSums()
    once.add(everything)
    twice.add(take(everything, [0, 1, 3]))
    twice.add(take(everything, [1, 1, 2, 3, 4]))  # chunks 1 and 3 again, chunk 1 twice in one batch
    assert (twice.repeated, twice.frames, twice.tracklets) == (3, once.frames, 2) and once.frames == 14
    a, b = once.result(), twice.result()
    assert b.num_frames.tolist() == a.num_frames.tolist() == [9, 5]
    for name in ("g", "f_attended", "f_temporal", "f_mean", "part_scores"):
        torch.testing.assert_close(getattr(b.features, name), getattr(a.features, name), msg=name)


@torch.no_grad()
def test_baseline_attention_gives_the_plain_average():
    model = tiny_stal("baseline")
    torch.manual_seed(3)
    chunks, valid = chunked(torch.randn(6, 3, H, W))
    totals = TrackletSums()
    totals.add(rows(model(chunks), valid, tracklet=0))
    features = totals.result().features
    torch.testing.assert_close(features.f_attended, features.f_mean)
    torch.testing.assert_close(features.f_temporal, features.f_mean)
    torch.testing.assert_close(features.part_scores, torch.ones(1, 6))


@torch.no_grad()
def test_saved_features_load_back_equal(tmp_path):
    model = tiny_stal()
    torch.manual_seed(4)
    totals = TrackletSums()
    for tracklet, length in ((5, 7), (8, 3)):
        chunks, valid = chunked(torch.randn(length, 3, H, W))
        totals.add(rows(model(chunks), valid, tracklet=tracklet, is_query=tracklet == 5))
    saved = totals.result(keep_scores_for=1)
    assert list(saved.sample_scores) == [5] and saved.sample_scores[5].shape == (7, 6)
    assert saved.sample_scores[5].sum() == pytest.approx(1.0)
    saved.sample_frames = {5: np.random.default_rng(0).integers(0, 255, (3, H, W, 3), dtype=np.uint8)}
    saved.source = {"model": "m.pt", "seq_len": T}
    path = str(tmp_path / "features.parquet")
    save_features(saved, path)
    loaded = load_features(path)
    for name in ("tracklet", "identity", "camera", "is_query", "num_frames", "corrupt_frames"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(saved, name), err_msg=name)
    for name in ("g", "f_attended", "f_temporal", "f_mean", "part_scores"):
        torch.testing.assert_close(getattr(loaded.features, name), getattr(saved.features, name), msg=name)
    np.testing.assert_array_equal(loaded.sample_scores[5], saved.sample_scores[5])
    np.testing.assert_array_equal(loaded.sample_frames[5], saved.sample_frames[5])
    assert loaded.source == saved.source and list(loaded.sample_scores) == [5]


def test_a_parquet_file_that_is_not_features_is_refused(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), path)
    with pytest.raises(ValueError, match="other.parquet is not a stal_ray features file"):
        load_features(str(path))
    with pytest.raises(FileNotFoundError, match="features file not found"):
        load_features(str(tmp_path / "none.parquet"))


# ---------------------------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def shards_uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("features_data")
    release = write_synthetic_release(str(root / "release"), identities=4, test_identities=3, cameras=2,
                                      tracklets_per_identity=(2, 3), frames_per_tracklet=(3, 10), height=32,
                                      width=16, junk_tracklets=1, distractor_tracklets=1)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=20_000, progress=False)
    return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    config = load_config(None, ["model.backbone=tiny", f"model.feature_dim={D}",
                                "model.pose_source=keypoints", f"data.seq_len={T}", f"data.height={H}",
                                f"data.width={W}", "data.decode_concurrency=1"])
    torch.manual_seed(0)
    model = STAL.from_config(config, num_classes=4)
    path = str(tmp_path_factory.mktemp("features_model") / "model.pt")
    save_model(path, model, config, num_classes=4)
    return path, config


def test_extraction_on_ray_covers_every_tracklet_whatever_the_batch_size(ray_cluster, shards_uri, model_file):
    path, config = model_file
    table = pa.concat_tables(pq.read_table(p) for p in read_manifest(shards_uri).paths("test"))
    lengths = {t: len(f) for t, f in zip(table.column("tracklet").to_pylist(),
                                         table.column("frames").to_pylist(), strict=True)}
    # batch_size 1 puts every chunk of a tracklet in a batch of its own; 64 puts whole tracklets together
    small = extract_features(evaluation_dataset(shards_uri, config), path, batch_size=1, keep_scores_for=2)
    large = extract_features(evaluation_dataset(shards_uri, config), path, batch_size=64, use_gpu=False)
    assert small.tracklet.tolist() == sorted(lengths)
    assert small.num_frames.tolist() == [lengths[t] for t in sorted(lengths)]
    assert small.identity.tolist() == [table.column("identity")[table.column("tracklet").to_pylist().index(t)]
                                       .as_py() for t in sorted(lengths)]
    assert small.is_query.sum() == sum(table.column("is_query").to_pylist())
    assert len(small.sample_scores) == 2
    for tracklet, scores in small.sample_scores.items():
        assert scores.shape == (lengths[tracklet], 6) and scores.sum() == pytest.approx(1.0, rel=1e-5)
    for name in ("g", "f_attended", "f_temporal", "f_mean", "part_scores"):
        a, b = getattr(small.features, name), getattr(large.features, name)
        assert a.shape[0] == len(lengths) and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
