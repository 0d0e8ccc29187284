"""The model file (stal_ray.model.export): round trip, file:// URLs, refusal of files that are not ours."""

import pytest
import torch

from stal_ray.config import load_config
from stal_ray.model.export import load_model, load_model_config, save_model
from stal_ray.model.stal import STAL

OVERRIDES = ["model.backbone=tiny", "model.feature_dim=16", "model.pose_source=learned", "data.seq_len=2",
             "data.height=32", "data.width=16"]


@pytest.fixture(scope="module")
def trained():
    config = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    model = STAL.from_config(config, num_classes=3)
    # BatchNorm running statistics are part of the file: move them off their initial values
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 2, 3, 32, 16))
    return model.eval(), config


def assert_same_outputs(a: STAL, b: STAL) -> None:
    torch.manual_seed(1)
    clips = torch.randn(2, 2, 3, 32, 16)
    with torch.no_grad():
        x, y = a(clips), b(clips)
    for name in ("g", "f", "a", "scores", "global_logits", "part_logits"):
        torch.testing.assert_close(getattr(y, name), getattr(x, name), rtol=0, atol=0, msg=name)


def test_round_trip_gives_the_same_outputs_config_and_meta(trained, tmp_path):
    model, config = trained
    path = tmp_path / "run" / "model.pt"  # the folder is created
    save_model(str(path), model, config, num_classes=3, labels=[5, 7, 9], extra={"iteration": 12})
    loaded, loaded_config, meta = load_model(str(path))
    assert not loaded.training
    assert loaded_config.to_dict() == config.to_dict()
    assert meta == {"num_classes": 3, "labels": [5, 7, 9], "extra": {"iteration": 12}, "version": 1}
    assert_same_outputs(model, loaded)
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left


def test_file_url_works_and_pretrained_weights_are_not_reloaded(trained, tmp_path):
    model, config = trained
    config = load_config(None, OVERRIDES + [f"model.pretrained={tmp_path / 'gone.pth'}"])
    url = f"file://{tmp_path / 'model.pt'}"
    save_model(url, model, config, num_classes=3)
    loaded, loaded_config, meta = load_model(url)  # the ImageNet file no longer exists: it is not read
    assert loaded_config.model.pretrained is None and meta["labels"] == []
    assert_same_outputs(model, loaded)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found: .*nothing.pt"):
        load_model(str(tmp_path / "nothing.pt"))


def test_a_file_that_is_not_a_stal_model_is_refused(tmp_path):
    plain = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match=r"state_dict.pt is not a stal_ray model file .*found \['weight'\]"):
        load_model(str(plain))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.pt is not a stal_ray model file"):
        load_model(str(text))


def test_config_and_meta_are_read_without_building_the_model(trained, tmp_path):
    model, config = trained
    path = str(tmp_path / "model.pt")
    save_model(path, model, config, num_classes=3, labels=[1, 2, 3])
    loaded_config, meta = load_model_config(path)
    assert loaded_config.data.seq_len == 2 and meta["num_classes"] == 3 and meta["labels"] == [1, 2, 3]


def test_a_file_written_before_model_stan_fc_existed_loads_with_the_clip_fc(tmp_path):
    config = load_config(None, OVERRIDES + ["model.stan_fc=clip"])
    model = STAL.from_config(config, num_classes=3).eval()
    path = tmp_path / "model.pt"
    save_model(str(path), model, config, num_classes=3, labels=[1, 2, 3])
    payload = torch.load(path, weights_only=True)
    del payload["config"]["model"]["stan_fc"]  # as the files of earlier versions
    torch.save(payload, path)
    loaded, loaded_config, _ = load_model(str(path))
    assert loaded_config.model.stan_fc == "clip"
    assert_same_outputs(model, loaded)
