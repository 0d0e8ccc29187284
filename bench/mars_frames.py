"""Distinct MARS-size frames for benchmarks: 256x128 JPEGs of 10-15 KB, like the release's.

The synthetic renderer's pedestrians (stal_ray.data.synthetic.generator, ~8 KB at 256x128) with sensor-like
noise (sigma 8), re-encoded at quality 90: ~11.5 KiB mean, within MARS's range, and different in every frame.
"""

import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from stal_ray.data.synthetic.generator import write_synthetic_release

HEIGHT, WIDTH = 256, 128


def frame_pool(count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct 256x128 JPEGs (rendered ~2 ms each on one core, re-encoded ~1 ms)."""
    frames_per_tracklet = 20
    identities = max(2, -(-count // (3 * frames_per_tracklet)) + 1)  # ~3 tracklets per identity
    rng = np.random.default_rng(seed)
    out = []
    with tempfile.TemporaryDirectory(prefix="stal-frame-pool-") as folder:
        release = write_synthetic_release(
            str(Path(folder) / "release"), identities=identities, test_identities=1,
            frames_per_tracklet=(frames_per_tracklet, frames_per_tracklet), height=HEIGHT, width=WIDTH,
            junk_tracklets=0, distractor_tracklets=0, seed=seed, progress=False)
        for path in sorted(Path(release).glob("bbox_*/*/*.jpg"))[:count]:
            pixels = np.asarray(Image.open(path), dtype=np.float64) + rng.normal(0, 8, (HEIGHT, WIDTH, 3))
            buffer = io.BytesIO()
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
            out.append(buffer.getvalue())
    if len(out) < count:
        raise RuntimeError(f"rendered {len(out)} frames, wanted {count}")
    return out
