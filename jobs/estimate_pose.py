"""Estimate the 14 joints of every frame of a prepared data set with a pretrained pose model and add them to
it in place (stal_ray/pose/annotate.py), so that model.pose_source=keypoints and the keypoint supervision of
the learned pose head work on it. Needs the `pose` extra: pip install -e ".[pose]"."""

import argparse
import logging
import sys

from stal_ray.core.flags import add_deprecated
from stal_ray.core.storage import StorageError, absolute
from stal_ray.data.prepared.handle import PreparedData
from stal_ray.data.source import endpoint_url
from stal_ray.ray_init import add_ray_arguments, init_ray


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from stal_ray.pose.models import BLAZEPOSE

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, metavar="URI",
                        help="the prepared data set (jobs/prepare_mars.py --out), local path or s3:// URL")
    parser.add_argument("--model", default=BLAZEPOSE, metavar="NAME|PATH",
                        help=f"{BLAZEPOSE} (default; BlazePose on CPU, weights from the mediapipe wheel), or "
                             "a path or URL of a .onnx SimCC top-down model (e.g. an RTMPose export; GPU "
                             "with onnxruntime-gpu) or of a .tflite BlazePose landmark model")
    parser.add_argument("--use-gpu", action="store_true",
                        help="one GPU per model worker (--num-gpus 1; default: CPU workers, one per CPU)")
    parser.add_argument("--num-gpus", type=float, default=None, metavar="F",
                        help="the GPU share of each model worker, for several workers on one GPU (e.g. 0.5; "
                             "Ray's num_gpus of the actors; default: 1 with --use-gpu, else 0)")
    parser.add_argument("--num-workers", type=int, default=None, metavar="N",
                        help="model workers (default: one per GPU with --use-gpu, else one per CPU)")
    add_deprecated(parser, "--workers", "--num-workers", dest="num_workers", type=int)
    parser.add_argument("--endpoint-url", default=None, metavar="URL", type=endpoint_url,
                        help="S3-compatible endpoint for s3:// URIs (e.g. MinIO)")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    if args.num_gpus is None:
        args.num_gpus = 1.0 if args.use_gpu else 0.0
    if args.num_gpus < 0:
        parser.error(f"--num-gpus must be >= 0, got {args.num_gpus}")
    if args.num_workers is not None and args.num_workers < 1:
        parser.error(f"--num-workers must be >= 1, got {args.num_workers}")
    args.data = absolute(args.data)  # Ray tasks run in the cluster's working directory
    if "://" not in args.model and args.model.endswith((".onnx", ".tflite")):
        args.model = absolute(args.model)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from stal_ray.pose.annotate import estimate_pose
    from stal_ray.pose.models import UnknownModelError, load_model

    try:
        model = load_model(args.model, endpoint_url=args.endpoint_url)
        init_ray(args.address)
        data = PreparedData.read(args.data, endpoint_url=args.endpoint_url)
        result = estimate_pose(data, model, workers=args.num_workers, num_gpus=args.num_gpus)
    except (UnknownModelError, StorageError) as error:
        print(f"estimate_pose: error: {error}", file=sys.stderr)
        return 2
    manifest = result.manifest
    if result.reused:
        print(f"{args.data}: already has the joints of {model.name} (version {manifest.version}); nothing "
              "written")
        return 0
    frames = sum(result.frames.values())
    kept = f", {result.resumed_shards} shards kept from an interrupted run" if result.resumed_shards else ""
    print(f"{args.data}: joints of {model.name} written (version {manifest.version}); {frames} frames in "
          f"{result.seconds:.1f} s ({frames / max(result.seconds, 1e-9):.1f} frames/s){kept}")
    for split, counts in manifest.counts.items():
        print(f"  {split}: {counts['frames_with_keypoints']} of {counts['frames']} frames with joints, "
              f"{counts['pose_unreadable_frames']} unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
