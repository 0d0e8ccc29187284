"""One driver-side check for every job that trains: train, tune, study and splits refuse the same bad settings
with the same message, before any trial, worker, split or validation split is written."""

import os
from pathlib import Path

import pytest

from jobs import train_mars, tune_stal
from stal_ray.config import ConfigError, load_config
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.mars import read_mars
from stal_ray.study.splits import SplitData, run_splits

REPO = Path(__file__).resolve().parents[1]
MARS_CONFIG = str(REPO / "configs" / "mars_resnet50.yaml")
SMALL = ["--set", "data.height=32", "--set", "data.width=16"]


@pytest.fixture(scope="module")
def shards(small_release_root, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("preflight") / "shards")
    write_shards(read_mars(small_release_root), out, progress=False)
    return out


def written(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")) if folder.exists() else []


def refusal(job, args: list[str], capsys) -> str:
    """The one line the job prints on stderr, without its name."""
    assert job.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0].split(": error: ", 1)[1]


def test_tune_refuses_a_config_without_weights_with_trains_message_before_writing(ray_cluster, shards,
                                                                                 tmp_path, capsys):
    args = ["--config", MARS_CONFIG, "--data", shards, "--storage-path", str(tmp_path / "runs"),
            "--set", "model.pretrained=null", *SMALL]
    message = refusal(train_mars, args, capsys)
    assert message.startswith("model.pretrained is not set for backbone resnet50")
    assert refusal(tune_stal, args + ["--num-samples", "2"], capsys) == message
    assert written(tmp_path) == [] and not os.path.exists(os.path.join(shards, "validation"))


def test_too_few_identities_after_the_validation_split_are_refused_before_it_is_written(ray_cluster, shards,
                                                                                        tmp_path, capsys):
    # 5 training identities: 2 held out leave 3, fewer than P = 4 distinct identities per batch
    args = ["--config", MARS_CONFIG, "--data", shards, "--storage-path", str(tmp_path),
            "--set", "model.pretrained=none", "--set", "data.identities_per_batch=4",
            "--set", "data.val_identities=0.2", "--num-samples", "2", *SMALL]
    message = refusal(tune_stal, args, capsys)
    assert "data.identities_per_batch = 4 with train.num_workers = 4 needs at least 16" in message
    assert written(tmp_path) == [] and not os.path.exists(os.path.join(shards, "validation"))


def test_weights_that_do_not_exist_are_refused_in_the_driver(ray_cluster, shards, tmp_path, capsys):
    gone = tmp_path / "resnet50.pth"
    args = ["--config", MARS_CONFIG, "--data", shards, "--storage-path", str(tmp_path / "runs"),
            "--set", f"model.pretrained={gone}", *SMALL]
    message = refusal(tune_stal, args, capsys)
    assert message == (f"model.pretrained = {gone}: no such file; give the path or URL of a state dict "
                       "saved with torch.save, or model.pretrained=none")
    assert refusal(train_mars, args, capsys) == message


def test_splits_refuse_a_config_without_weights_before_preparing_a_split(ray_cluster, tmp_path):
    config = load_config(REPO / "configs" / "ilidsvid_bninception.yaml", ["model.pretrained=null"])
    data = SplitData("ilidsvid", str(tmp_path / "release"), str(tmp_path / "out" / "data"))
    with pytest.raises(ConfigError, match="model.pretrained is not set for backbone bninception"):
        run_splits(config, data, str(tmp_path / "out"), [0], command="test")
    assert written(tmp_path) == []
