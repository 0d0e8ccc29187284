"""Feature extraction for evaluation: Ray Data actors run STAL on every T-frame chunk of every tracklet and
emit partial sums of Eq. 9; the driver adds them up per tracklet into TrackletFeatures (one row per tracklet).

A tracklet longer than T is scored chunk by chunk, and STAN's L1 normalisation is per clip, so the chunks'
`a` are on different scales. Eq. 9 (Σ_t a f / Σ_t a) and Eq. 8's an = ā / ||ā|| are invariant to one common
scale, so the sums use the unnormalised sigmoid scores (STALOutput.scores), whose scale every chunk shares:
Σ over chunks of the partial sums is then exactly Eq. 9 over all of the tracklet's frames. Padded frames
(beyond a chunk's `valid`) are left out of every sum.
"""

import json
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from stal_ray.core import storage
from stal_ray.core.progress import Progress
from stal_ray.data.prepared.manifest import read_manifest
from stal_ray.data.stream.images import decode_frames
from stal_ray.evaluate.distance import TrackletFeatures
from stal_ray.model.export import load_model
from stal_ray.objective import safe_divisor

# What chunk_sums gives per chunk; score_sum (Σ_t s_{t,r}, for ā^r) is den_attended, so it is not repeated.
SUM_FIELDS = ("g_sum", "num_attended", "den_attended", "num_temporal", "den_temporal", "f_sum", "frames")
METADATA_FIELDS = ("tracklet", "identity", "camera", "is_query")
FEATURES_FORMAT, FEATURES_VERSION = "stal_ray.features", 1
PROGRESS_EVERY_S = 30.0  # a line in the job's log: MARS's test split takes about half an hour on one GPU

logger = logging.getLogger(__name__)


def chunk_sums(out, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Partial sums of one STALOutput of B chunks over each chunk's `valid` (B,) first frames, s = scores:

    g_sum (B, Dg) Σ_t g_t; num_attended (B, R, D) Σ_t s_{t,r} f_{t,r} and den_attended (B, R) Σ_t s_{t,r}
    (Eq. 9); num_temporal (B, R, D) Σ_t s̄_t f_{t,r} and den_temporal (B,) Σ_t s̄_t, s̄_t = mean_r s_{t,r}
    (the temporal attention alone); f_sum (B, R, D) Σ_t f_{t,r} (plain average); frames (B,) = valid.
    """
    t = out.scores.shape[1]
    mask = (torch.arange(t, device=valid.device)[None, :] < valid[:, None]).to(out.scores.dtype)  # (B, T)
    s = out.scores * mask[..., None]  # (B, T, R)
    s_bar = out.scores.mean(2) * mask  # (B, T)
    return {
        "g_sum": torch.einsum("bt,btd->bd", mask, out.g_frames),
        "num_attended": torch.einsum("btr,btrd->brd", s, out.f),
        "den_attended": s.sum(1),
        "num_temporal": torch.einsum("bt,btrd->brd", s_bar, out.f),
        "den_temporal": s_bar.sum(1),
        "f_sum": torch.einsum("bt,btrd->brd", mask, out.f),
        "frames": valid.to(torch.int64),
    }


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

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with warnings.catch_warnings():
            # Ray hands out read-only arrays; they are only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            clips = torch.from_numpy(batch["clips"]).to(self.device)  # uint8 (B, T, H, W, 3)
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


@dataclass
class FeatureSet:
    """Per-tracklet features (rows sorted by tracklet) and what the report needs besides them."""

    features: TrackletFeatures
    tracklet: np.ndarray  # (N,) int64
    identity: np.ndarray  # (N,) int64; -1 junk, 0 distractor
    camera: np.ndarray  # (N,) int64
    is_query: np.ndarray  # (N,) bool
    num_frames: np.ndarray  # (N,) int64, real frames aggregated
    corrupt_frames: np.ndarray  # (N,) int64, frames that did not decode (padding repeats included)
    # tracklet -> (n_frames, R) attention scores normalised over the tracklet's whole map, for Fig. 12
    sample_scores: dict[int, np.ndarray] = field(default_factory=dict)
    # tracklet -> uint8 (k, H, W, 3) frames at report.shown_frames(n_frames) positions, when fetched
    sample_frames: dict[int, np.ndarray] = field(default_factory=dict)
    # what produced it (model fingerprint, data URI, settings): a later run reuses it only when these match
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tracklet)


class TrackletSums:
    """Running per-tracklet totals of chunk_sums rows, arriving in any order and in any batching."""

    def __init__(self):
        self._slot: dict[int, int] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._meta: dict[str, np.ndarray] = {}
        self._corrupt = np.zeros(0, dtype=np.int64)
        self._scores: list[tuple[np.ndarray, ...]] = []  # per batch: tracklet, chunk, valid, scores

    def add(self, batch: dict[str, np.ndarray]) -> None:
        tracklets = np.asarray(batch["tracklet"], dtype=np.int64)
        if not len(tracklets):
            return
        unique, first, inverse = np.unique(tracklets, return_index=True, return_inverse=True)
        new = [(i, t) for i, t in enumerate(unique.tolist()) if t not in self._slot]
        for _, tracklet in new:
            self._slot[tracklet] = len(self._slot)
        self._grow(batch, len(self._slot))
        if new:
            rows, slots_new = first[[i for i, _ in new]], [self._slot[t] for _, t in new]
            for name in METADATA_FIELDS:
                self._meta[name][slots_new] = np.asarray(batch[name])[rows]
        slots = np.array([self._slot[t] for t in unique.tolist()])[inverse]
        index = torch.from_numpy(slots)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            for name in SUM_FIELDS:
                self._sums[name].index_add_(0, index, torch.from_numpy(np.asarray(batch[name])).to(
                    self._sums[name].dtype))
        np.add.at(self._corrupt, slots, np.asarray(batch["corrupt_frames"], dtype=np.int64))
        self._scores.append((tracklets, np.asarray(batch["chunk"], dtype=np.int64),
                             np.asarray(batch["frames"], dtype=np.int64), np.asarray(batch["scores"])))

    def _grow(self, batch: dict[str, np.ndarray], needed: int) -> None:
        """Room for `needed` tracklets, doubling: the number of tracklets is unknown until the stream ends."""
        capacity = len(self._corrupt)
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, 64)
        for name in SUM_FIELDS:
            value = np.asarray(batch[name])
            dtype = torch.int64 if name == "frames" else torch.float32
            grown = torch.zeros((capacity, *value.shape[1:]), dtype=dtype)
            if name in self._sums:
                grown[:len(self._sums[name])] = self._sums[name]
            self._sums[name] = grown
        for name in METADATA_FIELDS:
            grown = np.zeros(capacity, dtype=bool if name == "is_query" else np.int64)
            if name in self._meta:
                grown[:len(self._meta[name])] = self._meta[name]
            self._meta[name] = grown
        corrupt = np.zeros(capacity, dtype=np.int64)
        corrupt[:len(self._corrupt)] = self._corrupt
        self._corrupt = corrupt

    def result(self, keep_scores_for: int = 0) -> FeatureSet:
        """Eq. 9 over all frames of each tracklet, rows sorted by tracklet. Call it once: it consumes the
        totals (on MARS they are ~1 GB, and each is divided in place instead of copied)."""
        n = len(self._slot)
        if n == 0:
            raise ValueError("no evaluation chunks were extracted: the data set's test split is empty")
        if not self._sums:
            raise RuntimeError("TrackletSums.result() was called before: it consumes the totals")
        order = np.argsort(self._meta["tracklet"][:n], kind="stable")
        index = torch.from_numpy(order)
        sums = {name: self._sums.pop(name)[:n][index] for name in SUM_FIELDS}
        frames = sums.pop("frames")
        count = frames.to(torch.float32)
        den_attended = sums.pop("den_attended")
        features = TrackletFeatures(
            g=sums.pop("g_sum").div_(count[:, None]),
            f_attended=sums.pop("num_attended").div_(safe_divisor(den_attended)[..., None]),
            f_temporal=sums.pop("num_temporal").div_(safe_divisor(sums.pop("den_temporal"))[:, None, None]),
            f_mean=sums.pop("f_sum").div_(count[:, None, None]),
            part_scores=den_attended / count[:, None],  # ā^r, mean over frames of s_{t,r}
        )
        meta = {name: self._meta[name][:n][order] for name in METADATA_FIELDS}
        feature_set = FeatureSet(features=features, num_frames=frames.numpy(),
                                 corrupt_frames=self._corrupt[:n][order], **meta)
        chosen = sample_tracklets(feature_set, keep_scores_for)
        feature_set.sample_scores = self._sample_scores(chosen)
        return feature_set

    def _sample_scores(self, chosen: list[int]) -> dict[int, np.ndarray]:
        if not chosen:
            return {}
        tracklet, chunk, valid, scores = (np.concatenate(parts) for parts in zip(*self._scores, strict=True))
        out = {}
        for t in chosen:
            rows = np.flatnonzero(tracklet == t)
            rows = rows[np.argsort(chunk[rows])]
            s = np.concatenate([scores[row, :valid[row]] for row in rows]).astype(np.float64)
            out[t] = (s / s.sum()).astype(np.float32)  # the tracklet's whole T×R map sums to 1, as STAN's
        return out


def sample_tracklets(feature_set: FeatureSet, count: int) -> list[int]:
    """Up to `count` tracklets for the attention figure, like the paper's Fig. 12: pairs of one person seen by
    two cameras (a query and a gallery tracklet of its identity from another camera), then any others."""
    if count <= 0:
        return []
    chosen: list[int] = []
    real = feature_set.identity > 0
    for position in np.flatnonzero(feature_set.is_query & real):
        if len(chosen) + 2 > count:
            break
        identity, camera = feature_set.identity[position], feature_set.camera[position]
        others = np.flatnonzero((feature_set.identity == identity) & (feature_set.camera != camera))
        if len(others):
            chosen += [int(feature_set.tracklet[position]), int(feature_set.tracklet[others[0]])]
    for tracklet in feature_set.tracklet.tolist():
        if len(chosen) >= count:
            break
        if tracklet not in chosen:
            chosen.append(tracklet)
    return chosen


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
        udf_modifying_row_count=False, **resources)


def extract_features(dataset: ray.data.Dataset, model_path: str, *, keep_scores_for: int = 0,
                     total_frames: int | None = None, **stream_options) -> FeatureSet:
    """Features of every tracklet of an evaluation_dataset (or validation_dataset) with the model file at
    `model_path`; stream_options as chunk_stream's; keep_scores_for: tracklets whose per-frame attention
    scores are kept (chosen by sample_tracklets). total_frames: the frames the dataset holds (the manifest's
    count), for a progress line with its percentage and ETA every PROGRESS_EVERY_S seconds."""
    totals = TrackletSums()
    progress = total_frames and Progress("extraction", total_frames, "frames", every_s=PROGRESS_EVERY_S)
    # summed as the chunks stream in: the per-chunk rows of a MARS-sized test set would not fit in memory
    for batch in chunk_stream(dataset, model_path, **stream_options).iter_batches(batch_size=None,
                                                                                batch_format="numpy"):
        totals.add(batch)
        if progress:
            progress.step(int(np.sum(batch["frames"])))
    if progress:
        progress.done()
    return totals.result(keep_scores_for)


def tracklet_frames(uri: str, positions: dict[int, np.ndarray], height: int, width: int, *,
                    endpoint_url: str | None = None) -> dict[int, np.ndarray]:
    """uint8 (k, H, W, 3) frames at `positions` of a few test tracklets, read straight from the shards (the
    test split is in tracklet order, so the Parquet filter skips the other row groups unread)."""
    if not positions:
        return {}
    manifest = read_manifest(uri, endpoint_url=endpoint_url)
    fs, _ = storage.arrow_filesystem(uri, endpoint_url=endpoint_url, check=False)
    wanted = sorted(int(t) for t in positions)
    with storage.errors(uri, endpoint_url):
        table = pq.ParquetDataset(manifest.paths("test"), filesystem=fs,
                                  filters=[("tracklet", "in", wanted)]).read(columns=["tracklet", "frames"])
    out = {}
    for tracklet, frames in zip(table.column("tracklet").to_pylist(), table.column("frames").to_pylist(),
                                strict=True):
        chosen = [frames[i] for i in np.asarray(positions[tracklet]).tolist() if i < len(frames)]
        out[tracklet], _ = decode_frames(chosen, height, width)
    return out


# ---------------------------------------------------------------------------------------------- Parquet

_TENSORS = ("g", "f_attended", "f_temporal", "f_mean", "part_scores")


def _fixed(values: np.ndarray) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values).reshape(len(values), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])


def save_features(feature_set: FeatureSet, path_or_url: str) -> None:
    """One Parquet row per tracklet: metadata, the five feature tensors as fixed-size lists, and the sampled
    attention scores and frames (null elsewhere); shapes in the schema metadata. Atomic on local disk."""
    features = feature_set.features
    n = len(feature_set)
    columns = {name: pa.array(getattr(feature_set, name)) for name in
               ("tracklet", "identity", "camera", "is_query", "num_frames", "corrupt_frames")}
    for name in _TENSORS:
        columns[name] = _fixed(getattr(features, name).detach().cpu().numpy().astype(np.float32))
    scores = [feature_set.sample_scores.get(t) for t in feature_set.tracklet.tolist()]
    columns["sample_scores"] = pa.array([None if s is None else s.ravel() for s in scores],
                                        type=pa.list_(pa.float32()))
    frames = [feature_set.sample_frames.get(t) for t in feature_set.tracklet.tolist()]
    columns["sample_frames"] = pa.array([None if f is None else f.tobytes() for f in frames],
                                        type=pa.binary())
    frame_shape = next((list(f.shape[1:]) for f in frames if f is not None), None)
    shapes = {name: list(getattr(features, name).shape[1:]) for name in _TENSORS}
    info = {"format": FEATURES_FORMAT, "version": FEATURES_VERSION, "rows": n, "shapes": shapes,
            "frame_shape": frame_shape, "source": feature_set.source}
    table = pa.table(columns).replace_schema_metadata({"stal_ray": json.dumps(info)})
    _write_table(table, path_or_url)


def _write_table(table: pa.Table, path_or_url: str) -> None:
    # readable by this user only on local disk (0o600), as tempfile made the file before
    with storage.open_atomic(path_or_url, mode=0o600) as out:
        pq.write_table(table, out)


def load_features(path_or_url: str) -> FeatureSet:
    """The FeatureSet that save_features wrote."""
    fs, path = storage.filesystem(path_or_url, check=False)
    with storage.errors(path_or_url):
        try:
            with fs.open(path, "rb") as source:
                table = pq.read_table(source)
        except FileNotFoundError:
            raise FileNotFoundError(f"features file not found: {path_or_url}") from None
    metadata = table.schema.metadata or {}
    info = json.loads(metadata.get(b"stal_ray", b"{}"))
    if info.get("format") != FEATURES_FORMAT or info.get("version") != FEATURES_VERSION:
        raise ValueError(f"{path_or_url} is not a stal_ray features file of version {FEATURES_VERSION} "
                         f"(found {info.get('format')!r} version {info.get('version')!r}); delete it and "
                         "extract again")
    n = table.num_rows

    def tensor(name: str) -> torch.Tensor:
        flat = table.column(name).combine_chunks().flatten().to_numpy()
        return torch.from_numpy(flat.reshape(n, *info["shapes"][name]).copy())

    features = TrackletFeatures(**{name: tensor(name) for name in _TENSORS})
    meta = {name: table.column(name).to_numpy() for name in
            ("tracklet", "identity", "camera", "is_query", "num_frames", "corrupt_frames")}
    parts = info["shapes"]["part_scores"][0]
    sample_scores, sample_frames = {}, {}
    for tracklet, scores, frames in zip(meta["tracklet"].tolist(), table.column("sample_scores").to_pylist(),
                                        table.column("sample_frames").to_pylist(), strict=True):
        if scores is not None:
            sample_scores[tracklet] = np.asarray(scores, dtype=np.float32).reshape(-1, parts)
        if frames is not None:
            sample_frames[tracklet] = np.frombuffer(frames, dtype=np.uint8).reshape(-1, *info["frame_shape"])
    return FeatureSet(features=features, sample_scores=sample_scores, sample_frames=sample_frames,
                      source=info.get("source") or {}, **meta)
