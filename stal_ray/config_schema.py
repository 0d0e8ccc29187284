"""What the settings of stal_ray are: typed dataclasses with their defaults, the values each allows, and the
check of a whole Config against them. Layering them from YAML and --set is config.py's."""

from dataclasses import dataclass, field, fields
from typing import Any

from stal_ray.config_rules import (
    plain,
)

# Allowed values of the string settings; other modules import these instead of repeating them.
BACKBONES = ("bninception", "resnet50", "tiny")
POSE_SOURCES = ("keypoints", "learned", "prior")
# model.keypoint_supervision when unset, the learned pose head trains on data with keypoints: the loss is a
# squared error in crop fractions (objective.keypoint_loss), so a joint 10% of the crop off weighs 0.1
KEYPOINT_SUPERVISION = 10.0
ATTENTION_MODES = ("stal", "tan", "san", "baseline")
MINING = ("batch_hard", "all")
PRECISIONS = ("fp32", "bf16", "fp16")
# ZeRO-3 partitions the parameters themselves: it buys nothing for a ~50M-parameter STAL and would need
# gathered parameters for every export, so it is not offered.
ZERO_STAGES = (0, 1, 2)
BRANCHES = ("fused", "global", "local")
# which branches' terms of Eq. 3 train (the branch ablation of §IV-C2 trains each branch alone)
TRAINED_BRANCHES = ("both", "global", "local")
PROTOCOLS = ("official", "torchreid")
# The paper's test switches: stal = temporal and spatial attention, tan = temporal only, san = spatial only,
# baseline = no attention (all scores 1); global and local = one branch of the stal distance alone. Here, not
# in evaluate/distance.py (which re-exports them as MODES), so evaluate_mars.py --help needs no torch.
DISTANCE_MODES = ("stal", "baseline", "tan", "san", "global", "local")
# beyond the paper (its SGD and step decay are the defaults): train.optimizer and train.lr_schedule
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("step", "cosine", "multistep")
SCHEDULERS = ("asha", "fifo")
TUNE_METRICS = ("mAP", "rank1")
# ||ā|| of Eq. 8: "l2" (Euclidean) or "l1" (Σ_r ā^r, the form Eq. 12 differentiates)
PART_NORMS = ("l2", "l1")
# where RAN sits on the global branch (model.ran_after): after the low/high split (4b), or after inception-4c
# as the paper's Table I lists it (BN-Inception only)
RAN_PLACES = ("4b", "4c")
# data.mixing and data.weighting (data/stream/sampling.py, docs/sampling.md)
MIXING = ("global", "shards", "neighbours")
WEIGHTING = ("frames", "identities")
DECODE_AT = ("stream", "consumer")
STAN_FCS = ("clip", "frame")
NO_PRETRAINED = "none"  # model.pretrained: train the backbone from random weights, on purpose


class ConfigError(ValueError):
    """A setting that cannot be used; the message names its source, dotted key, value and what is allowed."""


@dataclass
class ModelConfig:
    # "bninception" (paper, Table I), "resnet50" (paper, Table V), "tiny" (CPU tests)
    backbone: str = "tiny"
    # ImageNet state dict for the backbone: local path or fsspec URL (https://, s3://); "none" = random
    # initialisation on purpose; unset (null) is only allowed for the tiny backbone, which has no weights
    pretrained: str | None = None
    # D of the local part features f_{r,t} (paper §III-E: 1024)
    feature_dim: int = 1024
    # where the 14 joints of Eq. 7 come from: "keypoints" given in the data, "learned" head, "prior" pose
    pose_source: str = "learned"
    # weight of a loss pulling learned joints to given keypoints (0 = pure ReID refinement); null (default):
    # KEYPOINT_SUPERVISION when pose_source is learned and the training data has keypoints (e.g. estimated by
    # jobs/estimate_pose.py), else 0 (resolved by resolve_keypoint_supervision as training starts)
    keypoint_supervision: float | None = None
    # side of the ROI-pooled part map (paper §III-E: 8x8)
    part_size: int = 8
    # ablation switch (paper §IV-C): "stal" both, "tan" temporal only, "san" spatial only, "baseline" all 1
    attention: str = "stal"
    # BatchNorm after each STAN conv (see model.attention.STAN; false = the bare convs)
    stan_batchnorm: bool = True
    # STAN's FC to the T×R map: "frame" one FC from a frame's pooled map to its R scores, shared by the T
    # positions (position-free: temporal attention learns occlusion, docs/attention.md); "clip" one FC over
    # the whole clip's T pooled maps (the first STAN: each frame's score depends on its position)
    stan_fc: str = "frame"
    # the residual attention branch on the global branch (RAN, §III-B); false = the ablation without it
    residual_attention: bool = True
    # where RAN sits (BN-Inception): "4b", on the low-level map the part branch also reads (Fig. 2(b)'s
    # split at inception-4b), or "4c", after the global branch's inception-4c (Table I: 4c, ran, 4d); other
    # backbones have no 4c and take "4b", their low/high split
    ran_after: str = "4b"
    # ||ā|| in Eq. 8's part weights an^r = ā^r / ||ā||: "l2" (Euclidean; trains better, README) or "l1"
    # (the form whose gradient Eq. 12 gives)
    part_norm: str = "l2"
    # BNNeck: a BatchNorm (shift frozen at 0) before the identity classifiers of Eq. 5 and 6, the triplets
    # and the test distances on the features before it (false = none, paper; Luo et al. 2019)
    bnneck: bool = False


@dataclass
class DataConfig:
    # MARS release or prepared Parquet shards, local path or s3:// URL; None = embedded synthetic data set
    root: str | None = None
    # T, frames per clip (paper §III-E: 8)
    seq_len: int = 8
    # input height (paper: 224 for BN-Inception, 256 for ResNet-50)
    height: int = 224
    # input width (paper: 224 for BN-Inception, 128 for ResNet-50)
    width: int = 224
    # P, identities per batch
    identities_per_batch: int = 8
    # K, clips per identity in a batch (>= 2 so every anchor has a positive)
    clips_per_identity: int = 4
    # groups of K clips an identity gives per epoch at most (null: about frames / (K·T), every frame once).
    # The paper does not batch identities: it trains on one triplet (anchor, positive, negative clip) per
    # iteration (§III-E); P×K batches are this project's choice (docs/sampling.md). Uncapped, MARS's largest
    # identity (22,641 frames) gives 708 groups; capped, it gives 32 like 19% of the identities. An identity
    # with more than K·32 tracklets gives one clip to each of a rotating subset: every tracklet within
    # ceil(tracklets / (K·32)) epochs (3 on MARS), other frames every epoch.
    max_groups_per_identity: int | None = 32
    # how an epoch's groups are ordered: "shards" (default) — identities in the order of the shuffled files,
    # rows as stored, each identity's groups in a row, so a batch's P identities are near neighbours in
    # identity number: on MARS, people recorded at the same time by the same cameras (docs/sampling.md);
    # "global" — a random permutation of all training identities per epoch (the stream's seed, epoch), each
    # batch's P identities drawn from a window of 4·P of them, as a uniform draw (torchreid's and fast-reid's
    # samplers); "neighbours" — as global, but each window holds 4·P consecutive identity numbers (a random
    # offset and window order per epoch). Measured over 3 data sets x 3 seeds (docs/sampling.md, "Accuracy"):
    # global wins where identity order says nothing of appearance (+3.8 mAP), and loses where neighbours were
    # recorded together, as in MARS (-6.5 and -15.3): the default is the stream that loses least
    mixing: str = "shards"
    # how much an identity weighs per epoch: "frames" — groups in proportion to its frames, up to the cap
    # (torchreid's RandomIdentitySampler and fast-reid's NaiveIdentitySampler weigh by samples alike);
    # "identities" — every identity the same number of groups (the mean), as fast-reid's balanced sampler
    weighting: str = "frames"
    # seed of the stream alone: each epoch's order, the frames drawn from each tracklet, augmentation (null:
    # train.seed). Set apart from train.seed, it tells what the spread of results over seeds comes from:
    # the stream's draws or the initialisation (docs/sampling.md)
    seed: int | None = None
    # Ray Data CPU tasks decoding JPEG frames at once, at most (null: as many as the cluster's free CPUs
    # allow, so CPU nodes added to the cluster add decoding; Ray Data's autoscaling of tasks). A cap keeps
    # CPUs for other work, e.g. a laptop's CPU train workers (synthetic_tiny.yaml: 2)
    decode_concurrency: int | None = None
    # where JPEG frames become pixels (docs/decoding.md): "stream" — in the Ray Data decoding tasks, pixels
    # through the object store (8x the bytes of JPEG at 256x128); "consumer" — the stream carries the chosen
    # frames' JPEG bytes and the training worker (and evaluation's feature actors) decodes each batch straight
    # into its buffer, with a thread pool on CPU, or nvJPEG (torchvision.io.decode_jpeg) on the worker's GPU
    # when torchvision is installed; augmentation follows there. The same seed gives the same input either way
    decode_at: str = "stream"
    # fraction of training identities held out as the Tune validation split (never the test split)
    val_identities: float = 0.1
    # Training augmentation (data.augment), none in the paper (§IV-A), each off by default; every clip gets
    # one draw for all of its T frames. Mirror half of the clips left-right (keypoints mirrored, left and
    # right joints swapped)
    flip: bool = False
    # pad each clip by this many pixels of zeros and crop H x W back at a random offset (0 = off; Luo et
    # al. 2019: 10 at 256 x 128)
    crop_padding: int = 0
    # colour jitter strength s: brightness and contrast x U(1 - s, 1 + s), per-channel gains (a camera's
    # cast) x U(1 - s/2, 1 + s/2) (0 = off)
    color_jitter: float = 0.0
    # random erasing (Zhong et al., AAAI 2020): probability that a clip gets one rectangle (2-40% of the
    # frame, aspect 0.3-3.3) of a random colour, the same in its T frames; joints under it count as hidden
    # (0 = off)
    random_erasing: float = 0.0


@dataclass
class TrainConfig:
    # SGD learning rate (paper §III-E: 0.001)
    lr: float = 0.001
    # "sgd" (paper, with momentum) or "adam" (β 0.9, 0.999; Luo et al. 2019 use it with lr 3.5e-4)
    optimizer: str = "sgd"
    # "step" (lr × gamma every lr_step iterations, paper), "cosine" (from lr down to 0 at the last
    # iteration, after the warm-up) or "multistep" (lr × gamma at each of lr_milestones)
    lr_schedule: str = "step"
    # iterations at which "multistep" multiplies the learning rate by gamma, increasing (Luo et al. 2019:
    # epochs 40 and 70 of 120, gamma 0.1)
    lr_milestones: list[int] = field(default_factory=list)
    # iterations of linear warm-up from 0.1 × lr to lr (0 = none, paper; Luo et al. 2019 warm up)
    warmup_iterations: int = 0
    # ε of label smoothing in the softmax (Eq. 5) and consistency (Eq. 6) terms (0 = none, paper)
    label_smoothing: float = 0.0
    # SGD momentum (paper §III-E: 0.9)
    momentum: float = 0.9
    # L2 weight decay (paper §III-E: 0.0002)
    weight_decay: float = 2e-4
    # iterations between learning-rate decays (not given in the paper)
    lr_step: int = 20000
    # learning-rate decay factor per step (paper §III-E: 0.5)
    gamma: float = 0.5
    # training iterations (paper §III-E: 150000 on MARS)
    iterations: int = 150000
    # m_g, global triplet margin (Eq. 4; paper: 1.2)
    margin_global: float = 1.2
    # m_l, local triplet margin (Eq. 4; paper: 0.8)
    margin_local: float = 0.8
    # λ, weight of the local triplet loss (Eq. 4; paper: 0.3)
    local_weight: float = 0.3
    # triplets inside a P×K batch: "batch_hard" (hardest positive and negative per anchor) or "all"
    mining: str = "batch_hard"
    # terms of Eq. 3 to optimise: "both" (all), "global" (d_g triplet + softmax), "local" (λ·d_l triplet +
    # consistency); the branch ablation of §IV-C2 trains each branch alone
    branches: str = "both"
    # Ray Train workers (one per GPU when use_gpu)
    num_workers: int = 1
    # elastic training: 0 keeps a fixed group of num_workers; from 1 to num_workers, a group that lost nodes
    # goes on with at least this many workers from its last checkpoint and grows back to num_workers when
    # they return (Ray Train's ScalingConfig(num_workers=(min, max))); docs/faults.md
    min_workers: int = 0
    # seconds between the checks of an elastic group for returned resources to grow back onto
    resize_check_s: float = 60.0
    # where the workers go (Ray placement group strategy): "PACK" (few nodes), "SPREAD" (one per node where
    # it can, so that a lost node takes few workers with it) or "STRICT_SPREAD" (one per node, or wait)
    placement_strategy: str = "PACK"
    # a custom node resource (`ray start --resources '{"trainer": 1}'`) each worker takes one unit of, so
    # workers go only to the nodes that have it, one per unit (null: CPUs/GPUs alone)
    worker_resource: str | None = None
    # seconds a fixed group (min_workers = 0) waits for the resources of lost workers before the run fails
    worker_wait_s: float = 600.0
    # train on GPUs
    use_gpu: bool = False
    # DeepSpeed ZeRO stage: 0 (data parallel), 1 (optimiser state sharded), 2 (and gradients)
    zero_stage: int = 0
    # "fp32", "bf16" or "fp16" (mixed precision through DeepSpeed)
    precision: str = "fp32"
    # micro-batches (P×K clips each) whose gradients are summed before one optimiser step
    grad_accumulation: int = 1
    # clip the gradient norm to this value (0 = no clipping)
    grad_clip: float = 0.0
    # synchronise BatchNorm statistics across workers (GPU only), so results do not depend on the GPU count
    sync_batchnorm: bool = False
    # times a run is recovered from its latest checkpoint after a worker dies (-1 = always)
    max_failures: int = 2
    # same data order on every run (Ray Data keeps block order; a little slower): exact resumption
    deterministic: bool = False
    # iterations between checkpoints reported to Ray Train (one is also reported at every epoch's end)
    checkpoint_every: int = 1000
    # checkpoints kept in storage, newest first
    keep_checkpoints: int = 2
    # iterations between metric reports
    log_every: int = 50
    # seed of initialisation, and of the stream unless data.seed is set
    seed: int = 0
    # Ray Train storage, local path or fsspec URL; None = ~/ray_results
    storage_path: str | None = None
    # a local storage_path is mounted at the same path on every node (NFS): allowed on a multi-node cluster
    shared_storage: bool = False


@dataclass
class EvalConfig:
    # α in d = d_l + α·d_g (paper §III-E: 0.3)
    fusion_rate: float = 0.3
    # distance to rank by: "fused", "global" (d_g alone) or "local" (d_l alone)
    branch: str = "fused"
    # "official" MARS protocol (junk ignored, distractors kept) or "torchreid" (its evaluation of MARS)
    protocol: str = "official"
    # tracklets per feature-extraction batch
    batch_size: int = 32
    # CMC ranks to report
    ranks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    # k-reciprocal re-ranking of each mode's distance (Zhong et al., CVPR 2017; not in the STAL paper)
    rerank: bool = False
    # its k1 (k-reciprocal neighbours), k2 (local query expansion) and λ (weight of the original distance),
    # Zhong et al.'s values
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    # ranked galleries (torchreid's visrank): for 10 sampled queries and the 10 of lowest AP, per mode, an
    # image of the query's frames and its top-K gallery tracklets into <out>/ranked/ (K; 0: none)
    visualize: int = 0


@dataclass
class TuneConfig:
    # trials
    num_samples: int = 16
    # search range [low, high] of λ
    local_weight: tuple[float, float] = (0.1, 1.0)
    # search range [low, high] of m_g (paper §IV-D, Fig. 10, varies margins 0.4..2)
    margin_global: tuple[float, float] = (0.4, 2.0)
    # search range [low, high] of m_l
    margin_local: tuple[float, float] = (0.4, 2.0)
    # α grid every validation evaluates on one set of features (paper §IV-D, Fig. 8: 0 to 1 by 0.1)
    fusion_rates: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    # "asha" stops bad trials early, "fifo" runs every trial to the end
    scheduler: str = "asha"
    # iterations every trial runs before ASHA may stop it (validation happens at train.checkpoint_every)
    grace_iterations: int = 1000
    # ASHA keeps the best 1/reduction_factor of the trials at each rung
    reduction_factor: int = 4
    # validation metric to maximise: "mAP" or "rank1"
    metric: str = "mAP"
    # trials running at once; each holds train.num_workers workers and its decoding tasks, so keep
    # max_concurrent x (num_workers + 2 x decode_concurrency, or + 2 uncapped) within the cluster's CPUs
    max_concurrent: int = 2


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict of built-in types (tuples as lists), for Ray, JSON and YAML."""
        return {
            section.name: {f.name: plain(getattr(getattr(self, section.name), f.name))
                           for f in fields(getattr(self, section.name))}
            for section in fields(self)
        }


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(Config)}
# settings that are local paths or URLs
PATH_SETTINGS = ("model.pretrained", "data.root", "train.storage_path")


def stream_seed(config: "Config") -> int:
    """The seed of the training stream's draws: data.seed, or train.seed when that is null."""
    return config.train.seed if config.data.seed is None else config.data.seed
