"""Comparison: part boxes (Eq. 7) from BlazePose's estimated joints vs the synthetic release's ground truth,
against the `prior` pose's boxes (the fixed canonical pose) vs the same ground truth.

Frames of the synthetic release at MARS's 256x128 with their ground-truth joints (info/keypoints.parquet);
junk and distractor frames (no person) left out. Ground-truth boxes are Eq. 7 of the true joints that are
visible (occluded ones have confidence 0; a part with none takes the prior box, as in training); estimated
boxes are Eq. 7 of the model's joints (confidence > --min-confidence). Prints mean IoU per part and writes
JSON under bench/results/. No Ray: `python bench/pose_boxes.py` (needs the pose extra).
"""

import argparse
import glob
import json
import os
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from stal_ray.core.skeleton import PART_NAMES
from stal_ray.data.synthetic.generator import write_synthetic_release
from stal_ray.model.parts import canonical_joints, part_boxes
from stal_ray.pose.models import decode, estimator, load_model


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes -> (...) intersection over union."""
    low, high = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    area = lambda box: (box[..., 2:] - box[..., :2]).prod(-1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="frames compared at most (default: 300)")
    parser.add_argument("--min-confidence", type=float, default=0.0,
                        help="estimated joints below this confidence count as not found (default: 0, as in "
                             "training: Eq. 7 uses every joint of confidence > 0)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    height, width = 256, 128
    with tempfile.TemporaryDirectory() as folder:
        release = write_synthetic_release(f"{folder}/release", identities=8, test_identities=4,
                                          height=height, width=width, junk_tracklets=0,
                                          distractor_tracklets=0, progress=False)
        table = pq.read_table(f"{release}/info/keypoints.parquet").to_pydict()
        truth = dict(zip(table["name"], table["keypoints"], strict=True))
        files = sorted(glob.glob(f"{release}/bbox_*/*/*.jpg"))
        files = [f for f in files if np.asarray(truth[os.path.basename(f)])[2::3].max() > 0]
        files = [files[i] for i in np.linspace(0, len(files) - 1, min(args.frames, len(files))).astype(int)]
        model = load_model()
        run = estimator(model)
        start = time.perf_counter()
        estimated = torch.from_numpy(run([decode(open(f, "rb").read()) for f in files]))
        seconds = time.perf_counter() - start
    true = torch.tensor(np.array([truth[os.path.basename(f)] for f in files]), dtype=torch.float32)
    true = true.view(-1, 14, 3)
    estimated[..., 2] = torch.where(estimated[..., 2] >= args.min_confidence, estimated[..., 2], 0.0)
    size = (height, width)
    true_boxes = part_boxes(true, size)
    prior_boxes = part_boxes(canonical_joints(size).expand(len(files), -1, -1), size)
    rows = {"estimated": iou(part_boxes(estimated, size), true_boxes).mean(0),
            "prior": iou(prior_boxes, true_boxes).mean(0)}
    print(f"{len(files)} synthetic frames of {height}x{width}, {model.name} "
          f"({seconds / len(files) * 1e3:.1f} ms/frame), joints below confidence {args.min_confidence} "
          "unused; mean IoU with the ground-truth part boxes (Eq. 7):")
    print(f"{'boxes from':<12}" + "".join(f"{name:>11}" for name in PART_NAMES) + f"{'mean':>9}")
    for name, values in rows.items():
        print(f"{name:<12}" + "".join(f"{v:>11.3f}" for v in values.tolist()) + f"{values.mean():>9.3f}")
    joint_error = ((estimated[..., :2] - true[..., :2]).norm(dim=-1) / height)
    seen = (true[..., 2] > 0) & (estimated[..., 2] > 0)
    print(f"median joint error where both see it: {joint_error[seen].median() * 100:.1f}% of the frame "
          f"height; {seen.float().mean() * 100:.0f}% of joint slots")
    result = {"frames": len(files), "model": model.describe(), "min_confidence": args.min_confidence,
              "parts": list(PART_NAMES), **{name: values.tolist() for name, values in rows.items()},
              "median_joint_error_of_height": float(joint_error[seen].median())}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "pose_boxes.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
