"""Settings layered into a Config: the defaults, a YAML file (with its `base:` chain), `section.key=value`
overrides, then checked (config_schema.py says what each setting is and allows). The one import for jobs
and modules: the schema's names are re-exported here.

A YAML file is a path, a URL, or the name of a config the package ships (`mars_resnet50`, the file
stal_ray/configs/mars_resnet50.yaml, which in a checkout is configs/mars_resnet50.yaml)."""

import argparse
import difflib
import os
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from stal_ray.config_checks import (  # noqa: F401 - re-exported: `from stal_ray.config import ...`
    resolve_keypoint_supervision,
    validate,
    validate_config,
)
from stal_ray.config_rules import WrongType, coerce, describe, hints, show
from stal_ray.config_schema import (  # noqa: F401 - re-exported: `from stal_ray.config import ...`
    ATTENTION_MODES,
    BACKBONES,
    BRANCHES,
    DISTANCE_MODES,
    KEYPOINT_SUPERVISION,
    LR_SCHEDULES,
    MINING,
    NO_PRETRAINED,
    OPTIMIZERS,
    PART_NORMS,
    PATH_SETTINGS,
    POSE_SOURCES,
    PRECISIONS,
    PROTOCOLS,
    SCHEDULERS,
    SECTIONS,
    STAN_FCS,
    TRAINED_BRANCHES,
    TUNE_METRICS,
    ZERO_STAGES,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    TuneConfig,
)
from stal_ray.core import storage

# the configs shipped with the package (in a checkout, a link to the top-level configs/)
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] = (), *,
                endpoint_url: str | None = None) -> Config:
    """Defaults, then the YAML file (its `base:` chain first), then `section.key=value` overrides, checked.
    `path` is a local path, a URL the data's storage layer reads (s3:// with `endpoint_url`, https://) or the
    name of a packaged config (packaged_configs())."""
    layers: list[tuple[Mapping, str]] = []
    if path is not None:
        layers += _read_yaml(os.fspath(path), chain=(), referrer=None, endpoint_url=endpoint_url)
    if isinstance(overrides, str):
        overrides = [overrides]
    for override in overrides:
        layers.append((parse_override(override), "command line"))
    return _build(layers)


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Inverse of Config.to_dict (e.g. a config shipped to Ray workers); missing keys keep their defaults."""
    return _build([(d, "dict")])


def with_overrides(config: "Config", overrides: Sequence[str], source: str = "override") -> "Config":
    """A copy of config with `section.key=value` overrides on top, checked as load_config checks them."""
    return _build([(config.to_dict(), "config")] + [(parse_override(o), source) for o in overrides])


def packaged_configs() -> list[str]:
    """The names of the configs the package ships, e.g. ['ilidsvid_bninception', ..., 'synthetic_tiny']."""
    return sorted(path.stem for path in PACKAGED_CONFIGS.glob("*.yaml"))


def packaged_config(name: str) -> str | None:
    """The file of the packaged config `name` (with or without .yaml), or None when `name` is not one: a
    path with a folder or a URL never is."""
    if not name or "://" in name or "/" in name or os.sep in name or name.startswith((".", "~")):
        return None
    path = PACKAGED_CONFIGS / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    return str(path) if path.is_file() else None


def _locate(path: str) -> str:
    """A local path as given when it exists, else the packaged config it names, else the path as given
    (whose reading then fails with the names on offer)."""
    if "://" in path or os.path.exists(path):
        return path
    return packaged_config(path) or path


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "the built-in defaults") -> None:
    """Add --config PATH and repeatable --set KEY=VALUE (stored in args.config and args.overrides); `default`
    names, for --help, what a job uses without --config (args.config stays None, so the job can tell)."""
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="URI", default=None,
                       help="YAML file layered over the built-in defaults: a packaged config's name ("
                            f"{', '.join(packaged_configs())}), a path, or an s3:// (with --endpoint-url) or "
                            "https:// URL, e.g. mars_resnet50, configs/mars_bninception.yaml or a search's "
                            f"s3://bucket/ray_results/NAME/best.yaml (default: {default})")
    group.add_argument("--set", metavar="KEY=VALUE", dest="overrides", action="append", default=[],
                       help="override one setting, e.g. --set train.lr=0.01 --set eval.ranks=[1,5]; "
                            "values are parsed as YAML; repeatable, applied after --config")


def config_from_args(args: argparse.Namespace, shortcuts: Mapping[str, str] | None = None) -> Config:
    """The Config chosen by the arguments that add_config_arguments added. shortcuts maps a job's own flags
    (argparse dest, e.g. "num_workers") to the setting they stand for ("train.num_workers"); a flag that was
    given applies after every --set."""
    overrides = list(getattr(args, "overrides", None) or ())
    for dest, key in (shortcuts or {}).items():
        if getattr(args, dest, None) is not None:
            overrides.append(f"{key}={getattr(args, dest)}")
    config = load_config(getattr(args, "config", None), overrides,
                         endpoint_url=getattr(args, "endpoint_url", None))
    # Ray tasks run in the cluster's working directory, not the job's: local paths are resolved here
    for dotted in PATH_SETTINGS:
        section, key = dotted.split(".")
        value = getattr(getattr(config, section), key)
        if value != NO_PRETRAINED:  # model.pretrained=none is a choice, not a file in this folder
            setattr(getattr(config, section), key, storage.absolute(value))
    return config


def _read_yaml(path: str, chain: tuple[str, ...], referrer: str | None,
               endpoint_url: str | None) -> list[tuple[Mapping, str]]:
    """Layers of one YAML file (a path or a URL), its `base:` chain first."""
    where = f" (base of {referrer})" if referrer else ""
    path = _locate(path)
    is_url = "://" in path and not path.startswith("file://")
    real = path if is_url else os.path.realpath(path.removeprefix("file://"))
    if real in chain:
        raise ConfigError(f"{referrer}: base = {path} is invalid: it inherits from itself")
    try:
        data = yaml.safe_load(_read_text(path, endpoint_url) if is_url else _read_text(real, None))
    except FileNotFoundError:
        names = "" if is_url else f"; the packaged configs, by name: {', '.join(packaged_configs())}"
        raise ConfigError(f"config file not found: {path}{where}{names}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: must hold a mapping of sections ({', '.join(SECTIONS)}), "
                          f"not {type(data).__name__}")
    data = dict(data)
    base = data.pop("base", None)
    layers = []
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base = {show(base)} is invalid: must be the path of a YAML file")
        # relative to the file that names it, wherever that file is; a local file's base may also name a
        # packaged config (`base: mars_resnet50`) where no such file is beside it
        if "://" in base:
            base_path = base
        elif is_url:
            base_path = posixpath.join(posixpath.dirname(path), base)
        else:
            base_path = os.path.join(os.path.dirname(path), os.path.expanduser(base))
            if not os.path.exists(base_path):
                base_path = packaged_config(base) or base_path
        layers += _read_yaml(base_path, chain + (real,), referrer=path, endpoint_url=endpoint_url)
    layers.append((data, path))
    return layers


def _read_text(path: str, endpoint_url: str | None) -> str:
    """A local file, or a URL through the data's storage layer (a search's best.yaml on S3 reads as its
    shards do, with the same endpoint and credentials)."""
    if "://" not in path:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    fs, inner = storage.filesystem(path, endpoint_url=endpoint_url, check=False)
    with storage.errors(path, endpoint_url), fs.open(inner, "rb") as fh:
        return fh.read().decode("utf-8")


def parse_override(override: str) -> dict[str, dict[str, Any]]:
    """'train.lr=0.01' -> {'train': {'lr': 0.01}}, the value parsed as YAML."""
    form = "expected the form section.key=value, e.g. train.lr=0.01"
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"command line: override {override!r} is malformed: {form}")
    key, text = override.split("=", 1)
    key = key.strip()
    section, dot, name = key.partition(".")
    if not dot or not section or not name:
        hint = _suggest_section(key)
        hint = f" (did you mean {hint}.{key}={text}?)" if hint else ""
        raise ConfigError(f"command line: override {override!r} is malformed: {form}{hint}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: {key} = {text!r} is not a valid YAML value: {e}") from None
    return {section: {name: value}}


def _build(layers: Sequence[tuple[Mapping, str]]) -> Config:
    config, origin = Config(), {}
    for layer, source in layers:
        _apply(config, origin, layer, source)
    validate_config(config, origin, default_source="defaults")
    return config


def _apply(config: Config, origin: dict[str, tuple[str, Any]], layer: Mapping, source: str) -> None:
    if not isinstance(layer, Mapping):
        raise ConfigError(f"{source}: must be a mapping of sections ({', '.join(SECTIONS)}), "
                          f"not {type(layer).__name__}")
    for section_name, values in layer.items():
        if section_name not in SECTIONS:
            close = difflib.get_close_matches(str(section_name), SECTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown section {section_name!r}{hint}; "
                              f"valid sections: {', '.join(SECTIONS)}")
        if values is None:  # a section left empty in YAML
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: {section_name} = {show(values)} is invalid: "
                              f"must be a mapping of keys ({', '.join(hints(SECTIONS[section_name]))})")
        section = getattr(config, section_name)
        annotated = hints(type(section))
        for key, value in values.items():
            dotted = f"{section_name}.{key}"
            if key not in annotated:
                raise ConfigError(_unknown_key(source, section_name, str(key)))
            try:
                coerced = coerce(value, annotated[key])
            except WrongType:
                raise ConfigError(f"{source}: {dotted} = {show(value)} is invalid: "
                                  f"must be {describe(annotated[key])}") from None
            origin[dotted] = (source, value)  # the value as written, for messages
            setattr(section, key, coerced)


def _unknown_key(source: str, section: str, key: str) -> str:
    valid = list(hints(SECTIONS[section]))
    close = difflib.get_close_matches(key, valid, n=1)
    if close:
        hint = f" (did you mean {section}.{close[0]}?)"
    else:
        other = _suggest_section(key)
        hint = f" (did you mean {other}.{key}?)" if other else ""
    return f"{source}: unknown key {section}.{key}{hint}; valid keys of {section}: {', '.join(valid)}"


def _suggest_section(key: str) -> str | None:
    """The section holding a key of this name, when exactly one does."""
    owners = [name for name, cls in SECTIONS.items() if key in hints(cls)]
    return owners[0] if len(owners) == 1 else None
