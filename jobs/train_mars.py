"""Train STAL with Ray Train + DeepSpeed, then evaluate the final model on the test split (metrics.json).

Alone:              python jobs/train_mars.py                      (tiny model, embedded synthetic data)
On a Ray cluster:   ray job submit --working-dir . -- python jobs/train_mars.py \\
                        --config configs/mars_resnet50.yaml --data s3://bucket/mars --num-workers 8 \\
                        --use-gpu --storage-path s3://bucket/ray_results
A run started again with the same --storage-path and --name resumes from its latest checkpoint, with the
settings of its config.yaml: other settings are refused unless --allow-changed-config (docs/jobs.md).
--data needs --config.

The run folder <storage path>/<name> holds config.yaml (the resolved settings), the checkpoints,
tensorboard/ (tensorboard --logdir <run folder>), model.pt, metrics.json and log.txt (this job's output).
"""

import argparse
import contextlib
import sys
import time

from stal_ray.config import ConfigError, add_config_arguments, config_from_args
from stal_ray.core.run_log import run_log
from stal_ray.core.storage import StorageError
from stal_ray.data.prepared.integrity import check_shards
from stal_ray.data.source import add_data_arguments, resolve_data
from stal_ray.ray_init import add_ray_arguments, init_ray

# flags that stand for a setting
SHORTCUTS = {"num_workers": "train.num_workers", "min_workers": "train.min_workers",
             "use_gpu": "train.use_gpu", "storage_path": "train.storage_path",
             "iterations": "train.iterations"}
DEFAULT_CONFIG = "synthetic_tiny"  # a packaged config (config.packaged_configs())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default="configs/synthetic_tiny.yaml, the tiny model for the synthetic data")
    add_data_arguments(parser)
    add_ray_arguments(parser)
    parser.add_argument("--num-workers", type=int, default=None,
                        help="Ray Train workers, one GPU each with --use-gpu (train.num_workers; default: "
                             "the config's, 1 in synthetic_tiny.yaml, 4 in the MARS configs)")
    parser.add_argument("--min-workers", type=int, default=None,
                        help="elastic training (train.min_workers): after a lost node go on with at least "
                             "this many workers, growing back to --num-workers when nodes return (default: "
                             "a fixed group)")
    parser.add_argument("--use-gpu", action="store_true", default=None,
                        help="one GPU per worker (train.use_gpu; default: the config's, off in "
                             "synthetic_tiny.yaml, on in the MARS configs)")
    parser.add_argument("--storage-path", metavar="URI", default=None,
                        help="where checkpoints and model.pt go, local or s3:// (train.storage_path; "
                             "default: the config's, else ~/ray_results). A cluster of more than one host "
                             "needs s3:// or a shared mount: a local path is refused there")
    parser.add_argument("--name", default=None, help="run name; an existing run of this name is resumed "
                                                     "(default: stal-<backbone>-<YYYYmmdd-HHMMSS>)")
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="training iterations (train.iterations; default: the config's, 200 in "
                             "synthetic_tiny.yaml, 150000 in the MARS configs)")
    parser.add_argument("--allow-changed-config", action="store_true",
                        help="resume the run --name with settings other than those of its config.yaml; the "
                             "change is recorded in its config-changes.yaml (default: such a resume is "
                             "refused, naming the settings that differ)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final test-split evaluation")
    args = parser.parse_args(argv)
    if args.data and not args.config:
        parser.error(f"--data {args.data} needs --config: without it the tiny model of the synthetic data "
                     "set would train; pass e.g. --config configs/mars_resnet50.yaml")
    args.config = args.config or str(DEFAULT_CONFIG)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torch, DeepSpeed and Ray: after the arguments, so that --help and a bad flag answer at once
    from stal_ray.train.preflight import check_settings
    from stal_ray.train.trainer import RunStoppedError, run_folder, train

    with contextlib.ExitStack() as log:
        try:
            config = config_from_args(args, SHORTCUTS)
            check_settings(config)  # before Ray starts: a config without weights is refused in seconds
            init_ray(args.address)
            data = resolve_data(args.data or config.data.root, endpoint_url=args.endpoint_url)
            name = args.name or f"stal-{config.model.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
            # from here on, this job's output (its workers' lines too) is kept as log.txt in the run folder
            log.enter_context(run_log(run_folder(config, name), endpoint_url=args.endpoint_url))
            # the test split too: a damaged one would stop the evaluation after hours of training
            check_shards(data, ("train",) if args.no_eval else ("train", "test"))
            print(f"training run {name!r} on {data.uri}")
            result = train(config, data, name=name, allow_changed_config=args.allow_changed_config)
        except (ConfigError, StorageError, RunStoppedError) as error:
            print(f"train_mars: error: {error}", file=sys.stderr)
            return 2
        print(f"model: {result.model_path}")
        metrics_path = result.run_dir + "/metrics.json"
        if not args.no_eval:
            from stal_ray.evaluate.evaluate import evaluate

            metrics = evaluate(result.model_path, data, result.run_dir)
            stal = metrics["modes"]["stal"]
            print(f"test mAP {stal['mAP']:.1%} ({metrics['ap_rule']} rule), mAP_step {stal['mAP_step']:.1%}, "
                  f"mINP {stal['mINP']:.1%}, Rank-1 {stal['cmc']['1']:.1%}")
        print(metrics_path)
        return 0


if __name__ == "__main__":
    sys.exit(main())
