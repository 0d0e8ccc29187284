"""Tests of data.pipeline reading shards from S3 (moto's server) through Ray Data: all three streams."""

import pickle
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stal_ray.config import Config
from stal_ray.core.storage import StorageError, arrow_filesystem, read_filesystem
from stal_ray.data.prepared.handle import PreparedData
from stal_ray.data.prepared.manifest import read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.prepared.validation import ensure_validation_split
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.source import resolve_data
from stal_ray.data.stream.batches import training_batches
from stal_ray.data.stream.pipeline import (
    evaluation_dataset,
    training_dataset,
    validation_dataset,
)

P, K, T, H, W = 2, 2, 4, 16, 8


@pytest.fixture(scope="module")
def config() -> Config:
    config = Config()
    config.data.seq_len, config.data.height, config.data.width = T, H, W
    config.data.identities_per_batch, config.data.clips_per_identity = P, K
    config.data.decode_concurrency = 1
    return config


@pytest.fixture(scope="module")
def s3_uri(ray_cluster, moto_server, make_bucket, small_release_root) -> str:
    """The small release's shards in a bucket. ray_cluster comes first: its workers then start without
    moto's fake credentials in their environment, as the nodes of a user's cluster may lack the driver's."""
    out = make_bucket() + "/prepared/mars"
    release = read_mars(small_release_root)
    write_shards(release, out, keypoints=release.keypoints_path, target_file_bytes=24_000,
                 endpoint_url=moto_server, progress=False)
    return out


def table(uri: str, split: str, endpoint_url: str) -> pa.Table:
    fs, _ = arrow_filesystem(uri, endpoint_url=endpoint_url)
    return pa.concat_tables(pq.read_table(path, filesystem=fs)
                            for path in read_manifest(uri, endpoint_url=endpoint_url).paths(split))


def test_training_batches_from_s3(s3_uri, moto_server, config):
    assert len(read_manifest(s3_uri, endpoint_url=moto_server).files["train"]) >= 2
    data = PreparedData.read(s3_uri, endpoint_url=moto_server)
    batches = list(training_batches(training_dataset(data, config), P, seed=0, drop_last=False))
    assert len(batches) >= 2
    for index, batch in enumerate(batches):
        counts = Counter(batch["identities"].tolist())
        assert set(counts.values()) == {K} and (len(counts) == P or index == len(batches) - 1)
        assert batch["clips"].shape == (len(counts) * K, T, 3, H, W)
    expected = {t for row in table(s3_uri, "train", moto_server).column("tracklet").to_pylist() for t in row}
    assert {t for batch in batches for t in batch["tracklets"].tolist()} == expected


def test_evaluation_chunks_from_s3_cover_every_test_frame_once(s3_uri, moto_server, config):
    test = table(s3_uri, "test", moto_server)
    lengths = dict(zip(test.column("tracklet").to_pylist(),
                       (len(frames) for frames in test.column("frames").to_pylist()), strict=True))
    covered = Counter()
    for row in evaluation_dataset(PreparedData.read(s3_uri, endpoint_url=moto_server), config).iter_rows():
        assert row["clips"].shape == (T, H, W, 3)
        for frame in range(row["chunk"] * T, row["chunk"] * T + row["valid"]):
            covered[(row["tracklet"], frame)] += 1
    assert covered == Counter({(t, f): 1 for t, n in lengths.items() for f in range(n)})


def test_validation_split_and_chunks_from_s3(s3_uri, moto_server, config):
    split = ensure_validation_split(PreparedData.read(s3_uri, endpoint_url=moto_server), 0.2)
    assert not split.reused and split.uri == s3_uri + "/validation/split-0.2-0.json"
    assert ensure_validation_split(PreparedData.read(s3_uri, endpoint_url=moto_server), 0.2).reused
    lengths = Counter()
    for row in table(s3_uri, "train", moto_server).select(["identity", "tracklet"]).to_pylist():
        if row["identity"] in split.identities:
            lengths.update(row["tracklet"])
    covered = Counter()
    data = PreparedData.read(s3_uri, endpoint_url=moto_server)
    for row in validation_dataset(data, config, split).iter_rows():
        assert row["identity"] in split.identities
        for frame in range(row["chunk"] * T, row["chunk"] * T + row["valid"]):
            covered[(row["tracklet"], frame)] += 1
    assert covered == Counter({(t, f): 1 for t, n in lengths.items() for f in range(n)})


def test_read_tasks_need_no_credentials_in_their_environment(ray_cluster, s3_uri, moto_server):
    # a worker whose environment has no AWS credentials (and no instance role to fall back on) still reads
    fs = read_filesystem(s3_uri, moto_server)
    path = read_manifest(s3_uri, endpoint_url=moto_server).paths("train")[0]
    bare = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_DEFAULT_REGION": "",
            "AWS_EC2_METADATA_DISABLED": "true"}

    @ray_cluster.remote(runtime_env={"env_vars": bare})
    def rows(fs):
        return pq.read_table(path, filesystem=fs, columns=["identity"]).num_rows

    assert ray_cluster.get(rows.remote(fs), timeout=120) == pq.read_metadata(path, filesystem=fs).num_rows
    assert pickle.loads(pickle.dumps(fs)).get_file_info(path).size > 0


def test_missing_bucket_is_named_within_seconds(moto_server, config):
    start = time.monotonic()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-for-pipeline' does not exist"):
        PreparedData.read("s3://no-such-bucket-for-pipeline/mars", endpoint_url=moto_server)
    with pytest.raises(StorageError, match="no-such-bucket-for-pipeline"):
        resolve_data("s3://no-such-bucket-for-pipeline/mars", endpoint_url=moto_server)
    assert time.monotonic() - start < 10
