"""A local storage path is refused where the train workers may run on other hosts (train.trainer)."""

import pytest

from stal_ray.config import ConfigError, load_config
from stal_ray.train.trainer import check_shared_storage


def node(node_id: str, address: str, cpus: float = 8, alive: bool = True) -> dict:
    """One entry of ray.nodes(), the fields the check reads."""
    return {"NodeID": node_id, "NodeManagerAddress": address, "Alive": alive, "Resources": {"CPU": cpus}}


HEAD = node("head", "10.0.0.1")
TWO_HOSTS = [HEAD, node("gpu", "10.0.0.2")]


@pytest.mark.parametrize("storage", [None, "/tmp/runs", "file:///tmp/runs"])
def test_local_storage_on_two_hosts_is_refused_with_the_fix(storage):
    config = load_config(None, [f"train.storage_path={storage}"] if storage else [])
    with pytest.raises(ConfigError, match=r"local path, but this Ray cluster has 2 hosts.*--storage-path s3://"):
        check_shared_storage(config, nodes=TWO_HOSTS, this_node="head")


def test_a_head_without_cpus_is_refused_before_its_workers_start():
    config = load_config(None, ["train.storage_path=/tmp/runs"])
    with pytest.raises(ConfigError, match="a head node without CPUs"):
        check_shared_storage(config, nodes=[node("head", "10.0.0.1", cpus=0)], this_node="head")


@pytest.mark.parametrize(("nodes", "overrides"), [
    ([HEAD], []),  # one machine
    ([HEAD, node("second", "10.0.0.1")], []),  # two Ray nodes on one host share its disk
    ([HEAD, node("gone", "10.0.0.2", alive=False)], []),  # a dead node holds no worker
    (TWO_HOSTS, ["train.storage_path=s3://bucket/runs"]),
    (TWO_HOSTS, ["train.storage_path=/mnt/nfs/runs", "train.shared_storage=true"]),
])
def test_shared_or_single_host_storage_is_accepted(nodes, overrides):
    check_shared_storage(load_config(None, overrides), nodes=nodes, this_node="head")
