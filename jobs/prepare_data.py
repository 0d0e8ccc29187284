"""Turn a MARS, iLIDS-VID or PRID-2011 release into Parquet shards and a manifest (data/shards.py)."""

import argparse
import sys

from stal_ray.data.prepare import add_shard_arguments, check_shard_arguments, prepare
from stal_ray.data.releases.registry import DATASETS, REGISTRY, read_release

SPLIT = [spec for spec in REGISTRY.values() if spec.splits]  # those with numbered splits
SPLIT_FILE = [spec for spec in SPLIT if spec.split_file]  # those that take --split-file


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, metavar="DIR",
                        help="the release as shipped: " + ", ".join(f"{spec.name} ({spec.root_help})"
                                                                    for spec in REGISTRY.values()))
    parser.add_argument("--split", type=int, default=None, metavar="K", help=_split_help())
    parser.add_argument("--split-file", metavar="FILE", default=None, help=_split_file_help())
    add_shard_arguments(parser)
    args = parser.parse_args(argv)
    spec = REGISTRY[args.dataset]
    if not spec.splits and (args.split is not None or args.split_file is not None):
        parser.error(f"--split and --split-file are for {' and '.join(s.name for s in SPLIT)}; {spec.title} "
                     "has one fixed split")
    if not spec.split_file and args.split_file is not None:
        parser.error(f"--split-file is for {' and '.join(s.name for s in SPLIT_FILE)}; {spec.title}'s split "
                     "file is part of its release")
    if args.split is not None and not 0 <= args.split:
        parser.error(f"--split must be >= 0, got {args.split}")
    check_shard_arguments(parser, args)
    return args


def _split_help() -> str:
    by_count = {}  # data sets by their number of splits
    for spec in SPLIT:
        by_count.setdefault(spec.splits, []).append(spec.name)
    return "; ".join(f"{', '.join(names)}: which of the {count} train/test splits (0..{count - 1}, default 0)"
                     for count, names in by_count.items())


def _split_file_help() -> str:
    return "; ".join(f"{spec.name}: splits in torchreid's {spec.split_file} format (default: "
                     f"<out>/{spec.split_file}, written from {spec.splits} seeded splits on first use)"
                     for spec in SPLIT_FILE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def read():
        return read_release(args.dataset, args.root, split=args.split or 0, split_file=args.split_file,
                            out=args.out, endpoint_url=args.endpoint_url)

    split = args.split or 0 if REGISTRY[args.dataset].splits else None
    return prepare("prepare_data", read, args, dataset=args.dataset, split=split)


if __name__ == "__main__":
    sys.exit(main())
