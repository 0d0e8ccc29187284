"""Turn a MARS release into Parquet shards and a manifest on local disk or s3://
(stal_ray/data/prepared/shards.py)."""

import argparse
import sys

from stal_ray.core.flags import add_deprecated, require
from stal_ray.data.prepare import add_shard_arguments, check_shard_arguments, prepare
from stal_ray.data.releases.mars import read_mars


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", metavar="DIR", default=None,
                        help="the MARS release as shipped: bbox_train/, bbox_test/, info/ (required)")
    add_deprecated(parser, "--mars-root", "--root", dest="root")
    add_shard_arguments(parser)
    args = parser.parse_args(argv)
    require(parser, args, root="--root")
    check_shard_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return prepare("prepare_mars", lambda: read_mars(args.root), args)


if __name__ == "__main__":
    sys.exit(main())
