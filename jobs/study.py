"""The paper's experiments as one reproducible study: attention and branch ablations, body parts, fusion
rate, sequence length and attention maps on occluded data, written to OUT/report.md with its figures.

Alone:              python jobs/study.py --out study      (occluded synthetic data set, tiny CNN, CPU)
On a Ray cluster:   ray job submit --working-dir . -- python jobs/study.py --data s3://bucket/polluted-mars \\
                        --config configs/mars_resnet50.yaml --use-gpu --out s3://bucket/study
Started again with the same --out, it resumes: finished models are not trained again. Settings other than
those of OUT/config.yaml are refused unless --allow-changed-config (docs/jobs.md).
"""

import argparse
import shlex
import sys

from stal_ray.config import ConfigError, add_config_arguments, config_from_args
from stal_ray.core import storage
from stal_ray.core.storage import StorageError
from stal_ray.data.prepared.handle import PreparedData
from stal_ray.data.source import add_data_arguments, resolve_data
from stal_ray.data.synthetic.generator import ensure_synthetic_shards
from stal_ray.data.synthetic.occluders import OCCLUDER_STYLES
from stal_ray.ray_init import add_ray_arguments, init_ray
from stal_ray.study.variants import SEQUENCE_LENGTHS, VARIANTS

SHORTCUTS = {"num_workers": "train.num_workers", "use_gpu": "train.use_gpu", "iterations": "train.iterations"}
DEFAULT_CONFIG = "study_occluded"  # a packaged config (config.packaged_configs())
# the synthetic data set of the study when no --data is given: like the paper's "polluted" data (Table VII),
# most frames with an occluder, and enough test identities for the ablations to separate
# (occluders "moving": bursts of frames behind a post, a car or a passer-by,
# stal_ray.data.synthetic.occluders)
SYNTHETIC = dict(identities=60, test_identities=50, frames_per_tracklet=(10, 24))


def _length(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a sequence length is a number of frames >= 1 or `all`, "
                                         f"not {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default="configs/study_occluded.yaml, the tiny CNN for 800 iterations")
    add_data_arguments(parser)
    add_ray_arguments(parser)
    parser.add_argument("--out", metavar="DIR", required=True,
                        help="report.md, results.json, the figures and the trained models (local or s3://)")
    parser.add_argument("--occlusion", type=float, default=0.5,
                        help="share of occluded frames of the synthetic data set made when --data is "
                             "not given (default: 0.5)")
    parser.add_argument("--occluders", choices=OCCLUDER_STYLES, default="moving",
                        help="what occludes the synthetic data set's frames: moving (default; bursts of "
                             "contiguous frames behind a post, a car or a passer-by) or boxes (a random "
                             "box in each occluded frame, the first generator's)")
    parser.add_argument("--synthetic-seed", type=int, default=0,
                        help="generator seed of the synthetic data set (default 0; another seed is held-out "
                             "data of the same kind: other colours, cameras and occluders)")
    parser.add_argument("--variants", nargs="+", choices=[v.name for v in VARIANTS],
                        default=[v.name for v in VARIANTS],
                        help="the models to train (default: all; stal is always trained); the report leaves "
                             "out the comparisons of the others")
    parser.add_argument("--sequence-lengths", nargs="+", metavar="L", type=_length,
                        default=list(SEQUENCE_LENGTHS),
                        help="frames per query and gallery tracklet in the Fig. 11 heat map; `all` = every "
                             "frame (default: 1 2 4 8 16 all; the paper goes to 128 on long tracklets)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, metavar="S",
                        help="one study per training seed (train.seed), into OUT/seed-S/, and OUT/seeds.md: "
                             "the figures' mean ± standard deviation and the paired differences over seeds "
                             "(default: one study, the config's train.seed, into OUT)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="Ray Train workers of each training run (train.num_workers; default: the "
                             "config's, 1 in study_occluded.yaml)")
    parser.add_argument("--use-gpu", action="store_true", default=None,
                        help="one GPU per worker (train.use_gpu; default: the config's, off in "
                             "study_occluded.yaml)")
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="training iterations of each model (train.iterations; default: the config's, "
                             "800 in study_occluded.yaml)")
    parser.add_argument("--allow-changed-config", action="store_true",
                        help="resume the study in --out with settings other than those of its config.yaml; "
                             "the change is recorded in its config-changes.yaml (default: such a resume is "
                             "refused, naming the settings that differ)")
    args = parser.parse_args(argv)
    args.config = args.config or str(DEFAULT_CONFIG)
    args.out = storage.absolute(args.out)  # written by Ray tasks
    if args.seeds and (len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0):
        parser.error(f"--seeds must be distinct training seeds >= 0, got {' '.join(map(str, args.seeds))}")
    if not 0 <= args.occlusion <= 1:
        parser.error(f"--occlusion is a share of frames in [0, 1], got {args.occlusion}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # torch, DeepSpeed and Ray: after the arguments, so that --help and a bad flag answer at once
    from stal_ray.study.run import run_seeds, run_study
    from stal_ray.train.trainer import RunStoppedError

    try:
        config = config_from_args(args, SHORTCUTS)
        init_ray(args.address)
        uri = args.data or config.data.root
        data = resolve_data(uri, endpoint_url=args.endpoint_url) if uri else PreparedData.read(
            ensure_synthetic_shards(occlusion=args.occlusion, occluders=args.occluders,
                                    seed=args.synthetic_seed, **SYNTHETIC))
        print(f"study on {data.uri}, into {args.out}")
        command = "python jobs/study.py " + shlex.join(argv)
        options = dict(command=command, sequence_lengths=args.sequence_lengths,
                       variants=tuple(v for v in VARIANTS if v.name in {"stal", *args.variants}),
                       allow_changed_config=args.allow_changed_config)
        report = (run_seeds(config, data, args.out, args.seeds, **options) if args.seeds
                  else run_study(config, data, args.out, **options))
    except (ConfigError, StorageError, RunStoppedError) as error:
        print(f"study: error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
