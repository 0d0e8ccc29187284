"""The trainer's side of the training stream: groups of K clips (data.pipeline.training_dataset) into
batches of P groups of P distinct identities, as torch tensors.

Groups are mixed in a buffer of views into whole blocks, a group whose identity is already in the batch
being filled waits for a later one, and batch memory is recycled (RecycledBuffers) rather than fresh every
batch.
"""

import sys
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from stal_ray.data.stream.prefetch import prefetched
from stal_ray.data.stream.retries import LOST, work_lost

if TYPE_CHECKING:
    import torch

    from stal_ray.core.preprocess import Preprocess
    from stal_ray.data.stream.consumer import ConsumerDecoder


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

    decoder (data.consumer.ConsumerDecoder; data.decode_at = consumer): the shard's rows are JPEG bytes, and
    each batch's are decoded (and augmented) into its buffer as it is assembled; a group with a corrupt
    frame is found then, skipped and counted as the stream's decoding tasks would have, and the next group
    that fits takes its place.

    prefetch: batches assembled (and, with a decoder, decoded) ahead in a background thread while the caller
    uses the current one (default: 1 with a decoder, so the worker's decoding overlaps its training step,
    else 0). The same batches in the same order either way; the counts of skipped groups may
    then include the groups of the batch made ahead.
    """

    def __init__(self, dataset_or_shard, identities_per_batch: int, *, preprocess: "Preprocess | None" = None,
                 shuffle_buffer: int | None = None, seed: int | None = None, drop_last: bool = True,
                 normalize: bool = True, decoder: "ConsumerDecoder | None" = None,
                 prefetch: int | None = None):
        # here, not at the top: the Ray Data workers that import this module never need torch
        from stal_ray.core.preprocess import IMAGENET

        self.source = dataset_or_shard
        self.p = identities_per_batch
        self.preprocess = preprocess or IMAGENET
        # groups arrive in the epoch plan's order (data.sampling.epoch_plan: P identities at a time within a
        # window; with data.mixing = shards, each identity's groups in a row): the buffer mixes the windows'
        # ends and whatever waits for a batch without its identity
        self.shuffle_buffer = shuffle_buffer if shuffle_buffer is not None else 8 * identities_per_batch
        self.seed = seed
        self.drop_last = drop_last
        self.normalize = normalize
        self.decoder = decoder
        self.prefetch = prefetch if prefetch is not None else int(decoder is not None)
        self.skipped_groups = 0
        self.corrupt_frames = 0
        self.first_skipped: dict | None = None  # identity and tracklet rows of the first group skipped
        self.buffers = RecycledBuffers()

    def _groups(self) -> Iterator[dict[str, np.ndarray]]:
        # Groups are mixed here rather than by iter_batches' local shuffle buffer, which copies every clip
        # into its buffer (about a tenth of the CPU that decoding takes). This buffer holds views into whole
        # blocks (batch_size=None: no copy to cut batches either), so what it keeps alive is bounded by
        # blocks of _BLOCK_BYTES.
        rng = np.random.default_rng(self.seed)
        buffer: list[dict[str, np.ndarray]] = []
        if self.decoder is not None:
            # JPEG rows: views into the blocks, nothing decoded before the batch is assembled
            from stal_ray.data.stream.consumer import encoded_rows

            for block in self._blocks("pyarrow"):
                for group in encoded_rows(block):
                    buffer.append(group)
                    if len(buffer) > self.shuffle_buffer:
                        yield _take_random(buffer, rng)
            while buffer:
                yield _take_random(buffer, rng)
            return
        for batch in self._blocks("numpy"):
            for index in range(len(batch["label"])):
                corrupt = int(batch["corrupt_frames"][index])
                if corrupt:
                    self.skipped_groups += 1
                    self.corrupt_frames += corrupt
                    if self.first_skipped is None:
                        self.first_skipped = {"identity": int(batch["identity"][index]),
                                              "tracklets": np.asarray(batch["tracklets"][index]).tolist()}
                    continue
                buffer.append({key: value[index] for key, value in batch.items()})
                if len(buffer) > self.shuffle_buffer:
                    yield _take_random(buffer, rng)
        while buffer:
            yield _take_random(buffer, rng)

    def _blocks(self, batch_format: str) -> Iterator:
        """The source's blocks, whole; work lost more often than Ray retries it (retries.py) ends the epoch
        with a WorkLostError."""
        blocks = 0
        try:
            for block in self.source.iter_batches(batch_size=None, batch_format=batch_format):
                blocks += 1
                yield block
        except LOST as error:
            lost = (f"the epoch stopped after {blocks} blocks; under Ray Train the run restarts from its "
                    "last checkpoint while train.max_failures allows")
            raise work_lost("training stream", lost, error) from error

    def __iter__(self) -> "Iterator[dict[str, torch.Tensor | None]]":
        return prefetched(self._batches(), self.prefetch)

    def _batches(self) -> "Iterator[dict[str, torch.Tensor | None]]":
        current: list[dict[str, np.ndarray]] = []
        deferred: list[dict[str, np.ndarray]] = []
        for group in self._groups():
            # a group whose identity is already in the batch waits for a later batch (triplet mining needs
            # P distinct identities)
            if any(g["identity"] == group["identity"] for g in current):
                deferred.append(group)
                continue
            current.append(group)
            while len(current) == self.p:
                batch = self._collate(current)
                if batch is None:  # the consumer's decoding dropped corrupt groups: fill again
                    break
                yield batch
                current = self._refill([], deferred)
        # the stream is over: what waits still makes batches of distinct identities where it can
        while deferred:
            before = len(deferred)
            current = self._refill(current, deferred)
            if len(current) == self.p or len(deferred) == before:
                # full, or nothing waiting fits: a partial batch goes out only when drop_last is off
                if len(current) == self.p or not self.drop_last:
                    batch = self._collate(current)
                    if batch is None:
                        continue
                    yield batch
                current = []
        while current and not self.drop_last:
            batch = self._collate(current)
            if batch is not None:
                yield batch
                break

    def _refill(self, current: list[dict], deferred: list[dict]) -> list[dict]:
        """Move waiting groups into `current` (in arrival order) while it has room and they are new."""
        for waiting in list(deferred):
            if len(current) < self.p and all(g["identity"] != waiting["identity"] for g in current):
                current.append(waiting)
                deferred.remove(waiting)
        return current

    def _collate(self, groups: list[dict[str, np.ndarray]]) -> "dict[str, torch.Tensor | None] | None":
        import torch

        decoded = None
        if self.decoder is not None:
            groups, decoded = self._decoded(groups)
            if decoded is None:
                return None
        k, t, h, w, _ = groups[0]["clips"].shape
        if decoded is not None and not self.normalize:
            # decoded into one buffer already (on the GPU with nvJPEG): no second copy
            clips = decoded.reshape(len(groups) * k, t, h, w, 3)
            clips = torch.as_tensor(clips).permute(0, 1, 4, 2, 3)
        elif not self.normalize:
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

    def _decoded(self, groups: list[dict]) -> tuple[list[dict], "np.ndarray | torch.Tensor | None"]:
        """Encoded groups decoded into one batch buffer (data.consumer): the groups with their clips (views
        of it, as the stream's decoded groups are of their blocks) and the buffer, (rows, K, T, H, W, 3). No
        buffer, and the corrupt groups removed from `groups`, when any has a frame that did not decode."""
        k, t = len(groups[0]["tracklets"]), len(groups[0]["frames"]) // len(groups[0]["tracklets"])
        h, w = int(groups[0]["height"]), int(groups[0]["width"])
        out = None if self.decoder.on_gpu else self.buffers.empty((len(groups) * k * t, h, w, 3), np.uint8)
        decoded = self.decoder(groups, (k, t), out=out)
        corrupt = decoded["corrupt_frames"]
        if corrupt.any():
            for index in sorted(np.flatnonzero(corrupt).tolist(), reverse=True):
                group = groups.pop(index)
                self.skipped_groups += 1
                self.corrupt_frames += int(corrupt[index])
                if self.first_skipped is None:
                    self.first_skipped = {"identity": int(group["identity"]),
                                          "tracklets": np.asarray(group["tracklets"]).tolist()}
            return groups, None
        return [{**group, "clips": decoded["clips"][index], "keypoints": decoded["keypoints"][index],
                 "has_keypoints": decoded["has_keypoints"][index]} for index, group in enumerate(groups)], \
            decoded["clips"]

    def normalized(self, clips: "torch.Tensor") -> "torch.Tensor":
        """uint8 clips (from normalize=False) as the model's input (float, preprocessed), on their device."""
        return self.preprocess(clips)


class RecycledBuffers:
    """Arrays for batches (and for the decoding tasks' output, data.pipeline), each handed out again once
    nothing else refers to it.

    A batch of clips is tens of MB: a new one every batch is fresh memory from the OS, whose pages the kernel
    zeroes on first touch, as much CPU again as copying the clips into it (bench/data.py). A tensor made
    with torch.from_numpy, and every view of it, keeps its array referenced, so an array whose only
    reference is this pool's is free: the consumer has dropped the batch (or moved it to the device), or Ray
    has copied the decoded block into the object store.
    """

    def __init__(self, size: int = 4):
        self.size = size
        self.arrays: list[np.ndarray] = []
        self.lock = threading.Lock()  # two threads of one process must never both take the same free array

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        with self.lock:
            for array in self.arrays:
                # references: the pool's list, this loop's variable and getrefcount's argument
                if array.shape == shape and array.dtype == dtype and sys.getrefcount(array) == 3:
                    return array
            array = np.empty(shape, dtype=dtype)
            if len(self.arrays) == self.size:
                self.arrays.pop(0)  # held by the consumer, or of a shape not seen lately: no longer pooled
            self.arrays.append(array)
            return array


def _take_random(buffer: list, rng: np.random.Generator):
    """Remove and return a random element of `buffer` in O(1) (order is not kept)."""
    index = int(rng.integers(len(buffer)))
    buffer[index], buffer[-1] = buffer[-1], buffer[index]
    return buffer.pop()


def training_batches(dataset_or_shard, identities_per_batch: int, **kwargs) -> TrainingBatches:
    """Batches of P groups (P distinct identities × K clips) from training_dataset or a shard of it."""
    return TrainingBatches(dataset_or_shard, identities_per_batch, **kwargs)
