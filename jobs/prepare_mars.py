"""Turn a MARS release into Parquet shards and a manifest on local disk or s3:// (stal_ray/data/shards.py)."""

import argparse
import logging
import sys

from stal_ray.data.mars import MarsFormatError, read_mars
from stal_ray.data.shards import write_shards
from stal_ray.data.source import endpoint_url


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mars-root", required=True, metavar="DIR",
                        help="the MARS release as shipped: bbox_train/, bbox_test/, info/")
    parser.add_argument("--out", required=True, metavar="URI",
                        help="output folder or s3://bucket/prefix; complete once manifest.json is there")
    parser.add_argument("--keypoints", metavar="FILE", default=None,
                        help="Parquet file of keypoints by frame name (default: the release's "
                             "info/keypoints.parquet when present, else none)")
    parser.add_argument("--endpoint-url", metavar="URL", default=None, type=endpoint_url,
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or STAL_S3_ENDPOINT, else "
                             "AWS); credentials come from the usual AWS environment variables")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even when --out already holds a complete data set")
    parser.add_argument("--target-file-mb", metavar="N", type=float, default=128,
                        help="approximate size of one shard file in MiB (default: 128)")
    args = parser.parse_args(argv)
    if args.target_file_mb <= 0:
        parser.error(f"--target-file-mb must be > 0, got {args.target_file_mb}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        release = read_mars(args.mars_root)
        manifest = write_shards(release, args.out, keypoints=args.keypoints, overwrite=args.overwrite,
                                target_file_bytes=max(1, int(args.target_file_mb * 2**20)),
                                endpoint_url=args.endpoint_url, progress=sys.stderr.isatty())
    except (MarsFormatError, OSError) as error:  # StorageError is an OSError; all are the user's to fix
        print(f"prepare_mars: error: {error}", file=sys.stderr)
        return 2
    print(f"{args.out}: {'already up to date, nothing written' if manifest.reused else 'written'}")
    for split, counts in manifest.counts.items():
        files = manifest.files[split]
        queries = f" ({counts['queries']} queries)" if "queries" in counts else ""
        print(f"  {split}: {counts['identities']} identities, {counts['tracklets']} tracklets{queries}, "
              f"{counts['frames']} frames ({counts['frames_with_keypoints']} with keypoints) in "
              f"{len(files)} files, {sum(f.bytes for f in files) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
