"""data.decode_at = consumer: the stream's rows keep their frames' JPEG bytes (data.pipeline), and the
process that uses the frames (a training worker, data.batches; evaluation's feature actors) decodes them
straight into its batch, then augments there.

On CPU a thread pool decodes (libjpeg-turbo through simplejpeg releases the GIL, as PIL's decode and resize
do: data.images); the output is the stream's to the byte (the same decoder, the same data.clips step, the
same data.augment draws from (seed, epoch, identity, group), whichever batch a group lands in). On a GPU,
when torchvision is installed (an optional dependency: `pip install torchvision` matching torch's CUDA
build), nvJPEG decodes the batch on the device (torchvision.io.decode_jpeg(device="cuda")) and the
augmentation runs there too; nvJPEG's output may differ from libjpeg-turbo's by a few levels
(bench/gpu_items/decode.py measures it), and a batch nvJPEG refuses (a corrupt or non-JPEG frame) is decoded
on the CPU instead.

What travels to the consumer is ~1/8 of the pixels' bytes at 256x128 (docs/decoding.md), and what waits in
its mixing buffer is JPEG, not decoded blocks.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stal_ray.data.stream.augment import Augmentation
from stal_ray.data.stream.clips import clip_rows
from stal_ray.data.stream.frames import to_numpy
from stal_ray.data.stream.images import decode_frames_with_sizes

if TYPE_CHECKING:
    import torch

# frames per decoding call of a thread: few enough that a batch's frames spread over the threads
_FRAMES_PER_CALL = 16


def gpu_decoding_available() -> bool:
    """torchvision (nvJPEG) importable and a CUDA device present."""
    try:
        import torch
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def default_threads() -> int:
    """This process's CPUs, shared with the other GPUs' workers of the node."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import torch
        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    return max(1, cpus // max(1, gpus))


def encoded_rows(block: pa.Table | dict) -> list[dict[str, Any]]:
    """A block of consumer-decoded rows (pyarrow, or Ray's numpy format) -> one dict per row: every column
    as numpy but `frames`, the row's JPEG bytes (memoryviews of one copy per row), `keypoints` (F·42,) in
    stored pixels."""
    if isinstance(block, dict):  # numpy batch format: frames an object array of bytes
        names = [name for name in block if name != "frames"]
        frames = [[bytes(f) for f in row] for row in block["frames"]]
        columns = {name: np.asarray(block[name]) for name in names}
    else:
        flat = pc.list_flatten(block.column("frames").combine_chunks())
        offset_type = np.int64 if pa.types.is_large_binary(flat.type) else np.int32
        offsets = np.frombuffer(flat.buffers()[1], dtype=offset_type)[flat.offset:flat.offset + len(flat) + 1]
        data = memoryview(flat.buffers()[2]).cast("B")
        per_row = len(flat) // max(1, block.num_rows)
        frames = []
        for row in range(block.num_rows):
            # the row's bytes copied out of the block (~1 us a frame), so the block is let go at once: the
            # consumer pins the JPEG of the groups it holds, not whole blocks (docs/decoding.md)
            first = offsets[row * per_row:(row + 1) * per_row + 1]
            own = memoryview(bytes(data[first[0]:first[-1]]))
            frames.append([own[a:b] for a, b in zip((first[:-1] - first[0]).tolist(),
                                                     (first[1:] - first[0]).tolist(), strict=True)])
        # copies (np.array), not views: a view of any column would keep the whole block's memory alive
        columns = {name: np.array(to_numpy(block.column(name))) for name in block.column_names
                   if name != "frames"}
    return [{"frames": frames[row], **{name: values[row] for name, values in columns.items()}}
            for row in range(len(frames))]


class ConsumerDecoder:
    """Decodes rows of encoded_rows (training groups, evaluation chunks) into one batch: uint8 clips
    (rows, *clip_shape, H, W, 3) on `device` (numpy on the CPU, a torch tensor on a GPU) with data.clips's
    keypoints, augmented by `augment` (training). threads: the CPU pool's size (default_threads)."""

    def __init__(self, *, augment: Augmentation | None = None, device: "str | torch.device" = "cpu",
                 threads: int | None = None):
        self.augment = augment
        self.device = str(device)
        self.on_gpu = self.device.startswith("cuda") and gpu_decoding_available()
        self.threads = threads or default_threads()
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode") \
            if self.threads > 1 else None

    @classmethod
    def from_config(cls, config, epoch: int, device: "str | torch.device" = "cpu",
                    threads: int | None = None) -> "ConsumerDecoder":
        """Epoch `epoch`'s augmentation; threads: data.decode_concurrency unless given (null:
        default_threads)."""
        return cls(augment=Augmentation.from_config(config, epoch), device=device,
                   threads=threads or config.data.decode_concurrency)

    def decode_cpu(self, jpegs: list, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """JPEG frames -> `out` (N, H, W, 3) uint8, in the pool's threads: (ok (N,), sizes (N, 2))."""
        ok = np.zeros(len(jpegs), dtype=bool)
        sizes = np.zeros((len(jpegs), 2), dtype=np.int64)
        height, width = out.shape[1:3]

        def part(start: int) -> None:
            stop = min(start + _FRAMES_PER_CALL, len(jpegs))
            _, ok[start:stop], sizes[start:stop] = decode_frames_with_sizes(
                jpegs[start:stop], height, width, out=out[start:stop])

        starts = range(0, len(jpegs), _FRAMES_PER_CALL)
        if self.pool is None:
            for start in starts:
                part(start)
        else:
            list(self.pool.map(part, starts))
        return ok, sizes

    def decode_gpu(self, jpegs: list, height: int,
                   width: int) -> "tuple[torch.Tensor, np.ndarray, np.ndarray]":
        """nvJPEG: (uint8 (N, H, W, 3) on the device, ok, sizes); a batch it refuses goes to decode_cpu."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            images = decode_jpeg([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs],
                                 mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            out = np.empty((len(jpegs), height, width, 3), np.uint8)
            ok, sizes = self.decode_cpu(jpegs, out)
            return torch.from_numpy(out).to(self.device), ok, sizes
        sizes = np.array([image.shape[1:] for image in images], dtype=np.int64)
        out = torch.empty((len(jpegs), height, width, 3), dtype=torch.uint8, device=self.device)
        for index, image in enumerate(images):
            if image.shape[1:] != (height, width):  # bilinear as PIL's, without its reduced-scale draft
                image = torch.nn.functional.interpolate(image[None].float(), size=(height, width),
                                                        mode="bilinear", antialias=True)[0]
                image = image.round_().clamp_(0, 255).to(torch.uint8)
            out[index] = image.permute(1, 2, 0)
        return out, np.ones(len(jpegs), dtype=bool), sizes

    def __call__(self, rows: list[dict[str, Any]], clip_shape: tuple[int, ...], *,
                 out: np.ndarray | None = None) -> dict[str, Any]:
        """rows (encoded_rows) -> data.clips's dict (clips, keypoints, has_keypoints, corrupt_frames) for
        the batch, augmented; out: a uint8 (rows·F, H, W, 3) array to decode into on the CPU."""
        height, width = int(rows[0]["height"]), int(rows[0]["width"])
        jpegs = [frame for row in rows for frame in row["frames"]]
        if self.on_gpu:
            images, ok, sizes = self.decode_gpu(jpegs, height, width)
        else:
            images = out if out is not None else np.empty((len(jpegs), height, width, 3), np.uint8)
            ok, sizes = self.decode_cpu(jpegs, images)
        batch = clip_rows(images, ok, sizes, np.stack([row["keypoints"] for row in rows]), rows=len(rows),
                          clip_shape=clip_shape)
        if self.augment is not None:
            identities = np.array([int(row["identity"]) for row in rows])
            groups = np.array([int(row["group"]) for row in rows])
            batch["clips"], batch["keypoints"] = self.augment(batch["clips"], batch["keypoints"], identities,
                                                              groups)
        return batch
