"""Tests of stal_ray.config: defaults, YAML layering, --set overrides, validation messages, round trips."""

import argparse
import json
from pathlib import Path

import pytest

from stal_ray.config import (
    BACKBONES,
    Config,
    ConfigError,
    add_config_arguments,
    config_from_args,
    config_from_dict,
    load_config,
    packaged_configs,
    validate,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_load_and_validate():
    config = load_config()
    assert config == Config()
    assert config.model.backbone in BACKBONES
    train = config.train
    assert (train.margin_global, train.margin_local, train.local_weight) == (1.2, 0.8, 0.3)
    assert config.eval.fusion_rate == 0.3 and config.data.seq_len == 8
    # beyond the paper, each off by default: the paper's SGD, step decay, no warm-up, no label smoothing
    assert (train.optimizer, train.lr_schedule, train.warmup_iterations, train.label_smoothing) == (
        "sgd", "step", 0, 0.0)
    assert not config.model.bnneck
    # beyond the paper, off by default; Zhong et al.'s k1, k2, λ when on
    assert not config.eval.rerank
    assert (config.eval.rerank_k1, config.eval.rerank_k2, config.eval.rerank_lambda) == (20, 6, 0.3)
    assert validate(Config()) == config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    assert isinstance(load_config(path), Config)


def test_every_checkout_config_is_a_packaged_one_by_name(tmp_path, monkeypatch):
    """configs/ is what the package ships (stal_ray/configs links to it): each YAML loads by its name, from
    anywhere, with or without .yaml, to what its path loads, `base:` chain included."""
    monkeypatch.chdir(tmp_path)
    names = packaged_configs()
    assert names == sorted(path.stem for path in CONFIGS.glob("*.yaml")) and "mars_resnet50" in names
    for name in names:
        assert load_config(name) == load_config(f"{name}.yaml") == load_config(CONFIGS / f"{name}.yaml")
    # mars_resnet50 is its own settings over mars_bninception's (base:), both found in the package
    assert load_config("mars_resnet50").model.backbone == "resnet50"
    assert load_config("mars_resnet50").data.seq_len == load_config("mars_bninception").data.seq_len


def test_a_file_of_that_name_wins_over_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "train: {lr: 0.125}\n", "synthetic_tiny.yaml")
    assert load_config("synthetic_tiny.yaml").train.lr == 0.125
    assert load_config("synthetic_tiny").train.lr == load_config(CONFIGS / "synthetic_tiny.yaml").train.lr


def test_a_base_may_name_a_packaged_config(tmp_path):
    path = write(tmp_path, "base: mars_resnet50\ntrain: {lr: 0.25}\n")
    config = load_config(path)
    assert config.model.backbone == "resnet50" and config.train.lr == 0.25


def test_an_unknown_name_lists_the_packaged_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config file not found: mars_resnet51") as err:
        load_config("mars_resnet51")
    assert "mars_resnet50" in str(err.value) and "synthetic_tiny" in str(err.value)


def test_synthetic_tiny_is_small():
    config = load_config(CONFIGS / "synthetic_tiny.yaml")
    model = config.model
    assert (model.backbone, model.pose_source, model.feature_dim) == ("tiny", "keypoints", 128)
    assert (config.data.seq_len, config.data.height, config.data.width) == (4, 64, 32)
    assert (config.data.identities_per_batch, config.data.clips_per_identity) == (4, 2)
    assert (config.train.iterations, config.train.lr, config.train.lr_step) == (200, 0.01, 100)
    assert config.data.root is None and not config.train.use_gpu


@pytest.mark.parametrize("strong, base", [("synthetic_strong.yaml", "synthetic_tiny.yaml"),
                                          ("mars_resnet50_strong.yaml", "mars_resnet50.yaml")])
def test_strong_configs_are_their_base_with_every_switch_beyond_the_paper_on(strong, base):
    config, paper = load_config(CONFIGS / strong), load_config(CONFIGS / base)
    assert config.model.bnneck and config.eval.rerank
    train = config.train
    assert (train.optimizer, train.lr_schedule, train.label_smoothing) == ("adam", "cosine", 0.1)
    assert 0 < train.warmup_iterations < train.iterations
    data = config.data
    assert data.flip and data.crop_padding > 0 and data.color_jitter > 0 and data.random_erasing == 0.5
    switched = {"model": {"bnneck"}, "eval": {"rerank"},
                "data": {"flip", "crop_padding", "color_jitter", "random_erasing"},
                "train": {"optimizer", "lr", "weight_decay", "warmup_iterations", "lr_schedule",
                          "label_smoothing"}}
    # everything else as the paper recipe it builds on
    for section, values in paper.to_dict().items():
        for key, value in values.items():
            if key not in switched.get(section, ()):
                assert config.to_dict()[section][key] == value, f"{section}.{key}"


def test_mars_resnet50_inherits_from_bninception():
    base = load_config(CONFIGS / "mars_bninception.yaml")
    config = load_config(CONFIGS / "mars_resnet50.yaml")
    assert (config.model.backbone, config.data.height, config.data.width) == ("resnet50", 256, 128)
    assert base.model.backbone == "bninception" and (base.data.height, base.data.width) == (224, 224)
    assert config.train == base.train and config.eval == base.eval and config.data.root == base.data.root


def test_base_resolved_relative_to_file_and_applied_first(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "train: {lr: 0.5, iterations: 7}\n", "parent.yaml")
    child = write(tmp_path, "base: ../parent.yaml\ntrain: {lr: 0.25}\n", "sub/child.yaml")
    config = load_config(child)
    assert config.train.lr == 0.25 and config.train.iterations == 7


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="inherits from itself"):
        load_config(tmp_path / "a.yaml")


def test_overrides_parse_int_float_bool_list_and_null():
    config = load_config(CONFIGS / "mars_bninception.yaml", [
        "data.seq_len=4", "train.lr=1e-3", "train.margin_global=2", "train.use_gpu=false",
        "eval.ranks=[1,5]", "data.root=null", "tune.local_weight=[0, 0.5]", "model.backbone=tiny",
    ])
    assert config.data.seq_len == 4 and isinstance(config.data.seq_len, int)
    assert config.train.lr == 0.001 and isinstance(config.train.lr, float)
    assert config.train.margin_global == 2.0 and isinstance(config.train.margin_global, float)
    assert config.train.use_gpu is False
    assert config.eval.ranks == [1, 5]
    assert config.data.root is None
    assert config.tune.local_weight == (0.0, 0.5)
    assert config.model.backbone == "tiny"


def test_overrides_apply_after_yaml_and_last_one_wins(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.5\n")
    assert load_config(path, ["train.lr=0.1", "train.lr=0.2"]).train.lr == 0.2


def test_empty_yaml_and_empty_section_keep_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "model:\ntune:\n", "b.yaml")) == Config()


@pytest.mark.parametrize("yaml_text, key, value", [
    ("data:\n  seq_len: 0\n", "data.seq_len", "0"),
    ("train:\n  margin_local: -0.5\n", "train.margin_local", "-0.5"),
    ("model:\n  backbone: vgg16\n", "model.backbone", "vgg16"),
    ("data:\n  clips_per_identity: 1\n", "data.clips_per_identity", "1"),
    ("train:\n  iterations: 1.5\n", "train.iterations", "1.5"),
    ("train:\n  gamma: 0\n", "train.gamma", "0"),
    ("train:\n  zero_stage: 4\n", "train.zero_stage", "4"),
    ("tune:\n  margin_global: [2.0, 1.0]\n", "tune.margin_global", "[2.0, 1.0]"),
    ("eval:\n  ranks: [1, 0]\n", "eval.ranks", "[1, 0]"),
    ("data:\n  val_identities: 1.0\n", "data.val_identities", "1.0"),
    ("train:\n  use_gpu: maybe\n", "train.use_gpu", "maybe"),
    ("model:\n  bnneck: 1\n", "model.bnneck", "1"),
    ("train:\n  optimizer: lamb\n", "train.optimizer", "lamb"),
    ("train:\n  lr_schedule: linear\n", "train.lr_schedule", "linear"),
    ("train:\n  warmup_iterations: -1\n", "train.warmup_iterations", "-1"),
    ("train:\n  label_smoothing: 1.0\n", "train.label_smoothing", "1.0"),
    ("eval:\n  rerank: yes please\n", "eval.rerank", "yes please"),
    ("eval:\n  rerank_k1: 0\n", "eval.rerank_k1", "0"),
    ("eval:\n  rerank_lambda: 1.5\n", "eval.rerank_lambda", "1.5"),
])
def test_bad_yaml_value_names_file_key_and_value(tmp_path, yaml_text, key, value):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key} = ") and value in message and "is invalid: must be" in message


def test_seq_len_zero_message_says_what_is_allowed(tmp_path):
    path = write(tmp_path, "data: {seq_len: 0}\n")
    with pytest.raises(ConfigError, match=r"data\.seq_len = 0 is invalid: must be an integer >= 1"):
        load_config(path)


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["model.backbone=vgg16"])
    assert "command line: model.backbone = 'vgg16'" in str(err.value)
    assert all(name in str(err.value) for name in BACKBONES)


def test_bad_override_value_names_command_line():
    with pytest.raises(ConfigError, match=r"^command line: train\.lr = -1 is invalid: must be a number > 0"):
        load_config(overrides=["train.lr=-1"])


def test_int_setting_rejects_fraction_and_float_accepts_int():
    with pytest.raises(ConfigError, match=r"data\.height = 1\.5 is invalid: must be an integer"):
        load_config(overrides=["data.height=1.5"])
    assert load_config(overrides=["train.iterations=1.5e+5"]).train.iterations == 150000
    assert load_config(overrides=["eval.fusion_rate=1"]).eval.fusion_rate == 1.0


def test_unknown_key_in_yaml_suggests_closest_and_lists_valid_keys(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: unknown key train.lrr")
    assert "did you mean train.lr?" in message and "momentum" in message and "margin_global" in message


def test_unknown_key_in_override_suggests_its_section():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["data.lr=0.1"])
    assert "command line: unknown key data.lr" in str(err.value) and "train.lr" in str(err.value)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean train\?\)"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))


@pytest.mark.parametrize("override", ["train.lr", "lr=0.1", "=3", ".lr=1"])
def test_malformed_override_states_expected_form(override):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert repr(override) in str(err.value) and "section.key=value" in str(err.value)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config(missing)
    assert str(missing) in str(err.value)


def test_missing_base_names_base_and_referrer(tmp_path):
    path = write(tmp_path, "base: gone.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "gone.yaml" in str(err.value) and f"base of {path}" in str(err.value)


def test_invalid_yaml_and_non_mapping_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))


def test_fp16_on_cpu_is_allowed():
    config = load_config(overrides=["train.precision=fp16", "train.use_gpu=false"])
    assert config.train.precision == "fp16"


def test_to_dict_round_trips_exactly_and_is_json():
    config = load_config(CONFIGS / "mars_resnet50.yaml", ["tune.margin_local=[0.5, 1.5]", "train.seed=3"])
    plain = config.to_dict()
    assert set(plain) == {"model", "data", "train", "eval", "tune"}
    assert json.loads(json.dumps(plain)) == plain
    assert config_from_dict(plain) == config
    assert config_from_dict(json.loads(json.dumps(plain))) == config
    assert isinstance(config_from_dict(plain).tune.margin_local, tuple)


def test_config_from_dict_validates():
    with pytest.raises(ConfigError, match=r"^dict: data\.seq_len = -2 is invalid"):
        config_from_dict({"data": {"seq_len": -2}})


def test_validate_catches_settings_changed_in_code():
    config = Config()
    config.train.momentum = 1.0
    with pytest.raises(ConfigError, match=r"train\.momentum = 1\.0 is invalid: must be a number in \[0, 1\)"):
        validate(config)


def test_argparse_helpers_build_config(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    path = write(tmp_path, "train: {lr: 0.5}\n")
    argv = ["--config", str(path), "--set", "train.iterations=9", "--set", "eval.ranks=[1]"]
    args = parser.parse_args(argv)
    config = config_from_args(args)
    assert (config.train.lr, config.train.iterations, config.eval.ranks) == (0.5, 9, [1])
    assert config_from_args(parser.parse_args([])) == Config()


def test_job_flags_stand_for_settings_and_win_over_set():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--storage-path", default=None)
    shortcuts = {"num_workers": "train.num_workers", "storage_path": "train.storage_path"}
    args = parser.parse_args(["--set", "train.num_workers=2", "--num-workers", "4"])
    config = config_from_args(args, shortcuts)
    assert config.train.num_workers == 4 and config.train.storage_path is None
    with pytest.raises(ConfigError, match="train.num_workers"):
        config_from_args(parser.parse_args(["--num-workers", "0"]), shortcuts)


# --- configs from anywhere data comes from


def upload_configs(fs, prefix: str) -> None:
    """A config and its base side by side under prefix: child.yaml names base.yaml relative to itself."""
    fs.pipe(f"{prefix}/base.yaml", b"train:\n  lr: 0.05\n  iterations: 77\n")
    fs.pipe(f"{prefix}/child.yaml", b"base: base.yaml\ntrain:\n  lr: 0.02\n")


def test_a_config_on_s3_is_read_with_its_base_beside_it(make_bucket, moto_server):
    from stal_ray.core import storage
    from stal_ray.data.source import add_data_arguments

    bucket = make_bucket()
    fs, _ = storage.filesystem(bucket, endpoint_url=moto_server)
    upload_configs(fs, f"{bucket.removeprefix('s3://')}/search")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    add_data_arguments(parser)
    args = parser.parse_args(["--config", f"{bucket}/search/child.yaml", "--endpoint-url", moto_server,
                              "--set", "train.seed=9"])
    config = config_from_args(args)
    assert (config.train.lr, config.train.iterations, config.train.seed) == (0.02, 77, 9)
    with pytest.raises(ConfigError, match=f"config file not found: {bucket}/search/nothing.yaml"):
        load_config(f"{bucket}/search/nothing.yaml", endpoint_url=moto_server)


def test_a_config_over_https_is_read_with_its_base_beside_it(tmp_path):
    import functools
    import http.server
    import threading

    import fsspec

    upload_configs(fsspec.filesystem("file"), str(tmp_path))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        config = load_config(f"{url}/child.yaml")
        assert (config.train.lr, config.train.iterations) == (0.02, 77)
        with pytest.raises(ConfigError, match=f"config file not found: {url}/gone.yaml"):
            load_config(f"{url}/gone.yaml")
    finally:
        server.shutdown()
        server.server_close()


def test_pretrained_none_stays_a_choice_not_a_path_in_this_folder():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--set", "model.pretrained=none", "--set", "train.storage_path=runs"])
    config = config_from_args(args)
    assert config.model.pretrained == "none" and Path(config.train.storage_path).is_absolute()
