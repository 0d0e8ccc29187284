"""The one resume rule of train, tune, study and splits (docs/jobs.md): a job started again on the same run
folder continues that run with the settings recorded in its config.yaml. Settings that differ are refused,
naming each (`key: saved -> new`), unless the caller allows the change; then config.yaml takes the new
settings and config-changes.yaml records when and what changed, so a resumed run keeps its history.

Where and on how much a run runs is not a change of the run (PLACEMENT): an elastic or a restarted run may
come back on another number of workers, and the run folder is the same folder whatever its spelling."""

import time
from collections.abc import Mapping
from typing import Any

import yaml

from stal_ray.config import ConfigError
from stal_ray.core import storage

CONFIG_FILE = "config.yaml"  # the run's resolved settings, written into the run folder as it starts
CHANGES_FILE = "config-changes.yaml"  # each allowed change of a resumed run: when, and key: saved -> new
# settings that say where and on what a run runs, not what it computes: a resume may change them freely
PLACEMENT = frozenset({
    "train.num_workers", "train.min_workers", "train.use_gpu", "train.resize_check_s",
    "train.placement_strategy", "train.worker_resource", "train.worker_wait_s", "train.max_failures",
    "train.storage_path", "train.shared_storage", "data.decode_concurrency",
})


class ChangedConfigError(ConfigError):
    """A run was started again with settings other than those it was started with."""


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{"section.key": (saved value, new value)} for every setting that differs, PLACEMENT left out. Both
    are compared as YAML writes and reads them (a tuple and a list of the same values are the same)."""
    saved, new = (yaml.safe_load(yaml.safe_dump(dict(d), sort_keys=True)) or {} for d in (saved, new))
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    return {key: (flat_saved.get(key), flat_new.get(key))
            for key in sorted(flat_saved.keys() | flat_new.keys())
            if key not in PLACEMENT and flat_saved.get(key) != flat_new.get(key)}


def record_config(folder: str, settings: Mapping[str, Any], *, allow_changed: bool = False,
                  endpoint_url: str | None = None, what: str = "run") -> None:
    """Write `settings` (a Config's to_dict()) as folder/config.yaml. When an earlier start of this run wrote
    one, the settings must match it (config_changes): otherwise ChangedConfigError names the settings that
    differ, or with allow_changed the change is appended to folder/config-changes.yaml and config.yaml takes
    the new settings. `what` names the folder in the message (run, search, study, splits)."""
    path = storage.join(folder, CONFIG_FILE)
    text = yaml.safe_dump(dict(settings), sort_keys=False)
    fs, local = storage.filesystem(path, endpoint_url=endpoint_url, check=False)
    with storage.errors(path, endpoint_url):
        saved_text = fs.cat(local).decode() if fs.exists(local) else None
    if saved_text is not None:
        changes = config_changes(yaml.safe_load(saved_text) or {}, settings)
        if changes and not allow_changed:
            listed = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items())
            raise ChangedConfigError(
                f"{folder}: this {what} was started with other settings ({path}), and a resume keeps them. "
                f"Changed: {listed}. Start it again with the settings of {CONFIG_FILE}, choose a new run "
                f"folder, or pass --allow-changed-config to resume with the new ones (recorded in "
                f"{CHANGES_FILE})")
        if changes:
            _append_change(folder, changes, endpoint_url)
        elif saved_text == text:
            return
    storage.write_atomic(path, text.encode(), endpoint_url=endpoint_url, mode=0o600)


def _append_change(folder: str, changes: Mapping[str, tuple[Any, Any]], endpoint_url: str | None) -> None:
    """One more entry in folder/config-changes.yaml (a YAML list, oldest first)."""
    path = storage.join(folder, CHANGES_FILE)
    fs, local = storage.filesystem(path, endpoint_url=endpoint_url, check=False)
    with storage.errors(path, endpoint_url):
        before = fs.cat(local).decode() if fs.exists(local) else ""
    entry = [{"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "changed": {key: {"saved": old, "new": new} for key, (old, new) in changes.items()}}]
    storage.write_atomic(path, (before + yaml.safe_dump(entry, sort_keys=False)).encode(),
                         endpoint_url=endpoint_url, mode=0o600)
    listed = "; ".join(f"{key}: {_show(old)} -> {_show(new)}" for key, (old, new) in changes.items())
    print(f"{folder}: resumed with changed settings, recorded in {path}: {listed}", flush=True)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    """A value as it is written in YAML and on the command line (--set key=value)."""
    if value is None:
        return "(unset)"
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
