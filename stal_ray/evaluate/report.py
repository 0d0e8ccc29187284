"""What an evaluation leaves behind: metrics.json, the CMC plot, attention maps like the paper's Fig. 12, and
a printed table; written to a local folder or any fsspec URL (s3://)."""

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from stal_ray.core import storage  # noqa: E402
from stal_ray.core.skeleton import PART_NAMES  # noqa: E402

METRICS_FILE, CMC_FILE, ATTENTION_FILE = "metrics.json", "cmc.png", "attention.png"
# frames drawn above each attention map (Fig. 12 shows four per video)
FRAMES_SHOWN = 8
CMC_RANKS_PLOTTED = 20


def write_bytes(uri: str, data: bytes) -> None:
    """data to a local path or an fsspec URL in one step (storage.write_atomic), readable by this user only
    on local disk, as report files always were. train/, tune.py and study/ write their files with it too."""
    storage.write_atomic(uri, data, mode=0o600)


# what each number of metrics.json is; mAP's text depends on the AP rule of the protocol (ranking.AP_RULE_OF)
AP_DEFINITIONS = {
    "trapezoid": "mean AP by the trapezoid rule of the official MARS evaluation code (utils/compute_AP.m): "
                 "per true match, the mean of the precision at the entry ranked just above it and at it",
    "step": "mean AP by the step rule of torchreid and fast-reid: per query, the mean of the precision at "
            "each true match",
}
DEFINITIONS = {
    "mAP_step": AP_DEFINITIONS["step"],
    "mINP": "fast-reid's mean inverse negative penalty: per query, its true matches over the rank of the "
            "last (hardest) one",
    "cmc": "rank -> fraction of the evaluated queries with a true match within that rank",
    "percent": "the same numbers in percent, named as torchreid and fast-reid print them (Rank-k, mAP, mINP)",
    "ties": "tied distances rank in gallery order (a stable sort, as the official code's MATLAB sort)",
}


def ap_rule_of(results: Mapping) -> str:
    """The AP rule the results' mAP follows (they are ranked under one protocol, so one rule)."""
    rules = {result.ap for result in results.values()}
    if len(rules) != 1:
        raise ValueError(f"the results mix AP rules {sorted(rules)}: rank every mode under one protocol")
    return rules.pop()


def familiar_metrics(result) -> dict[str, float]:
    """A result as torchreid and fast-reid users read it: Rank-k, mAP, mAP_step, mINP, in percent."""
    values = {f"Rank-{rank}": 100 * float(value) for rank, value in sorted(result.cmc.items())}
    values.update({"mAP": 100 * float(result.mAP), "mAP_step": 100 * float(result.mAP_step),
                   "mINP": 100 * float(result.mINP)})
    return values


@dataclass(frozen=True)
class Metrics:
    """What metrics.json reports of one evaluation: `results` (mode -> ranking.RankingResult, ranked under
    one protocol) and how they were obtained. `model`: which model file was evaluated, from which iteration
    and why (evaluate.model_provenance); `rerank`: k1, k2 and lambda, only when the distances were
    re-ranked; `dataset`: the evaluated data set, its protocol, what the model was trained on and whether
    this is a cross-dataset test (data.protocol.cross_dataset)."""

    results: Mapping
    fusion_rate: float
    protocol: str
    num_query: int
    num_gallery: int
    num_test_ids: int
    skipped: int  # queries with no true match in the gallery, left out of every number
    model: Mapping | None = None
    rerank: Mapping | None = None
    dataset: Mapping | None = None


def metrics_dict(metrics: Metrics) -> dict:
    """The metrics.json document: per mode mAP (the protocol's AP rule), mAP_step, mINP and CMC at the
    reported ranks as fractions in [0, 1], and the same in percent under torchreid/fast-reid names, with
    the fields of `metrics` around them."""
    rule = ap_rule_of(metrics.results)
    return {
        "model": dict(metrics.model or {}),
        "dataset": dict(metrics.dataset or {}),
        "modes": {mode: {"mAP": float(result.mAP), "mAP_step": float(result.mAP_step),
                         "mINP": float(result.mINP),
                         "cmc": {str(rank): float(value) for rank, value in sorted(result.cmc.items())},
                         "percent": familiar_metrics(result)}
                  for mode, result in metrics.results.items()},
        "ap_rule": rule,
        "definitions": {"mAP": AP_DEFINITIONS[rule], **DEFINITIONS},
        "fusion_rate": float(metrics.fusion_rate),
        "protocol": metrics.protocol,
        "num_query": int(metrics.num_query),
        "num_gallery": int(metrics.num_gallery),
        "num_test_ids": int(metrics.num_test_ids),
        "skipped_queries": int(metrics.skipped),
        # only when the distances were re-ranked (eval.rerank): its k1, k2 and lambda
        **({"rerank": dict(metrics.rerank)} if metrics.rerank else {}),
    }


def write_metrics(out_dir: str, metrics: Metrics) -> str:
    """Write out_dir/metrics.json (metrics_dict) and return its path."""
    path = storage.join(out_dir, METRICS_FILE)
    write_bytes(path, (json.dumps(metrics_dict(metrics), indent=2) + "\n").encode())
    return path


def format_table(results: Mapping) -> str:
    """Rank-k, mAP (and mAP_step when mAP follows the trapezoid rule) and mINP per mode, in percent as
    torchreid prints them, with a line saying which AP each column is."""
    rule = ap_rule_of(results)
    ranks = sorted({rank for result in results.values() for rank in result.cmc})
    columns = [f"Rank-{rank}" for rank in ranks] + ["mAP", "mAP_step", "mINP"]
    if rule == "step":  # mAP is the step rule itself
        columns.remove("mAP_step")
    widths = [max(9, len(column) + 2) for column in columns]
    header = f"{'mode':<10}" + "".join(f"{column:>{width}}" for column, width in zip(columns, widths,
                                                                                      strict=True))
    lines = [header, "-" * len(header)]
    for mode, result in results.items():
        values = familiar_metrics(result)
        cells = "".join(f"{values[column]:>{width - 1}.1f}%" if column in values else f"{'-':>{width}}"
                        for column, width in zip(columns, widths, strict=True))
        lines.append(f"{mode:<10}{cells}")
    if rule == "step":
        lines.append("mAP: step rule (torchreid, fast-reid); mINP: fast-reid's; ties in gallery order")
    else:
        lines.append("mAP: trapezoid rule of the official MARS code; mAP_step: step rule (torchreid, "
                     "fast-reid); mINP: fast-reid's; ties in gallery order")
    return "\n".join(lines)


def save_figure(figure, path: str) -> str:
    """A matplotlib figure as a PNG at `path` (local or fsspec URL), closed; returns the path."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    write_bytes(path, buffer.getvalue())
    return path


def plot_cmc(path: str, results: Mapping, max_rank: int = CMC_RANKS_PLOTTED) -> str:
    """CMC curves, rank 1..max_rank, one per mode, labelled with its mAP."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for mode, result in results.items():
        curve = np.asarray(result.cmc_curve, dtype=float)[:max_rank]
        axes.plot(np.arange(1, len(curve) + 1), 100 * curve, marker="o", markersize=3,
                  label=f"{mode} (mAP {result.mAP:.1%})")
    axes.set(xlabel="rank", ylabel="matching rate (%)", title="CMC", xlim=(0.5, max_rank + 0.5))
    axes.set_xticks([1, 5, 10, 15, 20] if max_rank == 20 else range(1, max_rank + 1))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    return save_figure(figure, path)


def shown_frames(num_frames: int, count: int = FRAMES_SHOWN) -> np.ndarray:
    """Positions of the frames drawn above a tracklet's attention map: `count` evenly spaced ones."""
    return np.unique(np.linspace(0, num_frames - 1, min(num_frames, count)).round().astype(np.int64))


def plot_attention(path: str, sample_scores: Mapping[int, np.ndarray],
                   frames: Mapping[int, np.ndarray] | None = None,
                   captions: Mapping[int, str] | None = None,
                   marks: Mapping[int, np.ndarray] | None = None) -> str:
    """Fig. 12: per sampled tracklet, its attention scores as a heat map (rows: the body parts, columns: the
    frames), under its frames at shown_frames positions when given. scores (n_frames, R) per tracklet;
    marks (n_frames, R) bool per tracklet: units drawn with a cross (e.g. parts known to be hidden)."""
    frames, captions, marks = frames or {}, captions or {}, marks or {}
    tracklets = list(sample_scores)
    if not tracklets:  # still a file, so the report always has its three pictures
        figure, axes = plt.subplots(figsize=(4, 1))
        axes.axis("off")
        axes.text(0.5, 0.5, "no attention scores sampled", ha="center", va="center")
        return save_figure(figure, path)
    heights = []
    for tracklet in tracklets:
        heights += ([1.4] if tracklet in frames else []) + [1.0]
    figure, axes_list = plt.subplots(len(heights), 1, figsize=(8, 1.4 * sum(heights)), layout="constrained",
                                     gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes_iter = iter(axes_list[:, 0])
    names = [name.replace("_", " ") for name in PART_NAMES]
    for tracklet in tracklets:
        scores = np.asarray(sample_scores[tracklet])
        title = captions.get(tracklet, f"tracklet {tracklet}")
        if tracklet in frames:
            axes = next(axes_iter)
            strip = np.concatenate(list(frames[tracklet]), axis=1)
            axes.imshow(strip)
            axes.set_title(title, fontsize="small")
            positions = shown_frames(len(scores))[:len(frames[tracklet])]
            width = frames[tracklet].shape[2]
            axes.set_xticks((np.arange(len(positions)) + 0.5) * width, [str(p + 1) for p in positions],
                            fontsize="x-small")
            axes.set_yticks([])
            title = None
        axes = next(axes_iter)
        count, parts = scores.shape
        # columns centred on frame numbers 1..n, as the frames above are numbered
        image = axes.imshow(scores.T, aspect="auto", cmap="viridis", interpolation="nearest",
                            extent=(0.5, count + 0.5, parts - 0.5, -0.5))
        if tracklet in marks:
            frame, part = np.nonzero(np.asarray(marks[tracklet]))
            axes.scatter(frame + 1, part, marker="x", s=18, c="red", linewidths=1)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
        axes.set_yticks(range(parts), names if parts == len(names) else range(1, parts + 1),
                        fontsize="x-small")
        axes.set_xlabel("frame", fontsize="x-small")
        axes.tick_params(axis="x", labelsize="x-small")
        if title:
            axes.set_title(title, fontsize="small")
        figure.colorbar(image, ax=axes, fraction=0.03, pad=0.01)
    return save_figure(figure, path)
