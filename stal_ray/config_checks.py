"""The checks of a whole Config: every setting's type and range (the rule table below, with config_rules.py's
reusable rules), the settings that only make sense together, and the keypoint supervision a run resolves
to."""

from collections.abc import Mapping
from typing import Any

from stal_ray.config_rules import (
    Rule,
    WrongType,
    at_least,
    coerce,
    describe,
    hints,
    increasing,
    int_at_least,
    interval,
    nonempty_list,
    one_of,
    path_or_null,
    positive,
    search_range,
    show,
)
from stal_ray.config_schema import (
    ATTENTION_MODES,
    BACKBONES,
    BRANCHES,
    DECODE_AT,
    KEYPOINT_SUPERVISION,
    LR_SCHEDULES,
    MINING,
    MIXING,
    OPTIMIZERS,
    PART_NORMS,
    POSE_SOURCES,
    PRECISIONS,
    PROTOCOLS,
    RAN_PLACES,
    SCHEDULERS,
    SECTIONS,
    STAN_FCS,
    TRAINED_BRANCHES,
    TUNE_METRICS,
    WEIGHTING,
    ZERO_STAGES,
    Config,
    ConfigError,
    ModelConfig,
)


def resolve_keypoint_supervision(model: ModelConfig, frames_with_keypoints: int) -> tuple[float, str]:
    """model.keypoint_supervision as set, or when unset (null) KEYPOINT_SUPERVISION for the learned pose head
    on training data with keypoints and 0 otherwise; with a line saying which and why."""
    if model.keypoint_supervision is not None:
        weight = model.keypoint_supervision
        return weight, f"model.keypoint_supervision = {weight:g} (set)"
    if model.pose_source == "learned" and frames_with_keypoints:
        return KEYPOINT_SUPERVISION, (
            f"model.keypoint_supervision = {KEYPOINT_SUPERVISION:g}: the learned pose head trains toward the "
            f"data's keypoints ({frames_with_keypoints} training frames have them; set "
            "model.keypoint_supervision=0 for pure ReID refinement)")
    why = "the data has no keypoints" if model.pose_source == "learned" else \
        f"model.pose_source = {model.pose_source} has no pose head to supervise"
    return 0.0, f"model.keypoint_supervision = 0: {why}"


# ---------------------------------------------------------------------------------------------- validation

_RULES: dict[str, Rule] = {
    "model.backbone": one_of(BACKBONES),
    "model.ran_after": one_of(RAN_PLACES),
    "model.pretrained": path_or_null,
    "model.feature_dim": int_at_least(1),
    "model.pose_source": one_of(POSE_SOURCES),
    "model.keypoint_supervision": lambda v: None if v is None else at_least(0)(v),
    "model.part_size": int_at_least(1),
    "model.attention": one_of(ATTENTION_MODES),
    "model.stan_batchnorm": lambda v: None,
    "model.stan_fc": one_of(STAN_FCS),
    "model.residual_attention": lambda v: None,
    "model.part_norm": one_of(PART_NORMS),
    "model.bnneck": lambda v: None,
    "data.root": path_or_null,
    "data.seq_len": int_at_least(1),
    "data.height": int_at_least(16),
    "data.width": int_at_least(16),
    "data.identities_per_batch": int_at_least(1),
    "data.clips_per_identity": int_at_least(2),
    "data.max_groups_per_identity": lambda v: None if v is None else int_at_least(1)(v),
    "data.mixing": one_of(MIXING),
    "data.weighting": one_of(WEIGHTING),
    "data.seed": lambda v: None if v is None else int_at_least(0)(v),
    "data.decode_concurrency": lambda v: None if v is None else int_at_least(1)(v),
    "data.decode_at": one_of(DECODE_AT),
    "data.val_identities": interval(0, 1, closed_low=True, closed_high=False),
    "data.flip": lambda v: None,
    "data.crop_padding": int_at_least(0),
    "data.color_jitter": interval(0, 1, closed_low=True, closed_high=False),
    "data.random_erasing": interval(0, 1, closed_low=True, closed_high=True),
    "train.lr": positive,
    "train.optimizer": one_of(OPTIMIZERS),
    "train.lr_schedule": one_of(LR_SCHEDULES),
    "train.warmup_iterations": int_at_least(0),
    "train.lr_milestones": increasing,
    "train.label_smoothing": interval(0, 1, closed_low=True, closed_high=False),
    "train.momentum": interval(0, 1, closed_low=True, closed_high=False),
    "train.weight_decay": at_least(0),
    "train.lr_step": int_at_least(1),
    "train.gamma": interval(0, 1, closed_low=False, closed_high=True),
    "train.iterations": int_at_least(1),
    "train.margin_global": at_least(0),
    "train.margin_local": at_least(0),
    "train.local_weight": at_least(0),
    "train.mining": one_of(MINING),
    "train.branches": one_of(TRAINED_BRANCHES),
    "train.num_workers": int_at_least(1),
    "train.min_workers": int_at_least(0),
    "train.resize_check_s": positive,
    "train.worker_resource": lambda v: None,
    "train.placement_strategy": one_of(("PACK", "SPREAD", "STRICT_SPREAD")),
    "train.worker_wait_s": positive,
    "train.use_gpu": lambda v: None,
    "train.zero_stage": one_of(ZERO_STAGES),
    "train.precision": one_of(PRECISIONS),  # bf16/fp16 on CPU is allowed: the trainer decides what runs
    "train.grad_accumulation": int_at_least(1),
    "train.grad_clip": at_least(0),
    "train.sync_batchnorm": lambda v: None,
    "train.max_failures": int_at_least(-1),
    "train.deterministic": lambda v: None,
    "train.checkpoint_every": int_at_least(1),
    "train.keep_checkpoints": int_at_least(1),
    "train.log_every": int_at_least(1),
    "train.seed": int_at_least(0),
    "train.storage_path": path_or_null,
    "train.shared_storage": lambda v: None,
    "eval.fusion_rate": at_least(0),
    "eval.branch": one_of(BRANCHES),
    "eval.protocol": one_of(PROTOCOLS),
    "eval.batch_size": int_at_least(1),
    "eval.ranks": nonempty_list(int_at_least(1), "integers >= 1"),
    "eval.rerank": lambda v: None,
    "eval.rerank_k1": int_at_least(1),
    "eval.rerank_k2": int_at_least(1),
    "eval.rerank_lambda": interval(0, 1, closed_low=True, closed_high=True),
    "eval.visualize": int_at_least(0),
    "tune.num_samples": int_at_least(1),
    "tune.local_weight": search_range(low_exclusive=False),
    "tune.margin_global": search_range(low_exclusive=True),
    "tune.margin_local": search_range(low_exclusive=True),
    "tune.fusion_rates": nonempty_list(at_least(0), "numbers >= 0"),
    "tune.scheduler": one_of(SCHEDULERS),
    "tune.grace_iterations": int_at_least(1),
    "tune.reduction_factor": int_at_least(2),
    "tune.metric": one_of(TUNE_METRICS),
    "tune.max_concurrent": int_at_least(1),
}


def validate_config(config: Config, origin: Mapping[str, tuple[str, Any]], default_source: str) -> None:
    """Type and range of every setting; the error names the layer that set the bad value."""
    for section_name, cls in SECTIONS.items():
        section = getattr(config, section_name)
        if not isinstance(section, cls):
            raise ConfigError(f"{default_source}: {section_name} must be a {cls.__name__}, "
                              f"not {type(section).__name__}")
        for key, tp in hints(cls).items():
            dotted, value = f"{section_name}.{key}", getattr(section, key)
            source, written = origin.get(dotted, (default_source, value))
            try:
                coerced = coerce(value, tp)
            except WrongType:
                raise ConfigError(f"{source}: {dotted} = {show(value)} is invalid: "
                                  f"must be {describe(tp)}") from None
            reason = _RULES[dotted](coerced)
            if reason:
                raise ConfigError(f"{source}: {dotted} = {show(written)} is invalid: {reason}")
            setattr(section, key, coerced)
    if config.model.ran_after == "4c" and config.model.backbone != "bninception":
        source, _ = origin.get("model.ran_after", (default_source, None))
        raise ConfigError(f"{source}: model.ran_after = '4c' is for model.backbone = 'bninception' (Table "
                          f"I's inception-4c); {config.model.backbone} has no 4c: use model.ran_after=4b")
    train = config.train
    if train.lr_schedule == "multistep" and not train.lr_milestones:
        source, _ = origin.get("train.lr_schedule", (default_source, None))
        raise ConfigError(f"{source}: train.lr_schedule = 'multistep' needs train.lr_milestones, the "
                          "iterations to decay at: set e.g. train.lr_milestones=[4000,7000]")


def validate(config: Config) -> Config:
    """Check (and coerce, e.g. int to float) every setting of a Config built or changed in code; raise
    ConfigError on the first bad one."""
    validate_config(config, origin={}, default_source="config")
    return config
