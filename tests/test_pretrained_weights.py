"""Pretrained weights are an explicit choice for the large backbones, and load over HTTP(S) through fsspec."""

import functools
import http.server
import threading

import pytest
import torch

from stal_ray.config import Config, ConfigError
from stal_ray.model.backbones import build_backbone
from stal_ray.model.stal import STAL
from stal_ray.train.trainer import check_resources


def mars_config(backbone: str, pretrained: str | None) -> Config:
    config = Config()
    config.model.backbone, config.model.pretrained = backbone, pretrained
    return config


@pytest.mark.parametrize("backbone, source", [("resnet50", "download.pytorch.org"),
                                              ("bninception", "bn_inception-52deb4733.pth")])
def test_a_large_backbone_without_weights_is_refused_before_training(backbone, source):
    with pytest.raises(ConfigError) as error:
        check_resources(mars_config(backbone, None))
    message = str(error.value)
    assert "model.pretrained" in message and source in message and "model.pretrained=none" in message


def test_none_is_the_explicit_choice_of_random_weights_and_tiny_needs_none():
    check_resources(mars_config("resnet50", "none"))
    check_resources(mars_config("tiny", None))
    config = mars_config("tiny", "none")
    config.data.seq_len, config.data.height, config.data.width = 2, 64, 32
    STAL.from_config(config, num_classes=2)  # "none" is not read as a path


@pytest.fixture
def http_folder(tmp_path):
    """tmp_path served over HTTP on 127.0.0.1 (the https:// path goes through the same fsspec code)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_weights_load_from_an_http_url(http_folder):
    folder, url = http_folder
    weights = build_backbone("tiny").state_dict()
    weights = {key: value + 1 if value.is_floating_point() else value for key, value in weights.items()}
    torch.save(weights, folder / "tiny.pth")
    config = mars_config("tiny", f"{url}/tiny.pth")
    config.data.seq_len, config.data.height, config.data.width = 2, 64, 32
    model = STAL.from_config(config, num_classes=2)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in weights.items())


def test_a_missing_url_names_it(http_folder):
    _, url = http_folder
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        STAL("tiny", seq_len=2, image_size=(64, 32)).load_pretrained(f"{url}/missing.pth")
