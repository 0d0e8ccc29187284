"""Train and evaluate STAL on every random split of iLIDS-VID or PRID-2011 (the paper's §IV-A protocol) and
average: summary.json and summary.md with the mean and standard deviation of rank-1/5/10/20 and mAP.

Alone:              python jobs/splits.py --dataset ilidsvid --root /data/iLIDS-VID --out splits/ilidsvid \\
                        --config configs/ilidsvid_bninception.yaml --set model.pretrained=WEIGHTS
On a Ray cluster:   ray job submit --working-dir . -- python jobs/splits.py --dataset prid2011 \\
                        --root s3://bucket/PRID2011 --out s3://bucket/splits/prid --max-concurrent 5 \\
                        --config configs/prid2011_bninception.yaml --use-gpu
Cross-dataset (Table VI): --cross-dataset prid2011 --cross-root DIR also evaluates each split's model on the
other data set's split. Polluted (Table VII): --pollute. Started again with the same --out, it resumes;
settings other than those of OUT/config.yaml are refused unless --allow-changed-config (docs/jobs.md).
"""

import argparse
import shlex
import sys

from stal_ray.config import ConfigError, add_config_arguments, config_from_args
from stal_ray.core import storage
from stal_ray.core.flags import add_deprecated
from stal_ray.core.storage import StorageError
from stal_ray.data.releases.base import ReleaseFormatError
from stal_ray.data.releases.registry import REGISTRY
from stal_ray.data.source import endpoint_url
from stal_ray.ray_init import add_ray_arguments, init_ray

SHORTCUTS = {"num_workers": "train.num_workers", "use_gpu": "train.use_gpu", "iterations": "train.iterations"}
DEFAULT_CONFIG = "synthetic_two_camera_tiny"  # a packaged config (config.packaged_configs())
TWO_CAMERA = tuple(name for name, spec in REGISTRY.items() if spec.splits)  # numbered splits


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default="configs/synthetic_two_camera_tiny.yaml, the tiny CNN for the "
                                         "synthetic releases")
    add_ray_arguments(parser)
    parser.add_argument("--dataset", required=True, choices=TWO_CAMERA)
    parser.add_argument("--root", required=True, metavar="DIR", help="the release as shipped (local or s3://)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="shards, runs, summary.json and summary.md (local or s3://)")
    parser.add_argument("--splits", type=int, default=10, metavar="N",
                        help="run splits 0..N-1 (default: 10, as the paper)")
    parser.add_argument("--split-file", metavar="FILE", default=None,
                        help="prid2011: splits in torchreid's splits_prid2011.json format (default: "
                             "OUT/data/splits_prid2011.json, written from 10 seeded splits on first use)")
    parser.add_argument("--pollute", action="store_true",
                        help="the polluted data of Table VII: a random black box in every frame")
    parser.add_argument("--pollute-seed", type=int, default=0, metavar="N",
                        help="with --pollute: the seed of the boxes' places (default: 0)")
    parser.add_argument("--cross-dataset", choices=TWO_CAMERA, default=None,
                        help="also evaluate each split's model on this data set's split (Table VI)")
    parser.add_argument("--cross-root", metavar="DIR", default=None, help="with --cross-dataset: its release")
    parser.add_argument("--max-concurrent", type=int, default=1, metavar="P",
                        help="splits run side by side, each a Ray task with its own Ray Train run "
                             "(default: 1; a cluster needs the resources of P training runs)")
    add_deprecated(parser, "--parallel", "--max-concurrent", dest="max_concurrent", type=int)
    parser.add_argument("--num-workers", type=int, default=None, metavar="N",
                        help="Ray Train workers of each split's run (train.num_workers; default: the "
                             "config's)")
    parser.add_argument("--use-gpu", action="store_true", default=None,
                        help="one GPU per worker (train.use_gpu; default: the config's)")
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="training iterations of each split's run (train.iterations; default: the "
                             "config's, 200 in synthetic_two_camera_tiny.yaml)")
    parser.add_argument("--allow-changed-config", action="store_true",
                        help="resume the splits in --out with settings other than those of its config.yaml; "
                             "the change is recorded in its config-changes.yaml (default: such a resume is "
                             "refused, naming the settings that differ)")
    parser.add_argument("--endpoint-url", metavar="URL", default=None, type=endpoint_url,
                        help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    args = parser.parse_args(argv)
    if args.splits < 1 or args.max_concurrent < 1:
        parser.error("--splits and --max-concurrent must be >= 1")
    if (args.cross_dataset is None) != (args.cross_root is None):
        parser.error("--cross-dataset and --cross-root go together")
    if args.cross_dataset == args.dataset:
        parser.error(f"--cross-dataset {args.cross_dataset} is the training data set; name the other one")
    takes_split_file = [d for d in (args.dataset, args.cross_dataset) if d and REGISTRY[d].split_file]
    if args.split_file is not None and not takes_split_file:
        parser.error("--split-file is for " + " or ".join(n for n, s in REGISTRY.items() if s.split_file))
    if args.pollute_seed != 0 and not args.pollute:
        parser.error("--pollute-seed needs --pollute")
    args.config = args.config or str(DEFAULT_CONFIG)
    # read and written by Ray tasks, whose working directory is the cluster's
    args.root, args.out, args.cross_root, args.split_file = map(
        storage.absolute, (args.root, args.out, args.cross_root, args.split_file))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # torch, DeepSpeed and Ray: after the arguments, so that --help and a bad flag answer at once
    from stal_ray.study.splits import SplitData, run_splits
    from stal_ray.train.trainer import RunStoppedError

    data_out = storage.join(args.out, "data")
    data = SplitData(args.dataset, args.root, data_out,
                     split_file=args.split_file if REGISTRY[args.dataset].split_file else None,
                     pollute_seed=args.pollute_seed if args.pollute else None, endpoint_url=args.endpoint_url)
    cross = None if args.cross_dataset is None else SplitData(
        args.cross_dataset, args.cross_root, storage.join(args.out, "cross-data"),
        split_file=args.split_file if REGISTRY[args.cross_dataset].split_file else None,
        endpoint_url=args.endpoint_url)  # the paper tests across data sets unpolluted
    try:
        config = config_from_args(args, SHORTCUTS)
        init_ray(args.address)
        summary = run_splits(config, data, args.out, list(range(args.splits)),
                             command="python jobs/splits.py " + shlex.join(argv), cross=cross,
                             parallel=args.max_concurrent, allow_changed_config=args.allow_changed_config)
    except (ConfigError, StorageError, ReleaseFormatError, RunStoppedError) as error:
        print(f"splits: error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
