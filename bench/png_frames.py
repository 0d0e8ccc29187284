"""Benchmark: re-encoding PNG frames (iLIDS-VID, PRID-2011) as JPEG at prepare time, against keeping PNG.

Frames of the synthetic release rendered at 64x128 (the releases' size) with sensor-like noise (sigma 3),
saved as PNG. Reports bytes per frame of each format, the re-encoding time per frame (png_release.py, one
core), the mean absolute pixel error it costs, and the decoding time per frame of each format to the
training input size (images.decode_frame, as every epoch pays it). No Ray: `python bench/png_frames.py`.
"""

import argparse
import glob
import io
import tempfile
import time

import numpy as np
from PIL import Image

from stal_ray.data.releases.png_release import png_to_jpeg
from stal_ray.data.stream.images import decode_frame
from stal_ray.data.synthetic.generator import write_synthetic_release


def per_frame_ms(function, frames) -> float:
    start = time.perf_counter()
    for frame in frames:
        function(frame)
    return (time.perf_counter() - start) / len(frames) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=600, help="frames measured at most (default: 600)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        release = write_synthetic_release(f"{folder}/release", identities=8, test_identities=4, height=128,
                                          width=64, progress=False)
        files = sorted(glob.glob(f"{release}/bbox_*/*/*.jpg"))[: args.frames]
        rng = np.random.default_rng(0)
        pngs = []
        for path in files:
            pixels = np.asarray(Image.open(path).convert("RGB").resize((64, 128)), np.float64)
            pixels = np.clip(pixels + rng.normal(0, 3, pixels.shape), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            pngs.append(buffer.getvalue())
    encode_ms = per_frame_ms(png_to_jpeg, pngs)
    jpegs = [png_to_jpeg(png) for png in pngs]
    error = np.mean([np.abs(np.asarray(Image.open(io.BytesIO(j)), np.float64)
                            - np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), np.float64)).mean()
                     for p, j in zip(pngs, jpegs, strict=True)])
    print(f"{len(pngs)} frames 64x128: PNG {np.mean([len(p) for p in pngs]) / 1024:.1f} KiB, JPEG "
          f"{np.mean([len(j) for j in jpegs]) / 1024:.1f} KiB per frame")
    print(f"re-encode PNG -> JPEG: {encode_ms:.2f} ms/frame; mean absolute pixel error {error:.2f} of 255")
    for height, width in ((256, 128), (224, 224)):
        png_ms, jpeg_ms = (per_frame_ms(lambda f: decode_frame(f, height, width), frames)  # noqa: B023
                           for frames in (pngs, jpegs))
        print(f"decode to {height}x{width}: PNG {png_ms:.2f} ms/frame, JPEG {jpeg_ms:.2f} ms/frame")


if __name__ == "__main__":
    main()
