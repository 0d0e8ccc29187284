"""One handle for a prepared data set: where it is (URI and S3 endpoint) and its manifest, read once.

A job resolves its data once in the driver (stal_ray.data.source.resolve_data) and passes the handle down
to the stream, the checks, the trainer (whose workers get it in their train_loop_config), evaluation, Tune,
the study and pose. Everything it holds is fixed when it is read: the manifest names one version of the
data set (publish.py), so a run reads the version it started with even when a prepare or estimate_pose.py
publishes a new one meanwhile, and no worker reads the manifest again. It pickles (Ray ships it to tasks
and actors) and round-trips through plain data (to_dict, from_dict) for Ray Train's train_loop_config.
"""

import contextlib
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.fs as pafs

from stal_ray.core import storage
from stal_ray.data.prepared.manifest import Manifest, read_manifest


@dataclass(frozen=True, eq=False)
class PreparedData:
    """A complete prepared data set: its URI (local paths absolute), the S3 endpoint it is read through
    (None: the environment's, else AWS) and its manifest, checked by read_manifest."""

    uri: str
    endpoint_url: str | None
    manifest: Manifest

    @classmethod
    def read(cls, uri: str, *, endpoint_url: str | None = None) -> "PreparedData":
        """The data set at `uri`, its manifest read and checked (read_manifest's IncompleteDatasetError when
        there is no complete one)."""
        return cls(uri, endpoint_url, read_manifest(uri, endpoint_url=endpoint_url))

    def reread(self) -> "PreparedData":
        """The data set at the same URI as it is now: the current version, which may be a newer one."""
        return self.read(self.uri, endpoint_url=self.endpoint_url)

    @property
    def version(self) -> str:
        return self.manifest.version

    def paths(self, split: str) -> list[str]:
        """The split's shard paths inside filesystem(), arrow_filesystem() and read_filesystem()."""
        return self.manifest.paths(split)

    def filesystem(self, *, check: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
        """(fsspec filesystem, the data set's root inside it), as storage.filesystem."""
        return storage.filesystem(self.uri, endpoint_url=self.endpoint_url, check=check)

    def arrow_filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem of paths(), for pyarrow.parquet in this process."""
        return storage.arrow_filesystem(self.uri, endpoint_url=self.endpoint_url, check=False)[0]

    def read_filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem of paths() for Ray read tasks on any node (storage.read_filesystem)."""
        return storage.read_filesystem(self.uri, self.endpoint_url)

    def errors(self) -> contextlib.AbstractContextManager[None]:
        """storage.errors for this data set: a storage failure raised as a StorageError naming it."""
        return storage.errors(self.uri, self.endpoint_url)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (built-in types only), e.g. for Ray Train's train_loop_config; from_dict reads it back
        without reading the manifest again."""
        manifest = self.manifest
        return {"uri": self.uri, "endpoint_url": self.endpoint_url, "manifest": manifest.to_json(),
                "version": manifest.version, "root": manifest._root}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreparedData":
        manifest = Manifest.from_json(d["manifest"])
        manifest.uri, manifest.version, manifest._root = d["uri"], d["version"], d["root"]
        return cls(d["uri"], d.get("endpoint_url"), manifest)


def as_prepared(data: "PreparedData | str") -> PreparedData:
    """`data` as a handle: a URI string (tests, benchmarks; the environment's endpoint) is read here."""
    return data if isinstance(data, PreparedData) else PreparedData.read(data)

