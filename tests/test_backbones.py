"""Tests for stal_ray/model/backbones.py, blocks.py and pretrained.py: shapes, batched part networks vs
per-part references, loading."""

import copy
import logging
import pickle
import re
from pathlib import Path

import fsspec
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stal_ray.model.backbones import BACKBONES, build_backbone
from stal_ray.model.pretrained import load_pretrained

DATA = Path(__file__).parent / "data"
PAPER_INPUT = {"bninception": (224, 224), "resnet50": (256, 128), "tiny": (64, 32)}
LOW_SHAPE = {"bninception": (576, 14, 14), "resnet50": (1024, 16, 8), "tiny": (64, 16, 8)}
GLOBAL_DIM = {"bninception": 1024, "resnet50": 2048, "tiny": 128}
PARTS, FEATURE_DIM, PART_SIZE = 6, 16, 8


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {name: build_backbone(name).eval() for name in BACKBONES}


# --- shapes


@pytest.mark.parametrize("name", BACKBONES)
def test_low_and_global_shapes_at_paper_input_size(backbones, name):
    backbone = backbones[name]
    x = torch.randn(1, 3, *PAPER_INPUT[name])
    with torch.no_grad():
        low = backbone.low(x)
        g = backbone.high(low)
        whole = backbone(x)
    assert low.shape == (1, *LOW_SHAPE[name]) and backbone.low_channels == LOW_SHAPE[name][0]
    assert g.shape == (1, GLOBAL_DIM[name]) and backbone.global_dim == GLOBAL_DIM[name]
    torch.testing.assert_close(whole, g)


@pytest.mark.parametrize("name", BACKBONES)
def test_part_networks_map_part_maps_to_part_features(backbones, name):
    backbone = backbones[name]
    parts = backbone.part_networks(PARTS, FEATURE_DIM)
    x = torch.randn(2, PARTS, backbone.low_channels, PART_SIZE, PART_SIZE)
    with torch.no_grad():
        assert parts(x).shape == (2, PARTS, FEATURE_DIM)


@pytest.mark.parametrize("name", BACKBONES)
def test_low_and_high_cover_every_parameter_without_duplicate_keys(backbones, name):
    backbone = backbones[name]
    keys = backbone.state_dict().keys()
    assert not [k for k in keys if k.startswith(("low.", "high.", "_stages"))]
    staged = {id(p) for stage in (backbone.low, backbone.high) for p in stage.parameters()}
    assert staged == {id(p) for p in backbone.parameters()}


def test_low_and_high_follow_the_backbone_through_copies_and_dtype_moves():
    original = build_backbone("tiny").eval()
    for backbone in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        with torch.no_grad():
            backbone.conv1.conv.weight.zero_()
        assert backbone.low[0] is backbone.conv1 and original.low[0] is original.conv1
        assert not torch.equal(backbone.low(torch.ones(1, 3, 64, 32)), original.low(torch.ones(1, 3, 64, 32)))
    original.to(torch.float64)
    assert original.high(original.low(torch.ones(1, 3, 64, 32, dtype=torch.float64))).dtype == torch.float64


def test_unknown_backbone_raises_listing_allowed_names():
    with pytest.raises(ValueError, match="vgg") as err:
        build_backbone("vgg")
    assert all(name in str(err.value) for name in ("bninception", "resnet50", "tiny"))


# --- part networks equal R independent networks: plain functional references, one part at a time


def conv_bn(x, sd, conv, bn, stride=1, padding=0, relu=True, training=False):
    x = F.conv2d(x, sd[f"{conv}.weight"], sd.get(f"{conv}.bias"), stride, padding)
    stats = (None, None) if training else (sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"])
    x = F.batch_norm(x, *stats, sd[f"{bn}.weight"], sd[f"{bn}.bias"], training=training, eps=1e-5)
    return F.relu(x) if relu else x


def cbr(x, sd, prefix="", stride=1, padding=0, training=False):
    return conv_bn(x, sd, f"{prefix}conv", f"{prefix}bn", stride, padding, training=training)


def inception(x, sd, stride):
    out = [cbr(x, sd, "branch1x1.")] if "branch1x1.conv.weight" in sd else []
    out.append(cbr(cbr(x, sd, "branch3x3_reduce."), sd, "branch3x3.", stride, 1))
    double = cbr(cbr(x, sd, "branch3x3dbl_reduce."), sd, "branch3x3dbl_1.", 1, 1)
    out.append(cbr(double, sd, "branch3x3dbl_2.", stride, 1))
    if stride == 2:
        out.append(F.max_pool2d(x, 3, 2, ceil_mode=True))
    else:
        out.append(cbr(F.avg_pool2d(x, 3, 1, 1, ceil_mode=True), sd, "branch_pool."))
    return torch.cat(out, 1)


def bottleneck(x, sd):  # like layer4[0]: stride 2, projection shortcut
    y = conv_bn(x, sd, "conv1", "bn1")
    y = conv_bn(y, sd, "conv2", "bn2", 2, 1)
    y = conv_bn(y, sd, "conv3", "bn3", relu=False)
    return F.relu(y + conv_bn(x, sd, "downsample.0", "downsample.1", 2, relu=False))


def one_part_network(name, x, block_states, fc_weight, fc_bias):  # (N, C, S, S) -> (N, D)
    if name == "tiny":
        y = cbr(x, block_states[0], stride=2, padding=1)
    elif name == "resnet50":
        y = bottleneck(x, block_states[0])
    else:  # inception 4c, 4d, 4e
        y = inception(inception(inception(x, block_states[0], 1), block_states[1], 1), block_states[2], 2)
    return F.linear(y.mean((2, 3)), fc_weight.T, fc_bias)


def group(state, r, parts=PARTS):  # part r's slice of a grouped block's state dict
    return {k: v.chunk(parts)[r] if v.dim() else v for k, v in state.items()}


@torch.no_grad()
def randomize_(module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.mul_(1 + 0.5 * torch.randn_like(m.weight))
            if m.bias is not None:
                m.bias.normal_(0, 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", BACKBONES)
def test_part_networks_equal_independent_per_part_networks(name):
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    parts = backbone.part_networks(PARTS, FEATURE_DIM).eval()
    for mirrored in parts.mirrors:
        randomize_(backbone.get_submodule(mirrored))
    fc_before = parts.fc.weight.detach().clone()
    parts.init_from_backbone(backbone)
    assert torch.equal(parts.fc.weight, fc_before)  # the part FC stays randomly initialised

    x = torch.randn(2, PARTS, backbone.low_channels, PART_SIZE, PART_SIZE)
    mirrored = [backbone.get_submodule(m).state_dict() for m in parts.mirrors]
    with torch.no_grad():
        # after init_from_backbone every part runs the backbone's own layers
        out = parts(x)
        for r in range(PARTS):
            ref = one_part_network(name, x[:, r], mirrored, parts.fc.weight[r], parts.fc.bias[r])
            torch.testing.assert_close(out[:, r], ref, atol=1e-4, rtol=1e-4)

        # and with different weights in every group, part r still sees only its own group's weights
        randomize_(parts.blocks)
        states = [block.state_dict() for block in parts.blocks]
        first_conv = next(v for k, v in states[0].items() if k.endswith("weight") and v.dim() == 4)
        assert not torch.equal(first_conv.chunk(PARTS)[0], first_conv.chunk(PARTS)[1])
        out = parts(x)
        for r in range(PARTS):
            ref = one_part_network(name, x[:, r], [group(s, r) for s in states], parts.fc.weight[r],
                                   parts.fc.bias[r])
            torch.testing.assert_close(out[:, r], ref, atol=1e-4, rtol=1e-4)


def test_part_batchnorm_in_training_normalises_each_part_alone():
    torch.manual_seed(0)
    parts = build_backbone("tiny").part_networks(PARTS, FEATURE_DIM).train()
    randomize_(parts.blocks)
    x = torch.randn(3, PARTS, 64, PART_SIZE, PART_SIZE) * torch.arange(1, PARTS + 1).view(1, PARTS, 1, 1, 1)
    state = {k: v.clone() for k, v in parts.blocks[0].state_dict().items()}
    with torch.no_grad():
        out = parts(x)
        for r in range(PARTS):
            y = cbr(x[:, r], group(state, r), stride=2, padding=1, training=True).mean((2, 3))
            ref = F.linear(y, parts.fc.weight[r].T, parts.fc.bias[r])
            torch.testing.assert_close(out[:, r], ref, atol=1e-4, rtol=1e-4)


# --- pretrained weights


def reference_keys(file):  # "key dim dim ..." lines -> {key: shape}
    lines = (line.split() for line in (DATA / file).read_text().splitlines() if not line.startswith("#"))
    return {key: tuple(int(d) for d in dims) for key, *dims in lines}


def fake_state_dict(shapes):
    return {k: torch.tensor(7) if not shape else torch.rand(shape) for k, shape in shapes.items()}


def test_resnet50_state_dict_keys_and_shapes_are_torchvisions():
    reference = reference_keys("torchvision_resnet50_keys.txt")
    expected = {k: s for k, s in reference.items() if not k.startswith("fc.")}
    own = build_backbone("resnet50").state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == expected


def test_torchvision_resnet50_file_loads_with_no_missing_keys(tmp_path):
    state = fake_state_dict(reference_keys("torchvision_resnet50_keys.txt"))
    torch.save(state, tmp_path / "resnet50.pth")
    model = build_backbone("resnet50")
    report = load_pretrained(model, str(tmp_path / "resnet50.pth"))
    assert report.missing == [] and report.unexpected == ["fc.weight", "fc.bias"]
    assert report.loaded == len(state) - 2 and "ignored classifier keys" in str(report)
    assert torch.equal(model.layer3[5].bn2.running_var, state["layer3.5.bn2.running_var"])
    assert torch.equal(model.low[0].weight, state["conv1.weight"])


def test_cadene_bninception_file_loads_with_no_missing_keys(tmp_path):
    # no num_batches_tracked, as in the ported ImageNet file
    state = fake_state_dict(reference_keys("cadene_bninception_keys.txt"))
    torch.save(state, tmp_path / "bn_inception.pth")
    model = build_backbone("bninception")
    report = load_pretrained(model, str(tmp_path / "bn_inception.pth"))
    assert report.missing == [] and report.unexpected == ["last_linear.weight", "last_linear.bias"]
    assert report.loaded == len(state) - 2  # every other Cadene key found its own place
    ours = model.state_dict()
    for cadene, own in [("inception_3a_double_3x3_1_bn.weight", "inception3a.branch3x3dbl_1.bn.weight"),
                        ("conv2_3x3_reduce.bias", "conv2_reduce.conv.bias"),
                        ("inception_5b_pool_proj_bn.running_mean", "inception5b.branch_pool.bn.running_mean"),
                        ("conv1_7x7_s2_bn.running_var", "conv1.bn.running_var")]:
        assert torch.equal(ours[own], state[cadene])


def test_load_pretrained_reads_file_and_memory_urls_with_wrappers(tmp_path):
    source = build_backbone("tiny")
    state = {k: torch.rand_like(v, dtype=torch.float) if v.is_floating_point() else v
             for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "tiny.pth")
    with fsspec.open("memory://weights/tiny.pth", "wb") as f:  # a trainer checkpoint of a DataParallel model
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, f)
    for url in (f"file://{tmp_path / 'tiny.pth'}", "memory://weights/tiny.pth"):
        model = build_backbone("tiny")
        report = load_pretrained(model, url)
        assert report.missing == [] and report.unexpected == [] and report.loaded == len(state)
        assert torch.equal(model.conv4.bn.running_mean, state["conv4.bn.running_mean"])


def test_load_pretrained_with_prefix_fills_a_submodule_only(tmp_path):
    torch.save(build_backbone("tiny").state_dict(), tmp_path / "tiny.pth")
    model = nn.ModuleDict({"backbone": build_backbone("tiny"), "head": nn.Linear(128, 4)})
    report = load_pretrained(model, str(tmp_path / "tiny.pth"), prefix="backbone.")
    assert report.missing == [] and report.unexpected == []


def test_missing_keys_are_reported_and_logged_as_warning(tmp_path, caplog):
    state = {k: v for k, v in build_backbone("tiny").state_dict().items() if not k.startswith("conv4.")}
    torch.save(state, tmp_path / "partial.pth")
    with caplog.at_level(logging.INFO, logger="stal_ray.model.backbones"):
        report = load_pretrained(build_backbone("tiny"), str(tmp_path / "partial.pth"))
    assert report.missing and all(k.startswith("conv4.") for k in report.missing)
    assert any(r.levelno == logging.WARNING and "conv4.conv.weight" in r.getMessage() for r in caplog.records)


def test_shape_mismatch_raises_naming_the_key_and_both_shapes(tmp_path):
    state = build_backbone("tiny").state_dict()
    state["conv2.conv.weight"] = torch.zeros(64, 16, 3, 3)
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"conv2\.conv\.weight.*\(64, 16, 3, 3\).*\(64, 32, 3, 3\)"):
        load_pretrained(build_backbone("tiny"), str(tmp_path / "wrong.pth"))


def test_missing_file_raises_naming_the_path(tmp_path):
    path = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        load_pretrained(build_backbone("tiny"), path)


def test_unreadable_file_raises_value_error_naming_the_path(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_pretrained(build_backbone("tiny"), str(path))
