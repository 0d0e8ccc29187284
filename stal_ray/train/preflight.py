"""One driver-side check of a training job, shared by train, tune, study and splits: everything a run needs
that the driver can see (weights, resources, storage, the data) is refused here, in seconds, with the same
one-line message whichever job asked, before any trial, worker, split or validation split is written."""

import os

import ray

from stal_ray.config import NO_PRETRAINED, Config, ConfigError
from stal_ray.core import storage
from stal_ray.data.prepared.handle import PreparedData, as_prepared
from stal_ray.data.prepared.validation import held_out_count
from stal_ray.data.stream.pipeline import identity_labels
from stal_ray.model.backbones import check_weights_choice
from stal_ray.model.weights import local_weights


def preflight(config: Config, data: PreparedData | str | None, *, endpoint_url: str | None = None,
              exclude_identities: list[int] | None = None,
              held_out: float | None = None) -> tuple[list[int], dict[str, int]]:
    """Refuse what `config` cannot train on `data` (None: the data is yet to be prepared, as in splits; its
    checks then run per split). held_out: the share of training identities a search will hold out for
    validation (data.val_identities), counted before its split is written. Returns the training labels
    (before that split) and the manifest's training counts ([], {} without data). endpoint_url: the object
    store's endpoint of the storage path when there is no data yet; with data, the data's."""
    if data is not None:
        data = as_prepared(data)
        endpoint_url = data.endpoint_url
    root = storage_root(config)
    storage.check_output_folder(root, "--storage-path (train.storage_path)", endpoint_url=endpoint_url)
    check_resources(config)
    check_shared_storage(config)
    if storage.is_s3(root):
        storage.filesystem(root, endpoint_url=endpoint_url)  # one HEAD: a missing bucket fails here
    if data is None:
        return [], {}
    labels = identity_labels(data, **(
        {"exclude_identities": exclude_identities} if exclude_identities else {}))
    # a search trains on what its validation split leaves: counted here, before the split is carved
    kept = len(labels) - (0 if held_out is None else held_out_count(held_out, len(labels)))
    return labels, check_data(config, data, labels[:max(0, kept)])


def check_weights(config: Config) -> None:
    """A large backbone names its weights (or "none"); a URL's file is fetched into this node's cache and
    checked by its sha256 (model/weights.py), a path or unhashed URL must exist."""
    pretrained = config.model.pretrained
    try:
        check_weights_choice(config.model.backbone, pretrained)
        if not pretrained or pretrained == NO_PRETRAINED:
            return
        source = local_weights(pretrained)
        fs, path = storage.filesystem(source, check=False)
        if not fs.exists(path):
            raise FileNotFoundError(f"model.pretrained = {pretrained}: no such file; give the path or URL of "
                                    "a state dict saved with torch.save, or model.pretrained=none")
    except (ValueError, OSError) as error:
        raise ConfigError(str(error)) from None


def storage_root(config: Config) -> str:
    return config.train.storage_path or os.path.expanduser("~/ray_results")


def run_folder(config: Config, name: str) -> str:
    """<storage path>/<name>: a training run's folder, or a search's."""
    return storage.join(storage_root(config), name)


def check_settings(config: Config) -> None:
    """What needs no Ray: the weights and settings that cannot train anywhere. A job runs it before it starts
    or joins Ray, so a bad config is refused in the seconds its imports take."""
    check_weights(config)
    train = config.train
    if train.min_workers > train.num_workers:
        raise ConfigError(f"train.min_workers = {train.min_workers} is above train.num_workers = "
                          f"{train.num_workers}: the group can shrink to min_workers, never grow past "
                          "num_workers; lower --min-workers or raise --num-workers")
    if config.train.sync_batchnorm and not config.train.use_gpu:
        raise ConfigError("train.sync_batchnorm = true needs train.use_gpu = true: torch synchronises "
                          "BatchNorm on GPUs only (set train.sync_batchnorm=false for CPU training)")


def check_resources(config: Config) -> None:
    """Settings this cluster cannot run, refused before any worker starts."""
    check_settings(config)
    train = config.train
    if train.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < train.num_workers:
            # not an error: an autoscaling cluster (cluster/aws_gpu.yaml starts with no GPU node) adds them
            # once the workers ask; on a fixed cluster the run waits, and the warning says why
            print(f"warning: train.use_gpu = true with train.num_workers = {train.num_workers}, but the Ray "
                  f"cluster has {gpus:g} GPUs now: the workers wait until the autoscaler adds GPU nodes (on "
                  "a fixed cluster, lower --num-workers)", flush=True)


def check_data(config: Config, data: PreparedData | str, labels: list[int]) -> dict[str, int]:
    """Settings the prepared data set cannot train, refused in the driver before any worker starts.

    A tracklet shorter than data.seq_len is not refused: restricted random sampling repeats its frames in
    order (data.sampling), as evaluation pads a short chunk.
    """
    model, p, workers = config.model, config.data.identities_per_batch, config.train.num_workers
    data = as_prepared(data)
    counts, uri = data.manifest.counts["train"], data.uri
    if model.pose_source == "keypoints" and not counts.get("frames_with_keypoints"):
        raise ConfigError(
            f"model.pose_source = keypoints, but {uri} has no keypoints (0 of {counts['frames']} training "
            "frames): set model.pose_source=learned (a keypoint head) or prior (the canonical pose), or "
            f"estimate them (python jobs/estimate_pose.py --data {uri}), or prepare the data set with "
            "keypoints (jobs/prepare_mars.py --keypoints FILE)")
    if len(labels) < p * workers:
        raise ConfigError(
            f"data.identities_per_batch = {p} with train.num_workers = {workers} needs at least "
            f"{p * workers} training identities (each worker's batches hold {p} distinct ones), but {uri} "
            f"leaves {len(labels)} for training: lower data.identities_per_batch or --num-workers, or lower "
            "data.val_identities")
    return counts


def check_shared_storage(config: Config, nodes: list[dict] | None = None,
                         this_node: str | None = None) -> None:
    """Refuse a local storage path where the workers may run on other hosts: each would write checkpoints
    and model.pt to its own disk, where the evaluation on the head node never finds them. Such a cluster
    has alive nodes on more than one host, or a head node without CPUs (its workers are yet to start, as
    in cluster/aws_gpu.yaml). nodes: ray.nodes() entries; this_node: the driver's node id."""
    root = storage_root(config)
    if ("://" in root and not root.startswith("file://")) or config.train.shared_storage:
        return
    nodes = ray.nodes() if nodes is None else nodes
    this_node = ray.get_runtime_context().get_node_id() if this_node is None else this_node
    alive = [node for node in nodes if node.get("Alive")]
    hosts = {node["NodeManagerAddress"] for node in alive}
    cpu_less_head = any(node["NodeID"] == this_node and not node["Resources"].get("CPU") for node in alive)
    if len(hosts) > 1 or cpu_less_head:
        where = f"{len(hosts)} hosts" if len(hosts) > 1 else "a head node without CPUs"
        raise ConfigError(f"train.storage_path = {root} is a local path, but this Ray cluster has {where}: "
                          "checkpoints and model.pt would stay on the workers' own disks; pass "
                          "--storage-path s3://BUCKET/PREFIX (or set train.shared_storage=true for a path "
                          "mounted on every node, such as NFS)")
