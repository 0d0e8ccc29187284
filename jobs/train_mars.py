"""Train STAL with Ray Train + DeepSpeed, then evaluate the final model on the test split (metrics.json).

Alone:              python jobs/train_mars.py                      (tiny model, embedded synthetic data)
On a Ray cluster:   ray job submit --working-dir . -- python jobs/train_mars.py \\
                        --config configs/mars_resnet50.yaml --data s3://bucket/mars --num-workers 8 --use-gpu
A run started again with the same --name resumes from its latest checkpoint.
"""

import argparse
import sys
import time
from pathlib import Path

from stal_ray.config import ConfigError, add_config_arguments, config_from_args
from stal_ray.data.source import add_data_arguments, resolve_data
from stal_ray.data.storage import StorageError
from stal_ray.ray_init import add_ray_arguments, init_ray
from stal_ray.train.trainer import NonFiniteLossError, train

# flags that stand for a setting
SHORTCUTS = {"num_workers": "train.num_workers", "use_gpu": "train.use_gpu",
             "storage_path": "train.storage_path"}
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "synthetic_tiny.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    add_data_arguments(parser)
    add_ray_arguments(parser)
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (train.num_workers)")
    parser.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--storage-path", metavar="URI", default=None,
                        help="checkpoints and model.pt, local or s3:// (train.storage_path; shared storage "
                             "on a multi-node cluster)")
    parser.add_argument("--name", default=None, help="run name; an existing run of this name is resumed "
                                                     "(default: stal-<backbone>-<time>)")
    parser.add_argument("--no-eval", action="store_true", help="skip the final test-split evaluation")
    args = parser.parse_args(argv)
    args.config = args.config or str(DEFAULT_CONFIG)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = config_from_args(args, SHORTCUTS)
        init_ray(args.address)
        data = resolve_data(args.data or config.data.root, endpoint_url=args.endpoint_url)
        name = args.name or f"stal-{config.model.backbone}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"training run {name!r} on {data}")
        result = train(config, data, name=name, endpoint_url=args.endpoint_url)
    except (ConfigError, StorageError, NonFiniteLossError) as error:
        print(f"train_mars: error: {error}", file=sys.stderr)
        return 2
    print(f"model: {result.model_path}")
    metrics_path = result.run_dir + "/metrics.json"
    if not args.no_eval:
        from stal_ray.evaluate.evaluate import evaluate

        metrics = evaluate(result.model_path, data, result.run_dir, endpoint_url=args.endpoint_url)
        stal = metrics["modes"]["stal"]
        print(f"test mAP {stal['mAP']:.1%}, rank-1 {stal['cmc']['1']:.1%}")
    print(metrics_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
