"""Tests of data.prepared.handle: the prepared data set read once, carried as it was read."""

import json
import pickle

import pytest

from stal_ray.data.prepared.handle import PreparedData, as_prepared
from stal_ray.data.prepared.manifest import IncompleteDatasetError
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.source import resolve_data
from stal_ray.data.synthetic.generator import write_synthetic_release


def _release(root, identities: int) -> str:
    return write_synthetic_release(str(root), identities=identities, test_identities=2, cameras=2,
                                   tracklets_per_identity=(1, 2), frames_per_tracklet=(2, 3), height=16,
                                   width=8, junk_tracklets=0, distractor_tracklets=0)


@pytest.fixture
def uri(tmp_path) -> str:
    out = str(tmp_path / "shards")
    write_shards(read_mars(_release(tmp_path / "release", 4)), out, target_file_bytes=5_000, progress=False)
    return out


def test_the_handle_is_the_checked_manifest_with_where_it_lives(uri):
    data = resolve_data(uri)
    assert data.uri == uri and data.endpoint_url is None
    assert data.paths("train") == data.manifest.paths("train") and data.paths("train")
    fs, _ = data.filesystem()
    assert all(fs.exists(path) for path in data.paths("test"))
    assert as_prepared(data) is data and as_prepared(uri).paths("train") == data.paths("train")


def test_it_pickles_and_round_trips_through_plain_data_without_reading_again(uri, tmp_path):
    data = PreparedData.read(uri)
    plain = data.to_dict()
    json.dumps(plain)  # built-in types only, as Ray Train's train_loop_config
    for copy in (PreparedData.from_dict(plain), pickle.loads(pickle.dumps(data))):
        assert (copy.uri, copy.endpoint_url, copy.version) == (data.uri, data.endpoint_url, data.version)
        assert copy.manifest == data.manifest
        assert copy.paths("train") == data.paths("train")


def test_a_run_keeps_the_version_it_started_with(uri, tmp_path):
    data = PreparedData.read(uri)
    # a prepare publishes another version at the same URI while the run goes on
    write_shards(read_mars(_release(tmp_path / "other", 5)), uri, target_file_bytes=5_000, overwrite=True,
                 progress=False)
    newer = data.reread()
    assert newer.version != data.version
    identities = [d.manifest.counts["train"]["identities"] for d in (data, newer)]
    assert identities == [4, 5]
    assert all(data.version in path for path in data.paths("train"))  # still the one it started with


def test_no_data_set_is_refused_as_before(tmp_path):
    with pytest.raises(IncompleteDatasetError, match="not a complete prepared data set"):
        PreparedData.read(str(tmp_path))
