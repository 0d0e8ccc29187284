"""Feature extraction for evaluation: Ray Data actors (ChunkFeatures) run STAL on every T-frame chunk of every
tracklet and emit the partial sums of Eq. 9 (chunks.chunk_sums); the driver (extract_features) adds them up
per tracklet into a FeatureSet (chunks.TrackletSums). feature_store.py saves and loads FeatureSets.

An actor on a lost node is started again elsewhere and its unfinished call runs again (data.stream.retries);
each chunk is added once (TrackletSums keeps the first of a chunk delivered twice), and an extraction that
does not end with every frame of the data set once, or whose retries ran out, fails naming what is missing.
"""

import logging
import warnings

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from stal_ray.core.progress import Progress
from stal_ray.data.prepared.handle import PreparedData
from stal_ray.data.stream.consumer import ConsumerDecoder, encoded_rows
from stal_ray.data.stream.images import decode_frames
from stal_ray.data.stream.retries import LOST, actor_options, work_lost
from stal_ray.evaluate.chunks import METADATA_FIELDS, FeatureSet, TrackletSums, chunk_sums
from stal_ray.model.export import load_model

PROGRESS_EVERY_S = 30.0  # a line in the job's log: MARS's test split takes about half an hour on one GPU

logger = logging.getLogger(__name__)


class ChunkFeatures:
    """Ray Data actor: loads the model file once, turns batches of evaluation chunks into chunk_sums rows
    (plus the chunk's raw scores (T, R) for the attention figure) and the chunk's metadata."""

    def __init__(self, model_path: str, use_gpu: bool = False):
        device = torch.device("cuda" if use_gpu else "cpu")
        model, _, _ = load_model(model_path)  # built on the CPU, so the weights are copied there first
        self._use(model.to(device))

    @classmethod
    def of_model(cls, model) -> "ChunkFeatures":
        """The same computation with a model in memory (a training worker validating its own model, in eval
        mode), on the model's device and in its dtype."""
        chunk_features = cls.__new__(cls)
        chunk_features._use(model)
        return chunk_features

    def _use(self, model) -> None:
        self.model = model
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        # the `keypoints` pose source reads the data's joints; a chunk without them has confidence 0 and
        # falls back to the canonical boxes inside the model
        self.needs_keypoints = self.model.pose.kind == "keypoints"
        self.preprocess = model.preprocess  # what the model was trained on (model.pt carries it)
        self.decoder: ConsumerDecoder | None = None  # made on the first encoded batch

    def _decode(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of encoded chunks (data.consumer) as the stream's decoding tasks would have given it."""
        if self.decoder is None:
            self.decoder = ConsumerDecoder(device=self.device)
        rows = encoded_rows(batch)
        decoded = self.decoder(rows, (len(rows[0]["frames"]),))
        return {**{name: value for name, value in batch.items() if name != "frames"}, **decoded}

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "frames" in batch:  # data.decode_at = consumer: JPEG bytes, decoded here (on the GPU with nvJPEG)
            batch = self._decode(batch)
        with warnings.catch_warnings():
            # Ray hands out read-only arrays; they are only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            clips = torch.as_tensor(batch["clips"]).to(self.device)  # uint8 (B, T, H, W, 3)
            keypoints = torch.from_numpy(batch["keypoints"]).to(self.device) if self.needs_keypoints else None
            valid = torch.from_numpy(np.asarray(batch["valid"], dtype=np.int64)).to(self.device)
        clips = self.preprocess(clips.permute(0, 1, 4, 2, 3))  # (B, T, 3, H, W) float
        if keypoints is not None:
            keypoints = keypoints.to(self.dtype)
        out = self.model(clips.to(self.dtype), keypoints)
        sums = chunk_sums(out, valid)
        result = {name: np.asarray(batch[name]) for name in (*METADATA_FIELDS, "chunk", "corrupt_frames")}
        result.update({name: value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
                       for name, value in sums.items()})
        result["scores"] = out.scores.float().cpu().numpy()
        return result


def chunk_stream(dataset: ray.data.Dataset, model_path: str, *, batch_size: int = 32,
                 use_gpu: bool | None = None, concurrency: int = 1, num_cpus: float = 1,
                 udf: type[ChunkFeatures] = ChunkFeatures) -> ray.data.Dataset:
    """The chunk_sums rows of an evaluation_dataset (or validation_dataset), computed by `udf` actors (the
    ChunkFeatures class or a subclass adding columns) with the model file at `model_path`
    (stal_ray.model.export; readable from every node). batch_size: chunks per model call; use_gpu: one GPU
    per actor (default: when the cluster has GPUs); concurrency: actors; num_cpus: CPUs per actor (Ray
    sets the actor's OMP_NUM_THREADS, i.e. PyTorch's threads, to it)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if use_gpu is None:
        use_gpu = gpus > 0
    elif use_gpu and not gpus:
        # not an error: an autoscaling cluster may add GPU nodes once the actors ask for them
        logger.warning("extract_features(use_gpu=True) on a Ray cluster with no GPU now: the actors wait "
                       "until one joins (pass use_gpu=False to run on CPU)")
    resources = {"num_gpus": 1, "num_cpus": num_cpus} if use_gpu else {"num_cpus": num_cpus}
    return dataset.map_batches(
        udf, fn_constructor_kwargs={"model_path": model_path, "use_gpu": use_gpu},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        udf_modifying_row_count=False, **resources, **actor_options())


def extract_features(dataset: ray.data.Dataset, model_path: str, *, keep_scores_for: int = 0,
                     total_frames: int | None = None, **stream_options) -> FeatureSet:
    """Features of every tracklet of an evaluation_dataset (or validation_dataset) with the model file at
    `model_path`; stream_options as chunk_stream's; keep_scores_for: tracklets whose per-frame attention
    scores are kept (chosen by sample_tracklets). total_frames: the frames the dataset holds (the manifest's
    count), for a progress line with its percentage and ETA every PROGRESS_EVERY_S seconds, and the check
    that every frame arrived once."""
    totals = TrackletSums()
    progress = total_frames and Progress("extraction", total_frames, "frames", every_s=PROGRESS_EVERY_S)
    # summed as the chunks stream in: the per-chunk rows of a MARS-sized test set would not fit in memory
    stream = chunk_stream(dataset, model_path, **stream_options).iter_batches(batch_size=None,
                                                                             batch_format="numpy")
    try:
        for batch in stream:
            totals.add(batch)
            if progress:
                progress.step(int(np.sum(batch["frames"])))
    except LOST as error:
        missing = f" of {total_frames:,}" if total_frames else ""
        raise work_lost("feature extraction", f"{totals.frames:,}{missing} frames of {totals.tracklets:,} "
                        "tracklets were extracted, the rest lost; nothing was saved: evaluate again",
                        error) from error
    if progress:
        progress.done()
    if total_frames and totals.frames != total_frames:
        raise RuntimeError(f"feature extraction: {totals.frames:,} frames arrived of the data set's "
                           f"{total_frames:,}, in {totals.tracklets:,} tracklets: features would be wrong")
    if totals.repeated:
        logger.info("feature extraction: %d chunks computed again after lost work were added once",
                    totals.repeated)
    return totals.result(keep_scores_for)


def tracklet_frames(data: PreparedData, positions: dict[int, np.ndarray], height: int,
                    width: int) -> dict[int, np.ndarray]:
    """uint8 (k, H, W, 3) frames at `positions` of a few test tracklets, read straight from the shards (the
    test split is in tracklet order, so the Parquet filter skips the other row groups unread)."""
    if not positions:
        return {}
    wanted = sorted(int(t) for t in positions)
    with data.errors():
        table = pq.ParquetDataset(data.paths("test"), filesystem=data.arrow_filesystem(),
                                  filters=[("tracklet", "in", wanted)]).read(columns=["tracklet", "frames"])
    out = {}
    for tracklet, frames in zip(table.column("tracklet").to_pylist(), table.column("frames").to_pylist(),
                                strict=True):
        chosen = [frames[i] for i in np.asarray(positions[tracklet]).tolist() if i < len(frames)]
        out[tracklet], _ = decode_frames(chosen, height, width)
    return out
