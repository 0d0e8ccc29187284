"""What every prepare job shares: the shard-writing options, the write itself and its printed summary."""

import argparse
import logging
import sys
from collections.abc import Callable

from stal_ray.data.prepared import pollution, protocol
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.base import Release, ReleaseFormatError
from stal_ray.data.releases.frame_check import MAX_BAD_FRACTION
from stal_ray.data.source import endpoint_url

_BAD_SHOWN = 20  # bad frames listed in the summary; the manifest lists them all


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    """--out, --keypoints, --endpoint-url, --overwrite, --drop-previous, --target-file-mb, --max-bad-frames,
    --pollute and --pollute-seed."""
    parser.add_argument("--out", required=True, metavar="URI",
                        help="output folder or s3://bucket/prefix, one per data set (and split); each "
                             "prepare publishes a new version there (versions/<ID>/) by swapping "
                             "current.json, so readers see the old or the new data set whole")
    parser.add_argument("--keypoints", metavar="FILE", default=None,
                        help="Parquet file of keypoints by frame name (default: the release's "
                             "info/keypoints.parquet when present, else none)")
    parser.add_argument("--endpoint-url", metavar="URL", default=None, type=endpoint_url,
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or STAL_S3_ENDPOINT, else "
                             "AWS); credentials come from the usual AWS environment variables")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild even when --out already holds a complete data set")
    parser.add_argument("--drop-previous", action="store_true",
                        help="remove the version this prepare replaces right after the swap (default: keep "
                             "it until the next prepare, so jobs still reading it finish)")
    parser.add_argument("--target-file-mb", metavar="N", type=float, default=128,
                        help="approximate size of one shard file in MiB (default: 128)")
    parser.add_argument("--max-bad-frames", metavar="FRACTION", type=float, default=MAX_BAD_FRACTION,
                        help="zero-byte, truncated or non-JPEG frames are left out of their tracklets and "
                             "listed; above this share of all frames the run is refused (default: "
                             f"{MAX_BAD_FRACTION})")
    parser.add_argument("--pollute", action="store_true",
                        help="the paper's polluted data (Table VII): a black box of 25x25 pixels per 128x64 "
                             "frame (scaled to the frame size) at a random place in every training and test "
                             "frame, recorded in the manifest")
    parser.add_argument("--pollute-seed", type=int, default=0, metavar="N",
                        help="with --pollute: the seed of the boxes' places (default: 0)")


def check_shard_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.target_file_mb <= 0:
        parser.error(f"--target-file-mb must be > 0, got {args.target_file_mb}")
    if not 0 <= args.max_bad_frames <= 1:
        parser.error(f"--max-bad-frames must be a fraction in [0, 1], got {args.max_bad_frames}")
    if args.pollute_seed != 0 and not args.pollute:
        parser.error("--pollute-seed needs --pollute")


def prepare(job: str, read_release: Callable[[], Release], args: argparse.Namespace, *,
            dataset: str = "mars", split: int | None = None) -> int:
    """Read the release, write its shards as add_shard_arguments' options say, print the summary; 2 with one
    line naming the problem when the release or the storage is at fault. The manifest describes the data
    set as `dataset` (split `split`) with its protocol (stal_ray.data.prepared.protocol) and pollution."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    described = protocol.describe(dataset, split,
                                  pollution.settings(args.pollute_seed) if args.pollute else None)
    try:
        manifest = write_shards(read_release(), args.out, keypoints=args.keypoints, overwrite=args.overwrite,
                                target_file_bytes=max(1, int(args.target_file_mb * 2**20)),
                                endpoint_url=args.endpoint_url, progress=sys.stderr.isatty(),
                                max_bad_fraction=args.max_bad_frames, keep_previous=not args.drop_previous,
                                dataset=described)
    except (ReleaseFormatError, OSError) as error:  # StorageError is an OSError; all are the user's to fix
        print(f"{job}: error: {error}", file=sys.stderr)
        return 2
    # the fingerprint covers the release's index and keypoints, not its image bytes (reading MARS twice to
    # find nothing to do): frames changed in place need --overwrite, and the message says so
    state = ("already up to date, nothing written (same release index and keypoints; frame bytes are not "
             "compared: after changing frames, pass --overwrite)") if manifest.reused else "written"
    print(f"{args.out}: {state} (version {manifest.version})")
    print(f"  {protocol.NAMES[dataset]}{'' if split is None else f' split {split}'}: queries are "
          f"{described['query']}, the gallery {described['gallery']}"
          + (f"; polluted (seed {args.pollute_seed}): {described['pollution']['what']}"
             if args.pollute else ""))
    for split, counts in manifest.counts.items():
        files = manifest.files[split]
        queries = f" ({counts['queries']} queries)" if "queries" in counts else ""
        print(f"  {split}: {counts['identities']} identities, {counts['tracklets']} tracklets{queries}, "
              f"{counts['frames']} frames ({counts['frames_with_keypoints']} with keypoints, "
              f"{counts.get('bad_frames', 0)} bad frames left out) in "
              f"{len(files)} files, {sum(f.bytes for f in files) / 2**20:.1f} MiB")
    bad = manifest.bad_frames
    if bad:
        print(f"  {len(bad)} bad frames left out of their tracklets (the manifest's bad_frames lists all):")
        for entry in bad[:_BAD_SHOWN]:
            print(f"    {entry['path']} ({entry['split']} track table row {entry['tracklet'] + 1}): "
                  f"{entry['problem']}")
        if len(bad) > _BAD_SHOWN:
            print(f"    ... and {len(bad) - _BAD_SHOWN} more")
    return 0
