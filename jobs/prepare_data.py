"""Turn a MARS, iLIDS-VID or PRID-2011 release into Parquet shards and a manifest (data/shards.py)."""

import argparse
import logging
import sys

from stal_ray.data.frame_check import MAX_BAD_FRACTION
from stal_ray.data.mars import MarsFormatError
from stal_ray.data.releases import DATASETS, read_release
from stal_ray.data.shards import write_shards


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, metavar="DIR",
                        help="the release as shipped: mars (bbox_train/, bbox_test/, info/), ilidsvid (the "
                             "folder holding i-LIDS-VID/ and 'train-test people splits/'), prid2011 (the "
                             "folder holding prid_2011/)")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="output folder or s3://bucket/prefix, one per data set and split")
    parser.add_argument("--split", type=int, default=None, metavar="K",
                        help="ilidsvid, prid2011: which of the 10 train/test splits (0..9, default 0)")
    parser.add_argument("--split-file", metavar="FILE", default=None,
                        help="prid2011: splits in torchreid's splits_prid2011.json format (default: "
                             "<out>/splits_prid2011.json, written from 10 seeded splits on first use)")
    parser.add_argument("--keypoints", metavar="FILE", default=None,
                        help="Parquet file of keypoints by frame file name (MARS default: "
                             "info/keypoints.parquet when present)")
    parser.add_argument("--endpoint-url", metavar="URL", default=None, help="S3-compatible endpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even when --out already holds a complete data set")
    parser.add_argument("--drop-previous", action="store_true",
                        help="remove the version this prepare replaces right after the swap")
    parser.add_argument("--target-file-mb", metavar="N", type=float, default=128,
                        help="approximate size of one shard file in MiB (default: 128)")
    parser.add_argument("--max-bad-frames", metavar="FRACTION", type=float, default=MAX_BAD_FRACTION,
                        help="share of bad frames above which the run is refused (default: "
                             f"{MAX_BAD_FRACTION})")
    args = parser.parse_args(argv)
    if args.dataset == "mars" and (args.split is not None or args.split_file is not None):
        parser.error("--split and --split-file are for ilidsvid and prid2011; MARS has one fixed split")
    if args.dataset != "prid2011" and args.split_file is not None:
        parser.error("--split-file is for prid2011; iLIDS-VID's split file is part of its release")
    if args.split is not None and not 0 <= args.split:
        parser.error(f"--split must be >= 0, got {args.split}")
    if args.target_file_mb <= 0:
        parser.error(f"--target-file-mb must be > 0, got {args.target_file_mb}")
    if not 0 <= args.max_bad_frames <= 1:
        parser.error(f"--max-bad-frames must be a fraction in [0, 1], got {args.max_bad_frames}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        release = read_release(args.dataset, args.root, split=args.split or 0, split_file=args.split_file,
                               out=args.out, endpoint_url=args.endpoint_url)
        manifest = write_shards(release, args.out, keypoints=args.keypoints, overwrite=args.overwrite,
                                target_file_bytes=max(1, int(args.target_file_mb * 2**20)),
                                endpoint_url=args.endpoint_url, progress=sys.stderr.isatty(),
                                max_bad_fraction=args.max_bad_frames, keep_previous=not args.drop_previous)
    except (MarsFormatError, OSError) as error:  # StorageError is an OSError; all are the user's to fix
        print(f"prepare_data: error: {error}", file=sys.stderr)
        return 2
    state = "already up to date, nothing written" if manifest.reused else "written"
    print(f"{args.out}: {args.dataset} {state} (version {manifest.version})")
    for split, counts in manifest.counts.items():
        queries = f" ({counts['queries']} queries)" if "queries" in counts else ""
        print(f"  {split}: {counts['identities']} identities, {counts['tracklets']} tracklets{queries}, "
              f"{counts['frames']} frames ({counts.get('bad_frames', 0)} bad frames left out) in "
              f"{len(manifest.files[split])} files")
    for entry in manifest.bad_frames[:20]:
        print(f"    bad frame {entry['path']}: {entry['problem']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
