"""The models the study trains: STAL and the variants its ablations compare (§IV-C2), each one Ray Train +
DeepSpeed run of the same configuration with a few settings changed."""

import time
from dataclasses import dataclass

from stal_ray.config import Config, with_overrides
from stal_ray.core import storage
from stal_ray.data.prepared.handle import PreparedData

# Fig. 11's lengths (the paper goes to 128 on iLIDS-VID; None = every frame of the tracklet); here, beside the
# variants, so that jobs/study.py's --help names both without importing the training stack
SEQUENCE_LENGTHS = (1, 2, 4, 8, 16, None)


@dataclass(frozen=True)
class Variant:
    name: str  # run name suffix and key in the report
    description: str
    overrides: tuple[str, ...]  # section.key=value on top of the study's configuration


VARIANTS = (
    Variant("stal", "STAL, every branch trained jointly", ()),
    Variant("global_alone", "global branch trained alone", ("train.branches=global",)),
    Variant("local_alone", "local branch trained alone", ("train.branches=local",)),
    Variant("no_ran", "STAL without the residual attention branch", ("model.residual_attention=false",)),
    Variant("stan_no_bn", "STAL, STAN without BatchNorm", ("model.stan_batchnorm=false",)),
    Variant("stan_clip_fc", "STAL, STAN's FC over the whole clip (the first STAN; docs/attention.md)",
            ("model.stan_fc=clip",)),
)


@dataclass
class TrainedVariant:
    variant: Variant
    model_path: str
    seconds: float  # wall time of its training run (short when an earlier study had finished it)


def train_variants(config: Config, data: PreparedData, out: str, *,
                   variants: tuple[Variant, ...] = VARIANTS,
                   allow_changed_config: bool = False) -> dict[str, TrainedVariant]:
    """Train every variant into <out>/runs/<name>; a run already there resumes (and a finished one only
    writes its model again), so an interrupted study picks up where it stopped."""
    from stal_ray.train.trainer import train  # Ray Train and DeepSpeed: only where a variant trains

    runs = storage.join(out, "runs")
    trained = {}
    for variant in variants:
        variant_config = with_overrides(config, (*variant.overrides, f"train.storage_path={runs}"),
                                        source=f"study variant {variant.name}")
        print(f"study: training {variant.name} ({variant.description})", flush=True)
        start = time.perf_counter()
        result = train(variant_config, data, name=variant.name, allow_changed_config=allow_changed_config)
        trained[variant.name] = TrainedVariant(variant, result.model_path, time.perf_counter() - start)
    return trained
