"""Turn a MARS, iLIDS-VID or PRID-2011 release into Parquet shards and a manifest (data/shards.py)."""

import argparse
import sys

from stal_ray.data.prepared.prepare import add_shard_arguments, check_shard_arguments, prepare
from stal_ray.data.releases.registry import DATASETS, read_release


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, metavar="DIR",
                        help="the release as shipped: mars (bbox_train/, bbox_test/, info/), ilidsvid (the "
                             "folder holding i-LIDS-VID/ and 'train-test people splits/'), prid2011 (the "
                             "folder holding prid_2011/)")
    parser.add_argument("--split", type=int, default=None, metavar="K",
                        help="ilidsvid, prid2011: which of the 10 train/test splits (0..9, default 0)")
    parser.add_argument("--split-file", metavar="FILE", default=None,
                        help="prid2011: splits in torchreid's splits_prid2011.json format (default: "
                             "<out>/splits_prid2011.json, written from 10 seeded splits on first use)")
    add_shard_arguments(parser)
    args = parser.parse_args(argv)
    if args.dataset == "mars" and (args.split is not None or args.split_file is not None):
        parser.error("--split and --split-file are for ilidsvid and prid2011; MARS has one fixed split")
    if args.dataset != "prid2011" and args.split_file is not None:
        parser.error("--split-file is for prid2011; iLIDS-VID's split file is part of its release")
    if args.split is not None and not 0 <= args.split:
        parser.error(f"--split must be >= 0, got {args.split}")
    check_shard_arguments(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def read():
        return read_release(args.dataset, args.root, split=args.split or 0, split_file=args.split_file,
                            out=args.out, endpoint_url=args.endpoint_url)

    split = None if args.dataset == "mars" else args.split or 0
    return prepare("prepare_data", read, args, dataset=args.dataset, split=split)


if __name__ == "__main__":
    sys.exit(main())
