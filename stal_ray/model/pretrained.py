"""Pretrained weights into a model: a state dict read from a path or URL (a hashed URL from this node's
checked copy, model/weights.py), its keys mapped to ours (Cadene's flat BN-Inception names, wrappers,
`module.`), ImageNet classifiers ignored, and a report of what matched."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass, field

import fsspec
import torch
from torch import nn

from stal_ray.model.weights import local_weights

log = logging.getLogger(__name__)

# ImageNet heads that no backbone has: torchvision's `fc`, Cadene's `last_linear`, timm-style `classifier`
CLASSIFIER_KEY = re.compile(r"^(fc|last_linear|classifier)\.")
# Cadene's flat BN-Inception names -> ours: conv2_3x3_reduce_bn.weight -> conv2_reduce.bn.weight,
# inception_3a_double_3x3_1.bias -> inception3a.branch3x3dbl_1.conv.bias
CADENE_KEY = re.compile(
    r"^(?P<layer>conv1_7x7_s2|conv2_3x3_reduce|conv2_3x3|inception_(?P<block>\d[a-e])_"
    r"(?P<branch>1x1|3x3_reduce|3x3|double_3x3_reduce|double_3x3_1|double_3x3_2|pool_proj))"
    r"(?P<bn>_bn)?\.(?P<param>\w+)$"
)
CADENE_STEM = {"conv1_7x7_s2": "conv1", "conv2_3x3_reduce": "conv2_reduce", "conv2_3x3": "conv2"}
CADENE_BRANCH = {"1x1": "branch1x1", "3x3_reduce": "branch3x3_reduce", "3x3": "branch3x3",
                 "double_3x3_reduce": "branch3x3dbl_reduce", "double_3x3_1": "branch3x3dbl_1",
                 "double_3x3_2": "branch3x3dbl_2", "pool_proj": "branch_pool"}


def _from_cadene(key: str) -> str:
    m = CADENE_KEY.match(key)
    if m is None:
        return key  # last_linear.*, or something we do not know: left for the report
    layer = CADENE_STEM.get(m["layer"]) or f"inception{m['block']}.{CADENE_BRANCH[m['branch']]}"
    return f"{layer}.{'bn' if m['bn'] else 'conv'}.{m['param']}"


@dataclass
class LoadReport:
    missing: list[str]
    unexpected: list[str]
    loaded: int
    source: str = ""
    ignored: list[str] = field(init=False)  # the unexpected keys that are an ImageNet classifier

    def __post_init__(self):
        self.ignored = [k for k in self.unexpected if CLASSIFIER_KEY.match(k)]

    @property
    def ok(self) -> bool:
        return not self.missing and len(self.ignored) == len(self.unexpected)

    def __str__(self) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")

        other = [k for k in self.unexpected if k not in self.ignored]
        lines = [f"loaded {self.loaded} tensors from {self.source}"]
        lines.append(f"missing {len(self.missing)}" + (f": {names(self.missing)}" if self.missing else ""))
        if other:
            lines.append(f"unexpected {len(other)}: {names(other)}")
        if self.ignored:
            lines.append(f"ignored classifier keys: {names(self.ignored)}")
        return "; ".join(lines)


def _read_state_dict(path_or_url: str) -> dict[str, torch.Tensor]:
    try:
        # a URL with a sha256 is read from this node's checked copy (model/weights.py)
        with fsspec.open(local_weights(path_or_url), "rb") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"pretrained weights not found: {path_or_url} (expected a torch state dict "
                                f"saved with torch.save)") from err
    except OSError as err:  # an unreachable host, an HTTP error status
        raise FileNotFoundError(f"cannot read pretrained weights {path_or_url}: {err}") from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors have no common type
        raise ValueError(f"cannot read {path_or_url} as a state dict saved with torch.save: {err}") from err
    for wrapper in ("state_dict", "model", "module"):  # trainer checkpoints, DeepSpeed's model states
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path_or_url} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_pretrained(model: nn.Module, path_or_url: str, *, prefix: str = "") -> LoadReport:
    """Load a state dict from a path or fsspec URL into `model` (keys under `prefix`), report what matched.

    Accepts `{"state_dict": ...}` / `{"model": ...}` wrappers and `module.` prefixes, converts Cadene's
    BN-Inception names, ignores ImageNet classifiers. `missing` counts only `model` keys under `prefix`: the
    file describes that submodule, not the rest. Shape mismatches raise.
    """
    state = {k.removeprefix("module."): v for k, v in _read_state_dict(path_or_url).items()}
    if any(k.startswith("conv1_7x7_s2") for k in state):
        state = {_from_cadene(k): v for k, v in state.items()}
    # a fresh dict has no _metadata, so BatchNorm fills in a num_batches_tracked the file lacks
    state = {prefix + k: v for k, v in state.items()}

    own = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"shape mismatch loading {path_or_url}: " + "; ".join(wrong))
    result = model.load_state_dict(state, strict=False)
    report = LoadReport(
        missing=[k for k in result.missing_keys if k.startswith(prefix)],
        unexpected=[k.removeprefix(prefix) for k in result.unexpected_keys],
        loaded=sum(k in own for k in state),
        source=path_or_url,
    )
    (log.info if report.ok else log.warning)("load_pretrained: %s", report)
    return report
