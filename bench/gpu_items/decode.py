"""Item `decode` of bench/gpu_check.py: data.decode_at = consumer's decoders, nvJPEG against libjpeg-turbo.

The same MARS-size frames (bench/mars_frames.py, 256x128 JPEG) decoded by data.consumer.ConsumerDecoder:
on the CPU (its thread pool over simplejpeg, what the stream's tasks decode with too) and on the GPU with
nvJPEG (torchvision.io.decode_jpeg(device="cuda")), at 256x128 (no resize) and 224x224 (resized: PIL's
reduced-scale draft and bilinear on the CPU, torch's antialiased bilinear on the GPU). Rows: frames/s of
each; the GPU's output against the CPU's in levels (max and mean absolute difference). nvJPEG's IDCT and
chroma upsampling are not libjpeg-turbo's, so a few levels apart are expected; the goal is on the mean.
Without torchvision (an optional dependency) or a GPU the check says so.
"""

import time

import numpy as np

from bench.gpu_items.common import ItemResult, Profile, verdict

MEAN_GOAL = 1.0  # mean absolute difference in levels at 256x128, nvJPEG against libjpeg-turbo
SIZES = ((256, 128), (224, 224))


def run(result: ItemResult, profile: Profile, args) -> None:
    from bench.mars_frames import frame_pool
    from stal_ray.data.stream.consumer import ConsumerDecoder, gpu_decoding_available

    frames = frame_pool(64 if args.quick else 1024)
    cpu = ConsumerDecoder()
    on_cpu = {}
    for height, width in SIZES:
        out = np.empty((len(frames), height, width, 3), np.uint8)
        cpu.decode_cpu(frames[:8], out[:8])  # the pool's threads started
        start = time.perf_counter()
        ok, _ = cpu.decode_cpu(frames, out)
        seconds = time.perf_counter() - start
        assert ok.all()
        on_cpu[height, width] = out
        result.row(name=f"CPU, {cpu.threads} threads, {height}x{width}", frames=len(frames), seconds=seconds,
                   frames_per_s=len(frames) / seconds)
    if args.device != "cuda":
        result.check("nvJPEG against libjpeg-turbo", "-", "-", "n/a on cpu")
        return
    if not gpu_decoding_available():
        result.check("nvJPEG against libjpeg-turbo", "-", "-",
                     "skipped: torchvision is not installed (pip install torchvision, torch's CUDA build)")
        return
    import torch

    gpu = ConsumerDecoder(device="cuda")
    for height, width in SIZES:
        gpu.decode_gpu(frames[:8], height, width)  # nvJPEG's handle and first kernels
        torch.cuda.synchronize()
        start = time.perf_counter()
        images, ok, _ = gpu.decode_gpu(frames, height, width)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        difference = np.abs(images.cpu().numpy().astype(np.int16) - on_cpu[height, width].astype(np.int16))
        result.row(name=f"nvJPEG, {height}x{width}", frames=len(frames), seconds=seconds,
                   frames_per_s=len(frames) / seconds, max_abs_levels=int(difference.max()),
                   mean_abs_levels=float(difference.mean()),
                   share_over_2_levels=float((difference > 2).mean()))
        if (height, width) == SIZES[0]:
            result.check("nvJPEG against libjpeg-turbo at 256x128 (mean |difference|, levels)",
                         f"{difference.mean():.2f} (max {difference.max()})", f"< {MEAN_GOAL}",
                         verdict(difference.mean() < MEAN_GOAL))
