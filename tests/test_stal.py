"""The STAL network end to end: shapes per backbone, gradients to the pose head, overfitting one P×K batch."""

from pathlib import Path

import pytest
import torch

from stal_ray.config import load_config
from stal_ray.model.parts import canonical_joints
from stal_ray.model.stal import STAL
from stal_ray.objective import STALObjective, global_distance, local_distance


def shapes_seen(model: STAL, clips: torch.Tensor) -> dict[str, tuple]:
    seen = {}

    def record(name, tensor):
        seen[name] = tuple(tensor.shape)  # returns None: the module's output stays as it is

    model.backbone.low.register_forward_hook(lambda m, i, o: record("low", o))
    model.part_networks.register_forward_hook(lambda m, i, o: record("parts", i[0]))
    with torch.no_grad():
        seen["out"] = model(clips)
    return seen


@pytest.mark.parametrize(
    "backbone, size, low, global_dim",
    [
        ("bninception", (224, 224), (576, 14, 14), 1024),
        ("resnet50", (256, 128), (1024, 16, 8), 2048),
        ("tiny", (64, 32), (64, 16, 8), 128),
    ],
)
def test_output_shapes_at_the_paper_input_size(backbone, size, low, global_dim):
    b, t, classes = 1, 2, 5
    model = STAL(backbone, num_classes=classes, seq_len=t, image_size=size, feature_dim=1024).eval()
    seen = shapes_seen(model, torch.randn(b, t, 3, *size))
    out = seen["out"]
    assert seen["low"] == (b * t, *low)
    assert seen["parts"] == (b * t, 6, low[0], 8, 8)
    assert out.g.shape == (b, global_dim)
    assert out.f.shape == (b, t, 6, 1024)
    assert out.a.shape == (b, t, 6)
    assert out.joints.shape == (b, t, 14, 3) and out.part_boxes.shape == (b, t, 6, 4)
    assert out.global_logits.shape == (b, classes) and out.part_logits.shape == (b, t, 6, classes)


def tiny_model(pose_source="learned", **kwargs) -> STAL:
    torch.manual_seed(0)
    return STAL("tiny", seq_len=2, image_size=(64, 32), feature_dim=64, pose_source=pose_source, **kwargs)


def test_reid_loss_refines_the_learned_pose_head():
    model = tiny_model(num_classes=3)
    out = model(torch.randn(4, 2, 3, 64, 32))
    objective = STALObjective()
    objective(out, torch.tensor([0, 0, 1, 1])).total.backward()
    grad = model.pose.head.heatmaps[-1].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_given_keypoints_place_the_part_boxes():
    model = tiny_model("keypoints")
    keypoints = torch.zeros(1, 2, 14, 3)
    keypoints[..., 0], keypoints[..., 1], keypoints[..., 2] = 16.0, 32.0, 1.0
    keypoints[0, 1, :, :2] = torch.tensor([1.0, 2.0])
    with torch.no_grad():
        boxes = model(torch.randn(1, 2, 3, 64, 32), keypoints).part_boxes
    centres = (boxes[..., :2] + boxes[..., 2:]) / 2
    assert torch.allclose(centres[0, 0], torch.tensor([16.0, 32.0]).expand(6, 2))
    assert (boxes[0, 1, :, :2] == 0).all()  # pushed inside the crop at its corner


def test_wrong_clip_shape_names_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(B, 2, 3, 64, 32\)"):
        tiny_model()(torch.randn(1, 3, 3, 64, 32))


def test_without_classes_there_are_no_logits():
    out = tiny_model()(torch.randn(2, 2, 3, 64, 32))
    assert out.global_logits is None and out.part_logits is None


def test_overfitting_one_pk_batch_zeroes_the_triplets_and_fits_the_identities():
    p, k = 4, 2
    generator = torch.Generator().manual_seed(0)
    looks = torch.randn(p, 1, 3, 64, 32, generator=generator)  # one appearance per identity
    clips = looks.repeat_interleave(k, 0) + 0.3 * torch.randn(p * k, 2, 3, 64, 32, generator=generator)
    labels = torch.arange(p).repeat_interleave(k)
    model = tiny_model(num_classes=p)
    objective = STALObjective(margin_global=1.2, margin_local=0.8, local_weight=0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(150):
        terms = objective(model(clips), labels)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        if terms.triplet_global == 0 and terms.triplet_local == 0 and terms.consistency < 0.05:
            break
    with torch.no_grad():
        out = model(clips)
        terms = objective(out, labels)
    assert terms.triplet_global.item() == 0 and terms.triplet_local.item() == 0
    assert torch.equal(out.global_logits.argmax(1), labels)
    assert torch.equal(out.part_logits.argmax(-1), labels[:, None, None].expand(-1, 2, 6))
    # the margins hold in the distances the terms were computed from
    same = labels[:, None] == labels[None, :]
    d_g, d_l = global_distance(out.g, out.g), local_distance(out.f, out.a, out.f, out.a)
    assert (d_g[same].view(p * k, -1).amax(1) + 1.2 <= d_g.masked_fill(same, 1e9).amin(1)).all()
    assert (d_l[same].view(p * k, -1).amax(1) + 0.8 <= d_l.masked_fill(same, 1e9).amin(1)).all()


def test_pretrained_weights_reach_the_backbone_and_every_part_network(tmp_path):
    source = tiny_model()
    torch.save(source.backbone.state_dict(), tmp_path / "imagenet.pth")
    model = tiny_model()
    report = model.load_pretrained(str(tmp_path / "imagenet.pth"))
    assert report.missing == [] and report.loaded > 0
    assert torch.equal(model.backbone.conv3.conv.weight, source.backbone.conv3.conv.weight)
    grouped = model.part_networks.blocks[0].conv.weight.view(6, *source.backbone.conv3.conv.weight.shape)
    assert all(torch.equal(part, source.backbone.conv3.conv.weight) for part in grouped)


def test_pretrained_file_of_another_backbone_is_rejected(tmp_path):
    torch.save(STAL("resnet50", seq_len=2, image_size=(64, 32)).backbone.state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match="does not fit backbone TinyCNN"):
        tiny_model().load_pretrained(str(tmp_path / "r50.pth"))


def test_the_default_configuration_builds_a_working_model():
    config = load_config(Path(__file__).parents[1] / "configs" / "synthetic_tiny.yaml")
    model = STAL.from_config(config, num_classes=3)
    t, h, w = config.data.seq_len, config.data.height, config.data.width
    out = model(torch.randn(2, t, 3, h, w), canonical_joints((h, w)).expand(2, t, -1, -1))
    assert out.f.shape == (2, t, 6, config.model.feature_dim) and out.global_logits.shape == (2, 3)


def branch_gradients(branches: str) -> dict[str, bool]:
    """Which parts of the network a P×K batch's loss reaches when only `branches` train."""
    torch.manual_seed(0)
    model = tiny_model(num_classes=4)
    clips, labels = torch.randn(8, 2, 3, 64, 32), torch.arange(4).repeat_interleave(2)
    terms = STALObjective(branches=branches)(model(clips), labels)
    terms.total.backward()

    def reached(module) -> bool:
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert terms.total.item() > 0
    return {"global": reached(model.global_classifier) and reached(model.ran),
            "local": reached(model.part_classifiers) and reached(model.part_networks),
            "stan": reached(model.stan)}


@pytest.mark.parametrize("branches, expected", [
    ("both", {"global": True, "local": True, "stan": True}),
    ("global", {"global": True, "local": False, "stan": False}),
    ("local", {"global": False, "local": True, "stan": True}),
])
def test_a_branch_trained_alone_is_the_only_one_that_learns(branches, expected):
    assert branch_gradients(branches) == expected


def test_the_terms_of_the_untrained_branch_are_still_reported():
    torch.manual_seed(0)
    model = tiny_model(num_classes=4)
    out, labels = model(torch.randn(8, 2, 3, 64, 32)), torch.arange(4).repeat_interleave(2)
    both = STALObjective(branches="both")(out, labels)
    alone = STALObjective(branches="global")(out, labels)
    assert torch.allclose(alone.total, both.triplet_global + both.softmax)
    assert alone.triplet_local == both.triplet_local and alone.consistency == both.consistency
    with pytest.raises(ValueError, match="train.branches"):
        STALObjective(branches="parts")


def test_without_residual_attention_the_global_branch_reads_the_low_level_map():
    torch.manual_seed(0)
    model = STAL(backbone="tiny", num_classes=4, seq_len=2, image_size=(64, 32), feature_dim=32,
                 pose_source="prior", residual_attention=False)
    assert isinstance(model.ran, torch.nn.Identity)
    clips = torch.randn(3, 2, 3, 64, 32)
    out = model(clips)
    low = model.backbone.low(clips.flatten(0, 1))
    assert torch.allclose(out.g_frames.flatten(0, 1), model.backbone.high(low))


def test_bnneck_normalises_only_what_the_classifiers_read(tmp_path):
    from stal_ray.model.export import load_model, save_model
    from stal_ray.train.optimizer import build_optimizer

    torch.manual_seed(0)
    kwargs = dict(backbone="tiny", num_classes=4, seq_len=2, image_size=(64, 32), feature_dim=8,
                  pose_source="prior")
    model, plain = STAL(**kwargs, bnneck=True), STAL(**kwargs)
    plain.load_state_dict(model.state_dict(), strict=False)  # the same weights, without the necks
    clips = torch.randn(6, 2, 3, 64, 32)
    out, reference = model(clips), plain(clips)
    # triplets and test distances see the features before the neck: the same as without it
    assert torch.equal(out.g, reference.g) and torch.equal(out.f, reference.f)
    # the classifiers see them batch-normalised (batch statistics in training), with no shift
    g = out.g.detach()
    normalised = (g - g.mean(0)) / torch.sqrt(g.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out.global_logits, model.global_classifier(normalised))
    f = out.f.detach().flatten(0, 1)  # (B·T, R, D): each part's channels normalised over B·T frames
    normalised = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(out.part_logits, model.part_classifiers(normalised).view(6, 2, 6, 4))
    assert not torch.allclose(out.global_logits, reference.global_logits)
    # the frozen shift is left out of the optimiser and stays 0
    config = load_config(None, ["model.bnneck=true"])
    optimizer, _ = build_optimizer(model, config)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(model.global_neck.bias) not in optimised and id(model.global_neck.weight) in optimised
    # from the config, through a model file and back
    config = load_config(None, ["model.bnneck=true", "model.backbone=tiny", "model.pose_source=prior",
                                "model.feature_dim=8", "data.seq_len=2", "data.height=64", "data.width=32"])
    built = STAL.from_config(config, 4)
    assert built.global_neck is not None and built.part_neck.num_features == 6 * 8
    save_model(str(tmp_path / "model.pt"), built, config, num_classes=4)
    loaded, loaded_config, _ = load_model(str(tmp_path / "model.pt"))
    assert loaded_config.model.bnneck and loaded.global_neck is not None


def test_without_bnneck_there_is_no_neck():
    model = STAL(backbone="tiny", num_classes=4, seq_len=2, image_size=(64, 32), feature_dim=8,
                 pose_source="prior")
    assert model.global_neck is None and model.part_neck is None
    assert not any("neck" in key for key in model.state_dict())  # model files of before still load


def _global_branch_order(model: STAL) -> list[str]:
    """The order the global branch's stages and RAN run in, from forward hooks."""
    order = []
    watched = {"ran": model.ran, **{name: model.backbone.get_submodule(name)
                                     for name in ("inception4b", "inception4c", "inception4d")}}
    handles = [module.register_forward_hook(lambda *_, name=name: order.append(name))
               for name, module in watched.items()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 2, 3, 128, 64))
    for handle in handles:
        handle.remove()
    # the part branch runs its own 4c/4d copies; these are the global branch's
    return order


@pytest.mark.parametrize("ran_after, expected", [
    ("4b", ["inception4b", "ran", "inception4c", "inception4d"]),
    ("4c", ["inception4b", "inception4c", "ran", "inception4d"]),  # Table I: 4c, ran, 4d
])
def test_ran_sits_where_model_ran_after_says(ran_after, expected):
    model = STAL("bninception", num_classes=3, seq_len=2, image_size=(128, 64), feature_dim=16,
                 pose_source="learned", ran_after=ran_after)
    assert _global_branch_order(model) == expected


def test_ran_after_4c_is_refused_where_the_backbone_has_no_4c():
    with pytest.raises(ValueError, match="ran_after = '4c' is for model.backbone = 'bninception'"):
        load_config(None, ["model.ran_after=4c"])  # the default backbone: tiny
    with pytest.raises(ValueError, match="model.ran_after = '4x' is invalid"):
        load_config(None, ["model.ran_after=4x"])
