"""Evaluate a trained STAL model on a test split (MARS, iLIDS-VID, PRID-2011; another data set than the
model's is a cross-dataset test): CMC and mAP per mode, metrics.json and plots.

Alone:              python jobs/evaluate_mars.py --model runs/stal/model.pt --out eval/
On a Ray cluster:   ray job submit --working-dir . -- python jobs/evaluate_mars.py \\
                        --model s3://bucket/runs/stal/model.pt --data s3://bucket/mars --out s3://bucket/eval
"""

import argparse
import sys

from stal_ray.config import DISTANCE_MODES, PROTOCOLS, ConfigError
from stal_ray.core import storage
from stal_ray.core.flags import add_deprecated, positive_int, require
from stal_ray.core.storage import StorageError
from stal_ray.data.source import endpoint_url
from stal_ray.ray_init import add_ray_arguments, init_ray


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="PATH", default=None,
                        help="model.pt written by jobs/train_mars.py, local or s3:// (required)")
    add_deprecated(parser, "--checkpoint", "--model", dest="model")
    parser.add_argument("--data", metavar="URI", default=None,
                        help="prepared shards (jobs/prepare_mars.py), local or s3:// "
                             "(default: the data set the model was trained on, its data.root)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for metrics.json, cmc.png, attention.png, features.parquet")
    parser.add_argument("--fusion-rate", type=float, default=None, metavar="A",
                        help="α in d = d_l + α·d_g (default: the model's eval.fusion_rate)")
    parser.add_argument("--modes", nargs="+", default=list(DISTANCE_MODES), choices=DISTANCE_MODES,
                        help="distances to rank by (default: all)")
    parser.add_argument("--protocol", default=None, choices=PROTOCOLS,
                        help="query/gallery protocol and AP rule: official (the MARS code's trapezoid mAP) "
                             "or torchreid (step mAP) (default: the model's eval.protocol); iLIDS-VID and "
                             "PRID-2011 are always ranked camera 1 against camera 2 (torchreid)")
    parser.add_argument("--save-distances", action="store_true",
                        help="also write distances.npz (the first mode's query x gallery matrix)")
    parser.add_argument("--visualize", type=int, default=None, metavar="K",
                        help="ranked galleries: for 10 sampled queries and the 10 of lowest AP, an image per "
                             "mode of the query's frames and its top-K gallery tracklets (green: a match) in "
                             "OUT/ranked/ (default: the model's eval.visualize, 0: none)")
    parser.add_argument("--set", metavar="KEY=VALUE", dest="overrides", action="append", default=[],
                        help="override an eval or data setting, e.g. --set eval.batch_size=64")
    parser.add_argument("--num-workers", type=positive_int, default=None, metavar="N",
                        help="feature workers, each holding the model (default: one per GPU, else one)")
    parser.add_argument("--endpoint-url", metavar="URL", default=None, type=endpoint_url,
                        help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    require(parser, args, model="--model")
    # read and written by Ray tasks, whose working directory is the cluster's
    args.model, args.data, args.out = map(storage.absolute, (args.model, args.data, args.out))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # torch and Ray: after the arguments, so that --help and a bad flag answer at once
    from stal_ray.evaluate.evaluate import evaluate
    from stal_ray.evaluate.report import METRICS_FILE

    init_ray(args.address)
    try:
        evaluate(args.model, args.data, args.out, config_overrides=args.overrides,
                 fusion_rate=args.fusion_rate, modes=args.modes, protocol=args.protocol,
                 save_distances=args.save_distances, endpoint_url=args.endpoint_url,
                 visualize_top=args.visualize, concurrency=args.num_workers)
    except (ConfigError, StorageError, FileNotFoundError, ValueError) as error:
        print(f"evaluate_mars: error: {error}", file=sys.stderr)
        return 2
    print(storage.join(args.out, METRICS_FILE))  # last line: where the metrics are
    return 0


if __name__ == "__main__":
    sys.exit(main())
