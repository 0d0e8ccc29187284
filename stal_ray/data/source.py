"""Which prepared data set a job reads: the URI it was given, or the embedded synthetic one."""

import argparse

from stal_ray.core import storage
from stal_ray.data.prepared.handle import PreparedData
from stal_ray.data.prepared.manifest import IncompleteDatasetError
from stal_ray.data.releases.registry import REGISTRY
from stal_ray.data.synthetic.generator import ensure_synthetic_shards


def resolve_data(uri: str | None, *, endpoint_url: str | None = None) -> PreparedData:
    """The prepared data set a job reads, its manifest read once here: `uri` checked (a complete data set
    with a manifest; a local path made absolute), or when None the embedded synthetic data set, generated
    and sharded into the cache on first use. The one place a job gives an endpoint for its data: the handle
    carries it on."""
    if uri is None:
        return PreparedData.read(ensure_synthetic_shards())
    uri = storage.absolute(uri)  # read by Ray tasks, whose working directory is the cluster's
    try:
        return PreparedData.read(uri, endpoint_url=endpoint_url)
    except IncompleteDatasetError:
        fs, path = storage.filesystem(uri, endpoint_url=endpoint_url)
        for spec in REGISTRY.values():
            if any(fs.exists(storage.join(path, marker)) for marker in spec.markers):
                raise storage.StorageError(spec.prepare_hint(uri)) from None
        raise


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data URI and --endpoint-url URL, as every job that reads prepared shards takes them."""
    parser.add_argument("--data", metavar="URI", default=None,
                        help="prepared shards (jobs/prepare_mars.py), local or s3:// "
                             "(default: data.root, else the embedded synthetic data set)")
    parser.add_argument("--endpoint-url", metavar="URL", default=None, type=endpoint_url,
                        help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")


def endpoint_url(text: str) -> str:
    """argparse type of --endpoint-url: an http(s)://host[:port] URL, refused with the fix otherwise."""
    reason = storage.endpoint_problem(text)
    if reason:
        raise argparse.ArgumentTypeError(reason)
    return text
