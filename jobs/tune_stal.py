"""Search λ, m_g, m_l with Ray Tune (ASHA): each trial is a distributed STAL training run, each validation
ranks the whole fusion-rate grid; prints the results table and writes results.csv and best.yaml.

Alone:              python jobs/tune_stal.py                       (tiny model, embedded synthetic data)
On a Ray cluster:   ray job submit --working-dir . -- python jobs/tune_stal.py \\
                        --config configs/mars_resnet50.yaml --data s3://bucket/mars --num-samples 16 \\
                        --storage-path s3://bucket/ray_results
Interrupted:        the same command again (same --storage-path and --name) finishes the remaining trials;
                    other settings than the search's config.yaml are refused unless --allow-changed-config.
Watch:              tensorboard --logdir <storage>/<name>
--data needs --config (the default config is the tiny model of the embedded synthetic data set).
"""

import argparse
import contextlib
import sys
import time

from stal_ray.config import ConfigError, add_config_arguments, config_from_args
from stal_ray.core.flags import add_deprecated
from stal_ray.core.run_log import run_log
from stal_ray.core.storage import StorageError
from stal_ray.data.source import add_data_arguments, resolve_data
from stal_ray.ray_init import add_ray_arguments, init_ray

# flags that stand for a setting
SHORTCUTS = {"num_samples": "tune.num_samples", "iterations": "train.iterations",
             "max_concurrent": "tune.max_concurrent", "num_workers": "train.num_workers",
             "use_gpu": "train.use_gpu", "storage_path": "train.storage_path"}
DEFAULT_CONFIG = "synthetic_tiny"  # a packaged config (config.packaged_configs())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default="configs/synthetic_tiny.yaml, the tiny model for the synthetic data")
    add_data_arguments(parser)
    add_ray_arguments(parser)
    parser.add_argument("--num-samples", type=int, default=None,
                        help="trials (tune.num_samples; default: the config's, 4 in synthetic_tiny.yaml, "
                             "16 in the MARS configs)")
    parser.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                        help="trials run side by side (tune.max_concurrent; default: the config's, 2)")
    # the training loop, like the paper (150000 iterations on MARS), counts iterations, not epochs
    parser.add_argument("--iterations", type=int, default=None, metavar="N",
                        help="iterations of a trial that is never stopped early (train.iterations; default: "
                             "the config's, 200 in synthetic_tiny.yaml, 150000 in the MARS configs)")
    add_deprecated(parser, "--max-iterations", "--iterations", dest="iterations", type=int)
    parser.add_argument("--num-workers", type=int, default=None, metavar="N",
                        help="Ray Train workers of each trial (train.num_workers; default: the config's)")
    parser.add_argument("--use-gpu", action="store_true", default=None,
                        help="one GPU per worker of each trial (train.use_gpu; default: the config's)")
    parser.add_argument("--storage-path", metavar="URI", default=None,
                        help="where the search and its trials' runs go, local or s3:// (train.storage_path; "
                             "default: the config's, else ~/ray_results). A cluster of more than one host "
                             "needs s3:// or a shared mount: a local path is refused there")
    parser.add_argument("--name", default=None,
                        help="search name; an existing search of this name is resumed: finished trials are "
                             "kept, the others continue. Ray Tune unpickles the search's saved state, so a "
                             "resume trusts whoever can write the search folder: a local folder with a file "
                             "of another user or one others can write is refused; on s3:// everyone who can "
                             "write the bucket is trusted (default: tune-<backbone>-<YYYYmmdd-HHMMSS>)")
    parser.add_argument("--allow-changed-config", action="store_true",
                        help="resume the search --name with settings other than those of its config.yaml; "
                             "the change is recorded in its config-changes.yaml (default: such a resume is "
                             "refused, naming the settings that differ)")
    # before the rule "the same --name resumes", --resume asked for it; it now only refuses a new search
    add_deprecated(parser, "--resume", "the same --name (an existing search resumes)", dest="resume",
                   switch=True)
    parser.set_defaults(resume=False)
    args = parser.parse_args(argv)
    if args.resume and not args.name:
        parser.error("--resume needs the --name of the search to finish")
    if args.data and not args.config:
        parser.error(f"--data {args.data} needs --config: without it the tiny model of the synthetic data "
                     "set would be tuned; pass e.g. --config configs/mars_resnet50.yaml")
    args.config = args.config or str(DEFAULT_CONFIG)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torch, DeepSpeed and Ray: after the arguments, so that --help and a bad flag answer at once
    from stal_ray.train.preflight import check_settings
    from stal_ray.train.trainer import run_folder
    from stal_ray.tune import SearchInterrupted, format_table, run_search

    with contextlib.ExitStack() as log:
        try:
            config = config_from_args(args, SHORTCUTS)
            check_settings(config)  # before Ray starts: a config without weights is refused in seconds
            init_ray(args.address)
            data = resolve_data(args.data or config.data.root, endpoint_url=args.endpoint_url)
            name = args.name or f"tune-{config.model.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
            # from here on, this job's output is kept as log.txt in the search's folder
            log.enter_context(run_log(run_folder(config, name), endpoint_url=args.endpoint_url))
            print(f"search {name!r} on {data.uri}")
            result = run_search(config, data, name=name, resume=args.resume,
                                allow_changed_config=args.allow_changed_config)
        except SearchInterrupted as interrupted:
            print(f"tune_stal: {interrupted}", file=sys.stderr)
            return 130
        except (ConfigError, StorageError, ValueError, RuntimeError) as error:
            print(f"tune_stal: error: {error}", file=sys.stderr)
            return 2
        print(format_table(result.rows))
        print(f"results: {result.results_csv}")
        print(f"TensorBoard: tensorboard --logdir {result.experiment_dir}")
        print(result.best_yaml)  # last line: the configuration to train with
        return 0


if __name__ == "__main__":
    sys.exit(main())
