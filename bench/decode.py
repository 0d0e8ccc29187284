"""Benchmark: JPEG decoders on MARS-size frames (256x128, ~13 KB), frames per CPU-second of one core.

PIL (the decoder before libjpeg-turbo: draft, convert, bilinear resize), simplejpeg alone, PyTurboJPEG
alone when it is installed (it needs the system's libturbojpeg), and stal_ray's decoder
(data.images.decode_frames: simplejpeg, PIL's resize, PIL as the fallback), to the stored size (ResNet-50's
256x128: no resize) and to BN-Inception's 224x224. The same frames in memory for all, interleaved rounds,
the median round reported; the output of stal_ray's decoder is compared with PIL's (max abs difference).

    python bench/decode.py --frames 2000 --rounds 5
"""

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.mars_frames import frame_pool  # noqa: E402
from stal_ray.data.stream.images import decode_frames  # noqa: E402


def pil_decode(jpeg: bytes, height: int, width: int) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as image:
        image.draft("RGB", (width, height))
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(image)


def _turbojpeg():
    """PyTurboJPEG's decoder, or None (not installed, or no libturbojpeg on the system)."""
    try:
        from turbojpeg import TurboJPEG

        return TurboJPEG()
    except (ImportError, RuntimeError, OSError) as error:
        print(f"PyTurboJPEG not measured: {error}")
        return None


TURBO = _turbojpeg()


def decoders(height: int, width: int) -> dict:
    """name -> function(list of JPEG bytes) decoding each frame to (height, width) or, marked, stored size."""
    out = {
        "PIL": lambda frames: [pil_decode(f, height, width) for f in frames],
        "simplejpeg (stored size)": lambda frames: [simplejpeg.decode_jpeg(f, "RGB") for f in frames],
        "stal_ray data.images": lambda frames: decode_frames(frames, height, width),
    }
    if TURBO is not None:
        from turbojpeg import TJPF_RGB

        out["PyTurboJPEG (stored size)"] = lambda frames: [TURBO.decode(f, pixel_format=TJPF_RGB)
                                                           for f in frames]
    return out


def measure(frames: list[bytes], height: int, width: int, rounds: int) -> dict:
    runs: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, decode in decoders(height, width).items():
            start = time.process_time()
            decode(frames)
            runs.setdefault(name, []).append(time.process_time() - start)
    return {name: len(frames) / statistics.median(seconds) for name, seconds in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000, help="distinct frames decoded per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/decode.json")
    args = parser.parse_args()

    frames = frame_pool(args.frames)
    mean_kb = float(np.mean([len(f) for f in frames])) / 1024
    result = {"frames": len(frames), "mean_jpeg_kib": mean_kb, "targets": {}}
    print(f"{len(frames)} distinct 256x128 JPEG frames, {mean_kb:.1f} KiB mean; frames per CPU-second of "
          "one core, and over PIL's")
    print(f"{'decoder':<28}{'to 256x128':>14}{'to 224x224':>14}")
    for height, width in ((256, 128), (224, 224)):
        rates = measure(frames, height, width, args.rounds)
        mine, _ = decode_frames(frames, height, width)
        diff = max(int(np.abs(mine[i].astype(np.int16) - pil_decode(f, height, width)).max())
                   for i, f in enumerate(frames))
        result["targets"][f"{height}x{width}"] = {"frames_per_core_s": rates, "max_abs_diff_vs_pil": diff}
    table = result["targets"]
    for name in table["256x128"]["frames_per_core_s"]:
        cells = []
        for target in ("256x128", "224x224"):
            rate = table[target]["frames_per_core_s"][name]
            cells.append(f"{rate:>7.0f} {rate / table[target]['frames_per_core_s']['PIL']:>4.2f}x")
        print(f"{name:<28}{cells[0]:>14}{cells[1]:>14}")
    print("stal_ray decoder vs PIL, max abs pixel difference: "
          + ", ".join(f"{t} {v['max_abs_diff_vs_pil']}" for t, v in table.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
