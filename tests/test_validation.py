"""Tests of data.validation: the held-out identities, queries by camera, written once and reused."""

import json
import math
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stal_ray.data.prepared.manifest import read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.prepared.validation import ValidationSplit, ensure_validation_split, split_uri
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.synthetic.generator import write_synthetic_release

IDENTITIES = 10


@pytest.fixture(scope="module")
def dataset_uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("validation")
    release = write_synthetic_release(str(root / "release"), identities=IDENTITIES, test_identities=2,
                                      cameras=3, tracklets_per_identity=(1, 4), frames_per_tracklet=(2, 4),
                                      height=16, width=8, junk_tracklets=0, distractor_tracklets=0)
    out = str(root / "shards")
    write_shards(read_mars(release), out, target_file_bytes=5_000, progress=False)
    return out


@pytest.fixture
def fresh_uri(dataset_uri, tmp_path) -> str:
    """A copy of the data set with no split written yet."""
    out = str(tmp_path / "shards")
    shutil.copytree(dataset_uri, out, ignore=shutil.ignore_patterns("validation"))
    return out


def tracklets_of(uri: str) -> dict[int, tuple[int, int]]:
    """tracklet -> (identity, camera), from the training rows."""
    table = pa.concat_tables(pq.read_table(path) for path in read_manifest(uri).paths("train"))
    found = {}
    for row in table.select(["identity", "tracklet", "camera"]).to_pylist():
        for tracklet, camera in zip(row["tracklet"], row["camera"], strict=True):
            found[tracklet] = (row["identity"], camera)
    return found


def test_split_is_written_once_then_read_back(fresh_uri):
    first = ensure_validation_split(fresh_uri, 0.2, seed=0)
    path = split_uri(fresh_uri, 0.2, 0)
    assert first.uri == path and os.path.isfile(path) and not first.reused
    written = os.stat(path).st_mtime_ns
    again = ensure_validation_split(fresh_uri, 0.2, seed=0)
    assert again.reused and again == first and os.stat(path).st_mtime_ns == written
    assert ValidationSplit.from_json(open(path).read()) == first
    # no temporary file is left beside it
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]


def test_split_is_deterministic(dataset_uri, fresh_uri):
    first = ensure_validation_split(fresh_uri, 0.2, seed=3)
    assert first == ensure_validation_split(dataset_uri, 0.2, seed=3)


def test_another_seed_or_fraction_gives_another_file(fresh_uri):
    base = ensure_validation_split(fresh_uri, 0.2, seed=0)
    seeds = [ensure_validation_split(fresh_uri, 0.2, seed=seed) for seed in range(1, 6)]
    larger = ensure_validation_split(fresh_uri, 0.4, seed=0)
    assert not any(s.reused for s in seeds) and not larger.reused
    assert len({s.uri for s in [base, *seeds, larger]}) == 7
    assert any(s.identities != base.identities for s in seeds)
    assert len(larger.identities) == 4


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.3, 0.5])
def test_held_out_count_is_ceil_of_fraction_at_least_two(fresh_uri, fraction):
    # 0.3 x 10 is 3.0000000000000004 in floating point: still 3 identities
    split = ensure_validation_split(fresh_uri, fraction)
    assert len(split.identities) == max(2, math.ceil(round(fraction * IDENTITIES, 9)))
    assert split.identities == sorted(set(split.identities))


def test_queries_are_one_per_camera_each_with_a_cross_camera_match(fresh_uri):
    split = ensure_validation_split(fresh_uri, 0.5, seed=1)
    tracklets = tracklets_of(fresh_uri)
    held_out = {t for t, (identity, _) in tracklets.items() if identity in split.identities}
    assert set(split.tracklets) == held_out
    assert set(split.query_tracklets) <= held_out and split.query_tracklets
    for identity in split.identities:
        cameras = {camera for i, camera in tracklets.values() if i == identity}
        queries = [t for t in split.query_tracklets if tracklets[t][0] == identity]
        assert sorted(tracklets[t][1] for t in queries) == (sorted(cameras) if len(cameras) >= 2 else [])
    for query in split.query_tracklets:
        identity, camera = tracklets[query]
        # what the official protocol keeps of the gallery: other cameras of the same person
        assert any(tracklets[t] [0] == identity and tracklets[t][1] != camera for t in split.tracklets)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_outside_zero_one_is_refused(fresh_uri, fraction):
    with pytest.raises(ValueError, match=r"data\.val_identities"):
        ensure_validation_split(fresh_uri, fraction)


def test_fraction_leaving_too_few_for_training_is_refused(fresh_uri):
    with pytest.raises(ValueError, match=r"data\.val_identities = 0\.9 holds out 9 of the 10"):
        ensure_validation_split(fresh_uri, 0.9)
    with pytest.raises(ValueError, match="fewer than the 9 training needs"):
        ensure_validation_split(fresh_uri, 0.2, min_training_identities=9)
    assert not os.path.exists(os.path.join(fresh_uri, "validation", "split-0.9-0.json"))


def test_split_of_another_data_set_is_replaced(fresh_uri):
    split = ensure_validation_split(fresh_uri, 0.2)
    stored = json.loads(open(split.uri).read())
    stored["dataset"], stored["identities"] = "another", [1, 2, 3]
    open(split.uri, "w").write(json.dumps(stored))
    again = ensure_validation_split(fresh_uri, 0.2)
    assert not again.reused and again == split
