"""Pretrained weights are an explicit choice for the large backbones, load over HTTP(S) through fsspec, and a
URL with a sha256 is downloaded once per node into torch hub's cache and checked."""

import functools
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from stal_ray.config import Config, ConfigError, load_config
from stal_ray.model.backbones import IMAGENET_WEIGHTS, build_backbone, check_weights_choice
from stal_ray.model.stal import STAL
from stal_ray.model.weights import WeightsError, cache_path, local_weights, split_hash
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


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name, backbone", [("mars_resnet50.yaml", "resnet50"),
                                            ("mars_bninception.yaml", "bninception"),
                                            ("ilidsvid_bninception.yaml", "bninception")])
def test_the_configs_that_need_imagenet_weights_name_them_with_a_hash(name, backbone):
    config = load_config(CONFIGS / name)
    assert config.model.pretrained == IMAGENET_WEIGHTS[backbone]
    check_weights_choice(config.model.backbone, config.model.pretrained)  # the README commands run
    _, expected = split_hash(config.model.pretrained)
    assert expected and expected in config.model.pretrained  # torch hub's hash prefix in the name


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A folder served over HTTP on 127.0.0.1 that counts the GET requests, and an empty torch hub cache."""
    folder, requests = tmp_path / "served", []
    folder.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=folder))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}", requests, server
    server.shutdown()
    server.server_close()


def tiny_weights(folder, stem: str, digest_length: int | None = 8) -> tuple[dict, str, str]:
    """Tiny backbone weights saved as <stem>-<sha256 prefix>.pth (torch hub's naming)."""
    weights = {key: value + 1 if value.is_floating_point() else value
               for key, value in build_backbone("tiny").state_dict().items()}
    torch.save(weights, folder / "tmp.pth")
    digest = hashlib.sha256((folder / "tmp.pth").read_bytes()).hexdigest()
    name = f"{stem}-{digest[:digest_length]}.pth" if digest_length else f"{stem}.pth"
    (folder / "tmp.pth").rename(folder / name)
    return weights, name, digest


def tiny_model(pretrained: str) -> STAL:
    config = mars_config("tiny", pretrained)
    config.data.seq_len, config.data.height, config.data.width = 2, 64, 32
    return STAL.from_config(config, num_classes=2)


def test_a_hashed_url_is_downloaded_once_per_node_into_torch_hubs_cache(weights_server):
    folder, url, requests, server = weights_server
    weights, name, _ = tiny_weights(folder, "tiny")
    loaders = [threading.Thread(target=tiny_model, args=(f"{url}/{name}",)) for _ in range(3)]
    for loader in loaders:  # three workers of one node at once: one download
        loader.start()
    for loader in loaders:
        loader.join()
    assert requests == [f"/{name}"]
    cached = Path(cache_path(f"{url}/{name}"))
    assert cached == Path(torch.hub.get_dir()) / "checkpoints" / name and cached.exists()
    server.shutdown()  # the cached copy serves every later load
    model = tiny_model(f"{url}/{name}")
    assert all(torch.equal(model.backbone.state_dict()[key], value) for key, value in weights.items())
    assert not list(cached.parent.glob(".tmp-*"))  # no temporary file of storage.open_atomic left


def test_a_file_whose_sha256_does_not_match_its_name_is_refused_and_not_cached(weights_server):
    folder, url, _, _ = weights_server
    _, name, digest = tiny_weights(folder, "tiny")
    (folder / name).rename(folder / "tiny-0badc0de.pth")
    with pytest.raises(WeightsError, match=f"tiny-0badc0de.pth: the file's sha256 is {digest}, not 0badc0de"):
        tiny_model(f"{url}/tiny-0badc0de.pth")
    assert not list((Path(torch.hub.get_dir()) / "checkpoints").glob("tiny*.pth"))


def test_a_sha256_fragment_is_checked_and_a_corrupt_cached_copy_is_fetched_again(weights_server):
    folder, url, requests, _ = weights_server
    weights, name, digest = tiny_weights(folder, "plain", digest_length=None)
    with pytest.raises(WeightsError, match="not " + "0" * 64):
        tiny_model(f"{url}/{name}#sha256={'0' * 64}")
    tiny_model(f"{url}/{name}#sha256={digest}")
    cached = Path(cache_path(f"{url}/{name}"))
    cached.write_bytes(b"cut short")
    model = tiny_model(f"{url}/{name}#sha256={digest}")
    assert len(requests) == 3 and hashlib.sha256(cached.read_bytes()).hexdigest() == digest
    assert all(torch.equal(model.backbone.state_dict()[key], value) for key, value in weights.items())


def test_a_url_without_a_hash_is_read_every_time_and_never_cached(weights_server):
    folder, url, requests, _ = weights_server
    _, name, _ = tiny_weights(folder, "plain", digest_length=None)
    tiny_model(f"{url}/{name}")
    tiny_model(f"{url}/{name}")
    assert len(requests) == 2 and not Path(cache_path(f"{url}/{name}")).exists()


def test_a_malformed_fragment_names_the_fix():
    with pytest.raises(WeightsError, match="#md5=abc is not #sha256= followed by 64 hex digits"):
        split_hash("https://example.com/w.pth#md5=abc")


def test_a_file_larger_than_a_block_downloads_from_a_server_without_byte_ranges(http_folder, monkeypatch):
    """Python's http.server answers no Range requests: the download must stream, not seek in blocks."""
    folder, url = http_folder
    monkeypatch.setenv("TORCH_HOME", str(folder / "torch_home"))
    data = os.urandom(12 << 20)  # beyond fsspec's 5 MiB block
    digest = hashlib.sha256(data).hexdigest()
    (folder / f"big-{digest[:8]}.pth").write_bytes(data)
    path = local_weights(f"{url}/big-{digest[:8]}.pth")
    assert open(path, "rb").read() == data
