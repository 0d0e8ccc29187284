"""The README's "Using a trained model" example runs as written against a model file."""

import re
from pathlib import Path

import pytest
import torch

from stal_ray.config import load_config
from stal_ray.model.export import save_model
from stal_ray.model.stal import STAL

README = Path(__file__).resolve().parent.parent / "README.md"


def python_block(containing: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    blocks = [block for block in blocks if containing in block]
    assert len(blocks) == 1, f"README.md has {len(blocks)} python blocks with {containing!r}"
    return blocks[0]


@pytest.mark.parametrize("pose_source", ["learned", "keypoints"])  # keypoints: the synthetic configs'
def test_load_and_embed_example_runs(tmp_path, monkeypatch, pose_source):
    config = load_config(None, ["model.backbone=tiny", "model.feature_dim=16", "data.seq_len=2",
                                "data.height=32", "data.width=16", f"model.pose_source={pose_source}"])
    model = STAL.from_config(config, num_classes=3)
    # where `make train ARGS="--name stal"` puts it: ~/ray_results/stal/model.pt, the example's path
    save_model(str(tmp_path / "ray_results" / "stal" / "model.pt"), model, config, num_classes=3,
               labels=[2, 5, 9])
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_block("load_model("), "README.md", "exec"), namespace)
    distance, ranking = namespace["distance"], namespace["ranking"]
    n_query, n_gallery = len(namespace["query_frames"]), len(namespace["gallery_frames"])
    assert distance.shape == (n_query, n_gallery) and torch.isfinite(distance).all() and (distance >= 0).all()
    assert torch.equal(ranking[:, 0], distance.argmin(dim=1))
