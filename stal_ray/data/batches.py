"""The trainer's side of the training stream: groups of K clips (data.pipeline.training_dataset) into
batches of P groups of P distinct identities, as torch tensors.

Groups are mixed in a buffer of views into whole blocks, a group whose identity is already in the batch
being filled waits for a later one, and batch memory is recycled (RecycledBuffers) rather than fresh every
batch.
"""

import sys
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

    from stal_ray.model.preprocess import Preprocess


class TrainingBatches:
    """Iterable of training batches of P groups of P distinct identities from a training dataset or a
    streaming_split shard of one; counts the groups skipped for corrupt frames.

    Each batch: clips float (P·K, T, 3, H, W) as `preprocess` (model.preprocess) makes them, labels (P·K,)
    int64, identities
    (P·K,), tracklets (P·K,), keypoints (P·K, T, 14, 3) or None when no group of the batch has keypoints.

    normalize=False gives uint8 clips (P·K, T, 3, H, W) instead, a channels-first view of channels-last
    memory, RGB, for `normalized(clips.to(device))` on the accelerator: converting to float and normalising
    costs
    this process about as much CPU as decoding the frames did (bench/data.py), and a quarter of the bytes
    cross to the device.
    """

    def __init__(self, dataset_or_shard, identities_per_batch: int, *, preprocess: "Preprocess | None" = None,
                 shuffle_buffer: int | None = None, seed: int | None = None, drop_last: bool = True,
                 normalize: bool = True):
        # here, not at the top: the Ray Data workers that import this module never need torch
        from stal_ray.model.preprocess import IMAGENET

        self.source = dataset_or_shard
        self.p = identities_per_batch
        self.preprocess = preprocess or IMAGENET
        # groups of one identity arrive together (one row expands into all of them): mix them before batching
        self.shuffle_buffer = shuffle_buffer if shuffle_buffer is not None else 8 * identities_per_batch
        self.seed = seed
        self.drop_last = drop_last
        self.normalize = normalize
        self.skipped_groups = 0
        self.corrupt_frames = 0
        self.peak_held = 0  # most groups held at once (buffer and batch being filled), in the last pass
        self.buffers = RecycledBuffers()

    def _groups(self) -> Iterator[dict[str, np.ndarray]]:
        """The stream's groups one by one, those with corrupt frames skipped and counted."""
        # batch_size=None: whole blocks, no copy to cut batches; a group is a set of views into its block
        for batch in self.source.iter_batches(batch_size=None, batch_format="numpy"):
            for index in range(len(batch["label"])):
                corrupt = int(batch["corrupt_frames"][index])
                if corrupt:
                    self.skipped_groups += 1
                    self.corrupt_frames += corrupt
                    continue
                yield {key: value[index] for key, value in batch.items()}

    def __iter__(self) -> "Iterator[dict[str, torch.Tensor | None]]":
        # Groups of one identity arrive together (one shard row expands into all of them), and a batch needs
        # P distinct identities (triplet mining). A buffer of more than `shuffle_buffer` groups mixes them:
        # each batch member is drawn at random among the buffered groups whose identity the batch lacks, and
        # the buffer grows past its size only while every identity in it is already in the batch. No group
        # waits apart for a later batch, holding its whole block alive: the views the buffer holds pin blocks
        # of data.pipeline._BLOCK_BYTES, and that bounds the stream's memory here (bench/scale.py, "held").
        # (Mixed here rather than by iter_batches' local shuffle buffer, which copies every clip into its
        # buffer: about a tenth of the CPU that decoding takes.)
        rng = np.random.default_rng(self.seed)
        buffer: list[dict[str, np.ndarray]] = []
        current: list[dict[str, np.ndarray]] = []
        self.peak_held = 0
        for group in self._groups():
            buffer.append(group)
            self.peak_held = max(self.peak_held, len(buffer) + len(current))
            while len(buffer) > self.shuffle_buffer and self._draw(buffer, current, rng):
                if len(current) == self.p:
                    yield self._collate(current)
                    current = []
        # the stream is over: the buffer still makes batches of distinct identities where it can
        while buffer or current:
            if not self._draw(buffer, current, rng) or len(current) == self.p:
                # full, or nothing left fits: a partial batch goes out only when drop_last is off
                if len(current) == self.p or not self.drop_last:
                    yield self._collate(current)
                current = []

    def _draw(self, buffer: list[dict], current: list[dict], rng: np.random.Generator) -> bool:
        """Move a random buffered group whose identity `current` lacks into it; False when none does."""
        taken = {int(g["identity"]) for g in current}
        fits = [i for i, g in enumerate(buffer) if int(g["identity"]) not in taken]
        if not fits:
            return False
        index = fits[int(rng.integers(len(fits)))]
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        current.append(buffer.pop())
        return True

    def _collate(self, groups: list[dict[str, np.ndarray]]) -> "dict[str, torch.Tensor | None]":
        import torch

        k, t, h, w, _ = groups[0]["clips"].shape
        if not self.normalize:
            # a channels-first view of one copy: .to(device) keeps its strides, so the layout changes on the
            # device, not in this process
            clips = self.buffers.empty((len(groups) * k, t, h, w, 3), np.uint8)
            np.concatenate([g["clips"] for g in groups], out=clips)
            clips = torch.from_numpy(clips).permute(0, 1, 4, 2, 3)
        else:
            clips = torch.from_numpy(self.buffers.empty((len(groups) * k, t, 3, h, w), np.float32))
            with warnings.catch_warnings():
                # Ray hands out read-only arrays; they are only read from here
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                for index, group in enumerate(groups):
                    # channels first and to float in one pass per group, then normalised in place: 2.4x less
                    # CPU than the chained out-of-place operations
                    source = torch.from_numpy(group["clips"]).permute(0, 1, 4, 2, 3)
                    self.preprocess.into(source, clips[index * k:(index + 1) * k])
        has_keypoints = any(bool(g["has_keypoints"]) for g in groups)
        return {
            "clips": clips,
            "labels": torch.from_numpy(np.repeat([int(g["label"]) for g in groups], k)).long(),
            "identities": torch.from_numpy(np.repeat([int(g["identity"]) for g in groups], k)),
            "tracklets": torch.from_numpy(np.concatenate([g["tracklets"] for g in groups]).astype(np.int64)),
            "keypoints": torch.from_numpy(np.concatenate([g["keypoints"] for g in groups]))
            if has_keypoints else None,
        }

    def normalized(self, clips: "torch.Tensor") -> "torch.Tensor":
        """uint8 clips (from normalize=False) as the model's input (float, preprocessed), on their device."""
        return self.preprocess(clips)


class RecycledBuffers:
    """Arrays for batches, each handed out again once nothing else refers to it.

    A batch of clips is tens of MB: a new one every batch is fresh memory from the OS, whose pages the kernel
    zeroes on first touch, as much CPU again as copying the clips into it (bench/data.py). A tensor made
    with torch.from_numpy, and every view of it, keeps its array referenced, so an array whose only
    reference is this pool's is free: the consumer has dropped the batch (or moved it to the device).
    """

    def __init__(self, size: int = 4):
        self.size = size
        self.arrays: list[np.ndarray] = []

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        for array in self.arrays:
            # references: the pool's list, this loop's variable and getrefcount's argument
            if array.shape == shape and array.dtype == dtype and sys.getrefcount(array) == 3:
                return array
        array = np.empty(shape, dtype=dtype)
        if len(self.arrays) == self.size:
            self.arrays.pop(0)  # held by the consumer, or of a shape not seen lately: no longer pooled
        self.arrays.append(array)
        return array


def training_batches(dataset_or_shard, identities_per_batch: int, **kwargs) -> TrainingBatches:
    """Batches of P groups (P distinct identities × K clips) from training_dataset or a shard of it."""
    return TrainingBatches(dataset_or_shard, identities_per_batch, **kwargs)
