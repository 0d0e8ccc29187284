"""The stream's supply against the workers' demand (train/supply.py), and the decoding stage that follows the
cluster's CPUs (data.decode_concurrency null) or a cap."""

import pytest
import ray.data

from stal_ray.config import Config, load_config
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.data.stream.pipeline import training_dataset
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.train.supply import CONSUMER_SHARE, DECODE_TASK_SHARE, STREAM_SHARE, balance, decode_rate

EIGHT_A100 = {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 8.0}  # one p4d.24xlarge


def mars_config(*overrides: str) -> Config:
    return load_config("configs/mars_resnet50.yaml", ["train.num_workers=8", *overrides])


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("supply")
    release = write_synthetic_release(str(root / "release"), identities=4, test_identities=2, cameras=2,
                                      tracklets_per_identity=(1, 2), frames_per_tracklet=(4, 6), height=64,
                                      width=32, junk_tracklets=0, distractor_tracklets=0)
    write_shards(read_mars(release), str(root / "shards"), progress=False)
    return str(root / "shards")


def test_decoding_follows_the_cluster_unless_capped():
    assert Config().data.decode_concurrency is None
    assert load_config("configs/mars_resnet50.yaml").data.decode_concurrency is None
    assert load_config("configs/synthetic_tiny.yaml").data.decode_concurrency == 2  # a laptop's CPU workers


def test_uncapped_supply_grows_with_the_clusters_cpus():
    config = mars_config()
    small = balance(config, 8000, EIGHT_A100)
    large = balance(config, 8000, {**EIGHT_A100, "CPU": 96.0 + 8 * 32})  # + eight cpu_worker nodes
    assert small.decoding_cpus == 96 - 8  # less the train workers' CPUs
    assert small.supply == pytest.approx(88 * 8000 * STREAM_SHARE)
    assert large.supply == pytest.approx((88 + 256) * 8000 * STREAM_SHARE)


def test_demand_of_eight_a100_is_the_readmes_estimate():
    found = balance(mars_config(), 8000, EIGHT_A100)
    assert found.accelerator == "A100" and found.gflop_per_frame == pytest.approx(237 / 8)
    per_gpu = 100e3 / (237 / 8)  # 100 TFLOP/s sustained over 29.6 GFLOP per frame
    assert found.demand == pytest.approx(8 * per_gpu) and 3300 < per_gpu < 3500  # README: ~3,400 per A100
    assert not found.gpus_wait and found.warning() is None
    assert "against ~27,004 frames/s that 8 GPU workers consume (A100 at 100 TFLOP/s" in found.line()


def test_a_cap_of_two_decoders_starves_eight_gpus_and_says_how_to_fix_it():
    found = balance(mars_config("data.decode_concurrency=2"), 8000, EIGHT_A100)
    assert found.supply == pytest.approx(2 * 8000 * DECODE_TASK_SHARE)
    assert found.gpus_wait
    assert "the GPUs would wait for data" in found.warning()
    assert "data.decode_concurrency=null" in found.warning()


def test_a_cluster_without_free_cpus_supplies_nothing_and_warns():
    found = balance(mars_config(), 8000, {"CPU": 8.0, "GPU": 8.0})
    assert found.decoding_cpus == 0 and found.supply == 0 and found.gpus_wait
    assert "add CPU nodes" in found.warning()


def test_decoding_at_the_consumer_is_the_train_workers_threads_and_cpu_nodes_add_none():
    """data.decode_at = consumer: 8 workers x the node's 96 CPUs over its 8 GPUs = 12 threads each."""
    found = balance(mars_config("data.decode_at=consumer"), 8000, EIGHT_A100)
    assert found.decoding_cpus == 8 * 12 and found.supply == pytest.approx(96 * 8000 * CONSUMER_SHARE)
    assert "decoding at the consumer: ~" in found.line() and "8 train workers x 12 threads" in found.line()
    joined = balance(mars_config("data.decode_at=consumer", "data.decode_concurrency=1"), 2000,
                     {**EIGHT_A100, "CPU": 96.0 + 8 * 32})
    assert joined.decoding_cpus == 8 and joined.supply == pytest.approx(8 * 2000 * CONSUMER_SHARE)
    assert joined.gpus_wait and "data.decode_at=stream" in joined.warning()
    assert "add CPU nodes" not in joined.warning()


def test_unknown_gpu_is_assumed_an_a100_and_cpu_workers_have_no_demand():
    unknown = balance(mars_config(), 8000, {"CPU": 96.0, "GPU": 8.0, "accelerator_type:B300": 8.0})
    assert "B300 (its rate unknown here" in unknown.accelerator
    assert unknown.demand == pytest.approx(balance(mars_config(), 8000, EIGHT_A100).demand)
    on_cpu = balance(load_config("configs/synthetic_tiny.yaml"), 8000, {"CPU": 8.0})
    assert on_cpu.demand is None and not on_cpu.gpus_wait and "train workers on CPU" in on_cpu.line()


def test_decode_rate_is_measured_on_the_data_sets_frames(shards):
    config = load_config("configs/synthetic_tiny.yaml")
    rate = decode_rate(shards, config.data)
    assert 100 < rate < 1e6  # frames per CPU-second of 64x32 frames: any real decoder is in this range


def _decoding_stage(ds: ray.data.Dataset):
    """The logical map operator of the decoding tasks (the plan's last)."""
    return ds._logical_plan.dag


def test_training_stream_decodes_uncapped_unless_capped(ray_cluster, shards):
    config = load_config("configs/synthetic_tiny.yaml", ["data.decode_concurrency=null"])
    ds = training_dataset(shards, config)
    assert _decoding_stage(ds).compute.size is None
    capped = training_dataset(shards, load_config("configs/synthetic_tiny.yaml"))
    assert _decoding_stage(capped).compute.size == 2
