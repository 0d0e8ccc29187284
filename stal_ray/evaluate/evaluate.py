"""Evaluate a model file on a prepared test split: features (Ray Data), the fused distance per mode
(d = d_l + α·d_g, d_l by Eq. 8), CMC, mAP (the protocol's AP rule, and the step rule beside it) and mINP
under the MARS protocol, the report (metrics.json, plots)."""

import io
import logging
from dataclasses import dataclass

import numpy as np
import ray
import torch

from stal_ray.config import PROTOCOLS, Config, config_from_dict, parse_override
from stal_ray.core import storage
from stal_ray.data.prepared import protocol as data_protocol
from stal_ray.data.prepared.handle import PreparedData
from stal_ray.data.prepared.integrity import check_shards
from stal_ray.data.source import resolve_data
from stal_ray.data.stream.pipeline import evaluation_dataset
from stal_ray.evaluate import report, visualize
from stal_ray.evaluate.chunks import FeatureSet
from stal_ray.evaluate.distance import MODES, branch_distances, fuse
from stal_ray.evaluate.feature_store import load_features, save_features
from stal_ray.evaluate.features import extract_features, tracklet_frames
from stal_ray.evaluate.ranking import RankingResult, ap_rule, evaluate_ranking, query_gallery_split
from stal_ray.evaluate.rerank import reranked_distance
from stal_ray.model.export import load_model_config

logger = logging.getLogger(__name__)

FEATURES_FILE, DISTANCES_FILE = "features.parquet", "distances.npz"
# tracklets drawn in attention.png: two people, each seen by two cameras, as in the paper's Fig. 12
SAMPLED_TRACKLETS = 4
# the attention mode whose branch distances a mode fuses (TrackletFeatures.parts)
_ATTENTION_OF = {"global": "stal", "local": "stal"}
# the model fixes these: STAN's FC reads T frames, and the part networks were built for one low-level map size
_FIXED_BY_MODEL = ("data.seq_len", "data.height", "data.width")


def evaluate(model_path: str, data: PreparedData | str | None, out_dir: str, *, config_overrides=(),
             fusion_rate: float | None = None, modes=MODES, protocol: str | None = None,
             save_distances: bool = False, features_path: str | None = None, endpoint_url: str | None = None,
             use_gpu: bool | None = None, concurrency: int | None = None, cpu_share: float = 0.5,
             visualize_top: int | None = None) -> dict:
    """Evaluate `model_path` (stal_ray.model.export) on the test split of `data` (the prepared data set, or
    its URI; None: the data set the model was trained on) and write the report into out_dir; returns the
    metrics.json document. endpoint_url: the object store's endpoint of model_path, out_dir and
    features_path, and of `data` given as a URI (default: the endpoint of `data` given as a handle).

    The data settings come from the model file's config, with config_overrides (`section.key=value`, e.g.
    eval.batch_size=64, data.decode_concurrency=4) on top. fusion_rate (α) and protocol default to the
    config's eval settings. Features are saved to features_path (default out_dir/features.parquet) and
    reused by a later call for the same model file and data set, which then reads nothing else.
    cpu_share: the share of a node's CPUs a CPU feature actor takes (its PyTorch threads; the rest decodes);
    evaluations running side by side (jobs/splits.py --max-concurrent) divide it between them.
    visualize_top: K of the ranked galleries drawn into out_dir/ranked/ (stal_ray.evaluate.visualize), 0 for
    none (default: the config's eval.visualize).
    """
    config, meta = load_model_config(model_path)
    config = _with_overrides(config, config_overrides, model_path)
    fusion_rate = config.eval.fusion_rate if fusion_rate is None else float(fusion_rate)
    modes = _checked_modes(modes, protocol)
    visualize_top = config.eval.visualize if visualize_top is None else int(visualize_top)
    if visualize_top < 0:
        raise ValueError(f"--visualize (eval.visualize) {visualize_top} is invalid: give the gallery "
                         "tracklets to draw per query, e.g. --visualize 10, or 0 for none")
    if isinstance(data, PreparedData) and endpoint_url is None:
        endpoint_url = data.endpoint_url
    if data is None:  # the data the model was trained on (None: the embedded synthetic data set)
        data = resolve_data(config.data.root, endpoint_url=endpoint_url)
        print(f"evaluating on {data.uri}, the data set the model was trained on")
    features_path = features_path or storage.join(out_dir, FEATURES_FILE)
    # a report that cannot be written is refused now, not after hours of feature extraction
    storage.check_output_folder(out_dir, "--out", endpoint_url=endpoint_url)

    feature_set = _features(model_path, data, config, features_path, endpoint_url, use_gpu, concurrency,
                            cpu_share)
    # iLIDS-VID and PRID-2011 rank camera 1 against camera 2 whatever eval.protocol says (data/protocol.py)
    described = data_protocol.of_manifest(feature_set.source.get("dataset"))
    protocol = data_protocol.eval_protocol(described, protocol, config.eval.protocol)
    dataset = data_protocol.cross_dataset(meta.get("extra", {}).get("data"), described)
    if "note" in dataset:
        print(dataset["note"])
    ranked = _rank(feature_set, modes, fusion_rate, protocol, config, visualize_top)
    rerank = ({"k1": config.eval.rerank_k1, "k2": config.eval.rerank_k2, "lambda": config.eval.rerank_lambda}
              if config.eval.rerank else None)
    metrics = report.Metrics(ranked.results, fusion_rate, protocol, len(ranked.query_index),
                             len(ranked.gallery_index), ranked.num_test_ids(),
                             ranked.results[modes[0]].skipped_queries, model_provenance(model_path, meta),
                             rerank=rerank, dataset=dataset)
    metrics_path = _write_report(out_dir, metrics, feature_set, ranked if save_distances else None)
    corrupt = int(feature_set.corrupt_frames.sum())
    print(f"{metrics.num_query} queries, {metrics.num_gallery} gallery tracklets, {metrics.num_test_ids} "
          f"identities, protocol {protocol}, fusion rate {fusion_rate}"
          + (f"; {corrupt} frames did not decode (black frames were used)" if corrupt else ""))
    print(report.format_table(ranked.results))
    print(f"metrics: {metrics_path}")
    if ranked.shown:
        print(f"ranked galleries: {_draw_ranked(out_dir, ranked, feature_set, config, endpoint_url)}")
    return report.metrics_dict(metrics)


def _checked_modes(modes, protocol: str | None) -> tuple[str, ...]:
    """`modes` as a tuple, once each is known to be a distance mode and `protocol` (when given) a protocol."""
    modes = tuple(modes)
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes {list(modes)} are invalid: use one or more of {', '.join(MODES)}")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is invalid: use one of {', '.join(PROTOCOLS)}")
    return modes


@dataclass
class _Ranked:
    """The test split ranked under one protocol, one RankingResult per mode (in the order asked for)."""

    results: dict[str, RankingResult]
    query_index: np.ndarray  # rows of the FeatureSet that are queries
    gallery_index: np.ndarray  # and gallery entries
    ids: dict[str, np.ndarray]  # q_pids, g_pids, q_cams, g_cams
    first_distance: torch.Tensor  # (Nq, Ng) of the first mode, for distances.npz
    # mode -> the queries drawn with their top-K (eval.visualize), empty when none are
    shown: dict[str, list[visualize.RankedQuery]]

    def num_test_ids(self) -> int:
        """Identities a query or gallery entry belongs to; junk (-1) and distractors (0) are nobody."""
        return len(set(np.concatenate([self.ids["q_pids"], self.ids["g_pids"]]).tolist()) - {-1, 0})


def _rank(feature_set: FeatureSet, modes: tuple[str, ...], fusion_rate: float, protocol: str,
          config: Config, visualize_top: int = 0) -> _Ranked:
    """The fused distance of every mode (re-ranked with eval.rerank) and its CMC, mAP and mINP; with
    visualize_top, the top-K of the queries drawn (visualize.chosen_queries), taken while the mode's
    distance is alive."""
    query_index, gallery_index = query_gallery_split(feature_set.identity, feature_set.camera,
                                                     feature_set.is_query, protocol)
    query, gallery = feature_set.features[query_index], feature_set.features[gallery_index]
    ids = dict(q_pids=feature_set.identity[query_index], g_pids=feature_set.identity[gallery_index],
               q_cams=feature_set.camera[query_index], g_cams=feature_set.camera[gallery_index])
    results, first_distance, shown = {}, None, {}
    tracklets = {"q": feature_set.tracklet[query_index], "g": feature_set.tracklet[gallery_index]}
    # global and local are branches of the stal distance: one branch_distances per attention mode, and only
    # one pair of (Nq, Ng) matrices alive at a time
    for attention in dict.fromkeys(_ATTENTION_OF.get(mode, mode) for mode in modes):
        d_l, d_g = branch_distances(query, gallery, attention, part_norm=config.model.part_norm)
        for mode in (m for m in modes if _ATTENTION_OF.get(m, m) == attention):
            distance = fuse(d_l, d_g, mode, fusion_rate)
            if config.eval.rerank:
                distance = _reranked(distance, query, gallery, mode, fusion_rate, config)
            if mode == modes[0]:
                first_distance = distance
            results[mode] = result = evaluate_ranking(distance, *ids.values(), ranks=tuple(config.eval.ranks),
                                                      ap=ap_rule(protocol))
            if visualize_top:
                chosen = visualize.chosen_queries(result.evaluated, result.average_precision,
                                                  seed=config.train.seed)
                rows = distance[torch.as_tensor(list(chosen), dtype=torch.long, device=distance.device)]
                shown[mode] = visualize.ranked_queries(chosen, rows.detach().cpu().numpy(), ids, tracklets,
                                                       result.evaluated, result.average_precision,
                                                       visualize_top)
    return _Ranked({mode: results[mode] for mode in modes}, query_index, gallery_index, ids, first_distance,
                   {mode: shown[mode] for mode in modes if mode in shown})


def _write_report(out_dir: str, metrics: report.Metrics, feature_set: FeatureSet,
                  distances: _Ranked | None) -> str:
    """metrics.json, cmc.png, attention.png and, when `distances` are given, distances.npz (the first mode's
    distance with the identities and cameras it ranks) into out_dir; returns metrics.json's path."""
    metrics_path = report.write_metrics(out_dir, metrics)
    report.plot_cmc(storage.join(out_dir, report.CMC_FILE), metrics.results)
    report.plot_attention(storage.join(out_dir, report.ATTENTION_FILE), feature_set.sample_scores,
                          feature_set.sample_frames, _captions(feature_set))
    if distances is not None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, dist=distances.first_distance.detach().cpu().numpy(),
                            mode=next(iter(distances.results)),
                            q_tracklets=feature_set.tracklet[distances.query_index],
                            g_tracklets=feature_set.tracklet[distances.gallery_index], **distances.ids)
        report.write_bytes(storage.join(out_dir, DISTANCES_FILE), buffer.getvalue())
    return metrics_path


def _draw_ranked(out_dir: str, ranked: _Ranked, feature_set: FeatureSet, config: Config,
                 endpoint_url: str | None) -> str:
    """The ranked galleries of ranked.shown into out_dir/ranked/, their frames read from the test shards
    the features came from (only the row groups of the tracklets drawn); returns the index's path."""
    num_frames = dict(zip(feature_set.tracklet.tolist(), feature_set.num_frames.tolist(), strict=True))
    positions = visualize.frames_to_read(ranked.shown, num_frames)
    data = resolve_data(feature_set.source["data"], endpoint_url=endpoint_url)
    frames = tracklet_frames(data, positions, config.data.height, config.data.width)
    top = max(len(query.gallery) for queries in ranked.shown.values() for query in queries)
    return visualize.write_ranked_results(out_dir, ranked.shown, frames, top)


def _reranked(distance, query, gallery, mode: str, fusion_rate: float, config: Config):
    """eval.rerank: the mode's distance re-ranked by k-reciprocal encoding (stal_ray.evaluate.rerank)."""
    settings = config.eval
    print(f"re-ranking {mode} (k1={settings.rerank_k1}, k2={settings.rerank_k2}, "
          f"lambda={settings.rerank_lambda})")
    return reranked_distance(distance, query, gallery, mode, fusion_rate, part_norm=config.model.part_norm,
                             k1=settings.rerank_k1, k2=settings.rerank_k2,
                             lambda_value=settings.rerank_lambda)


def model_provenance(model_path: str, meta: dict) -> dict:
    """Which model a report is of: its file, the iteration it was saved at and why (the best validation
    score, or the last iteration), as train.loop recorded them in model.pt."""
    extra = meta.get("extra", {})
    return {"path": model_path, "iteration": extra.get("iteration", extra.get("iterations")),
            "selected_by": extra.get("selected_by", "last iteration"), "score": extra.get("score")}


def _with_overrides(config: Config, overrides, model_path: str) -> Config:
    """The model file's config with `section.key=value` overrides; the model's own settings cannot change."""
    if isinstance(overrides, str):
        overrides = [overrides]
    layered = config.to_dict()
    for override in overrides:
        for section, values in parse_override(override).items():
            for key, value in values.items():
                dotted = f"{section}.{key}"
                if section == "model" or dotted in _FIXED_BY_MODEL:
                    raise ValueError(f"{dotted} is fixed by the model file {model_path} "
                                     f"({getattr(getattr(config, section, None), key, '?')}); drop the "
                                     f"override {override!r}")
                layered.setdefault(section, {})[key] = value
    return config_from_dict(layered)


def _features(model_path: str, prepared: PreparedData | str, config: Config, features_path: str,
              endpoint_url: str | None, use_gpu: bool | None, concurrency: int | None,
              cpu_share: float = 0.5) -> FeatureSet:
    """The saved features when they came from this model file and data set, else extracted and saved."""
    fs, path = storage.filesystem(model_path, endpoint_url=endpoint_url, check=False)
    with storage.errors(model_path, endpoint_url):
        model_key = fs.ukey(path)  # size and modification time (ETag on S3): a retrained model is seen
    data = config.data
    # the data set's version too: a data set prepared again at the same URI (e.g. --pollute --overwrite, or
    # joints added by estimate_pose.py) is another data set, whose features must be extracted again
    if not isinstance(prepared, PreparedData):
        prepared = resolve_data(prepared, endpoint_url=endpoint_url)
    data_uri, manifest = prepared.uri, prepared.manifest
    source = {"model": model_path, "model_key": model_key, "data": data_uri,
              "data_version": f"{manifest.version} {manifest.created}",
              "seq_len": data.seq_len, "height": data.height, "width": data.width}
    features_fs, features_local = storage.filesystem(features_path, endpoint_url=endpoint_url, check=False)
    with storage.errors(features_path, endpoint_url):
        saved_before = features_fs.exists(features_local)
    if saved_before:
        try:
            saved = load_features(features_path)
        except ValueError as error:
            logger.warning("extracting again: %s", error)
        else:
            if {k: v for k, v in saved.source.items() if k != "dataset"} == source:
                print(f"reusing features from {features_path}")
                return saved
            print(f"{features_path} came from another model file or data set: extracting again")
    check_shards(prepared, ("test",))  # before hours of work
    gpus = int(ray.cluster_resources().get("GPU", 0)) if use_gpu is not False else 0
    if concurrency is None:
        concurrency = max(1, gpus)  # one actor per GPU
    # a CPU actor's PyTorch threads: half of a node, the rest decodes frames
    node_cpus = max((node["Resources"].get("CPU", 1) for node in ray.nodes() if node["Alive"]), default=2)
    num_cpus = 1 if gpus else max(1, int(node_cpus * cpu_share))
    described = manifest.dataset
    dataset = evaluation_dataset(prepared, config)
    feature_set = extract_features(dataset, model_path, batch_size=config.eval.batch_size, use_gpu=use_gpu,
                                   concurrency=concurrency, num_cpus=num_cpus,
                                   keep_scores_for=SAMPLED_TRACKLETS,
                                   total_frames=manifest.counts["test"]["frames"])
    positions = {t: report.shown_frames(len(s)) for t, s in feature_set.sample_scores.items()}
    feature_set.sample_frames = tracklet_frames(prepared, positions, data.height, data.width)
    feature_set.source = {**source, "dataset": described}  # what the data set is, read with its features
    save_features(feature_set, features_path)
    return feature_set


def _captions(feature_set: FeatureSet) -> dict[int, str]:
    where = {t: i for i, t in enumerate(feature_set.tracklet.tolist())}
    captions = {}
    for tracklet in feature_set.sample_scores:
        i = where[tracklet]
        role = "query" if feature_set.is_query[i] else "gallery"
        captions[tracklet] = (f"identity {feature_set.identity[i]}, camera {feature_set.camera[i]}, "
                              f"{role} tracklet {tracklet}, {feature_set.num_frames[i]} frames")
    return captions
