"""report.md of a study: every measurement as a table next to its figure, and what they say."""

import math
from dataclasses import dataclass, field

import numpy as np

from stal_ray.config import Config
from stal_ray.evaluate.ranking import RankingResult, ap_rule
from stal_ray.evaluate.report import AP_DEFINITIONS, write_bytes
from stal_ray.study.analysis import OcclusionSummary, paired_with
from stal_ray.study.variants import VARIANTS

RANKS = (1, 5, 10, 20)


@dataclass
class StudyResults:
    """Everything the report shows; to_json() is results.json."""

    data: str
    command: str
    config: Config
    alpha: float
    protocol: str
    num_query: int
    num_gallery: int
    identities: int
    train_seconds: dict[str, float]
    attention: dict[str, RankingResult] = field(default_factory=dict)
    attention_local: dict[str, RankingResult] = field(default_factory=dict)
    branches: dict[str, RankingResult] = field(default_factory=dict)
    parts: dict[str, RankingResult] = field(default_factory=dict)
    fusion: dict[float, RankingResult] = field(default_factory=dict)
    occlusion: dict[str, OcclusionSummary] = field(default_factory=dict)
    has_keypoints: bool = False
    before_after: dict[str, dict[str, RankingResult]] = field(default_factory=dict)
    length_labels: list[str] = field(default_factory=list)
    length_grid: np.ndarray | None = None
    examples: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        def ranking(results):
            return {str(k): {"mAP": r.mAP, "mAP_step": r.mAP_step, "mINP": r.mINP,
                             "cmc": {str(rank): r.cmc.get(rank) for rank in RANKS}}
                    for k, r in results.items()}

        return {
            "data": self.data, "command": self.command, "config": self.config.to_dict(),
            "fusion_rate": self.alpha, "protocol": self.protocol, "ap_rule": ap_rule(self.protocol),
            "num_query": self.num_query,
            "num_gallery": self.num_gallery, "identities": self.identities,
            "train_seconds": self.train_seconds, "seconds": self.seconds,
            "attention_ablation": ranking(self.attention),
            "attention_ablation_local": ranking(self.attention_local),
            "branch_ablation": ranking(self.branches),
            "parts": ranking(self.parts), "fusion_rate_sweep": ranking(self.fusion),
            "occlusion": {name: vars(summary) for name, summary in self.occlusion.items()},
            "has_keypoints": self.has_keypoints,
            "stan_batchnorm": {name: ranking(results) for name, results in self.before_after.items()},
            "sequence_length": {"labels": self.length_labels,
                                "rank1": None if self.length_grid is None else self.length_grid.tolist()},
            "attention_examples": self.examples,
        }


def _pct(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def _ranking_table(results: dict, first: str, reference: str | None = None) -> str:
    rows = [[str(k), _pct(r.mAP), *(_pct(r.cmc.get(rank)) for rank in RANKS)] for k, r in results.items()]
    headers = [first, "mAP (%)", *(f"R{rank} (%)" for rank in RANKS)]
    if reference is not None:  # how many queries each difference rests on
        paired = paired_with(results, reference)
        rows = [row + [f"{paired[k][0]} / {paired[k][1]}"] for row, k in zip(rows, results, strict=True)]
        headers.append(f"queries better / worse than {reference}")
    return _table(headers, rows)


def _verdict(holds: bool) -> str:
    return "**holds**" if holds else "**does not hold**"


def _versus_baseline(results: dict[str, RankingResult], distance: str) -> str:
    stal, baseline = results["stal"], results["baseline"]
    better, worse = paired_with(results, "baseline")["stal"]
    return (f"- With {distance}, STAL's mAP exceeds the baseline's (all attention scores equal, same model): "
            f"{_pct(stal.mAP)}% vs {_pct(baseline.mAP)}%, {_verdict(stal.mAP > baseline.mAP)}; the "
            f"difference rests on {better} queries ranked better and {worse} worse of {stal.num_query} (the "
            f"baseline already puts a true match first for {_pct(baseline.cmc.get(1))}% of them).")


def _score(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def write_report(path: str, r: StudyResults) -> str:
    c = r.config
    occlusion = r.occlusion.get("stal")
    lines = [
        "# STAL study",
        "",
        f"Data: `{r.data}`: {r.num_query} queries, {r.num_gallery} gallery tracklets, {r.identities} test "
        f"identities, protocol {r.protocol}. Reproduce with:",
        "", f"    {r.command}", "",
        f"mAP throughout is the {AP_DEFINITIONS[ap_rule(r.protocol)]} (results.json keeps the step-rule "
        "`mAP_step` and `mINP` beside it).", "",
        f"Every model: backbone {c.model.backbone}, {c.train.iterations} iterations of P×K = "
        f"{c.data.identities_per_batch}×{c.data.clips_per_identity} clips of T = {c.data.seq_len} frames at "
        f"{c.data.height}×{c.data.width}, lr {c.train.lr} (×{c.train.gamma} every {c.train.lr_step}), "
        f"λ = {c.train.local_weight}, m_g = {c.train.margin_global}, m_l = {c.train.margin_local}, seed "
        f"{c.train.seed}; test fusion rate α = {r.alpha}. Run time {r.seconds / 60:.1f} min, of which "
        "training (a model an earlier run of the study finished is only loaded) "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in r.train_seconds.items()) + ".",
        "",
        "## What it shows",
        "",
        _versus_baseline(r.attention, f"d = d_l + {r.alpha}·d_g"),
        _versus_baseline(r.attention_local, "d_l alone (α = 0)"),
    ]
    if occlusion is not None and r.has_keypoints and occlusion.hidden_units:
        lines.append(
            f"- Hidden units (a body part none of whose joints is visible in that frame) get lower attention "
            f"than visible units of the same part: {_verdict(occlusion.within_part_ratio < 1)}. Their "
            f"score is "
            f"{_score(occlusion.within_part_ratio)}× the visible ones' (part by part, weighted by hidden "
            f"units), "
            f"and lower in {occlusion.pairs_lower} of {occlusion.pairs_compared} (tracklet, part) pairs with "
            f"both. Over all units, {_score(occlusion.hidden_mean)} vs {_score(occlusion.visible_mean)} "
            f"({occlusion.hidden_units} hidden units), which also reflects which parts STAN values (§3).")
        lines.append(
            f"- Temporal attention: a frame with at least half of its parts hidden gets "
            f"{_score(occlusion.frame_ratio)}× the score of a frame with none hidden (a frame's score is the "
            f"mean over its parts, what `tan` weighs frames by); "
            f"{_verdict(occlusion.frame_ratio < 1)} that it scores lower.")
    else:
        lines.append("- The data set carries no keypoints (or no part is ever hidden), so there is no "
                     "occlusion "
                     "ground truth to compare attention scores with.")
    lines += [
        "",
        "## 1. Attention ablation (§IV-C1)",
        "",
        "One trained STAL model, ranked with no attention (`baseline`, every score 1), temporal "
        "attention only "
        "(`tan`, each frame's scores averaged over parts), spatial only (`san`, each part's averaged over "
        f"frames) and both (`stal`); d = d_l + {r.alpha}·d_g.",
        "", _ranking_table(r.attention, "attention", "baseline"), "",
        "The same with d_l alone (α = 0), the distance the attention scores weigh:", "",
        _ranking_table(r.attention_local, "attention", "baseline"), "",
        "![attention ablation](attention_ablation.png)", "",
        "## 2. Branch ablation (§IV-C2)",
        "",
        "Each branch trained alone (`train.branches`), each branch of the jointly trained model, and the "
        "joint "
        "model trained without the residual attention branch (`model.residual_attention=false`).",
        "", _ranking_table(r.branches, "model / branch"), "", "![branch ablation](branch_ablation.png)", "",
        "## 3. Body parts (Fig. 7)",
        "",
        "Each part's attention-aggregated feature (Eq. 9) alone, ranked by ||f_i^r − f_j^r||, and all parts "
        "weighted by their spatial attention (d_l, Eq. 8).",
        "", _ranking_table(r.parts, "part"), "", "![CMC per part](parts_cmc.png)", "",
    ]
    if occlusion is not None:
        rows = [[name.replace("_", " "), _score(visible), _score(hidden), count]
                for name, (visible, hidden, count) in occlusion.by_part.items()]
        lines += [
            "Spatial attention each part receives, visible and hidden (a unit's score over its tracklet's "
            "mean score, so 1 is average):", "",
            _table(["part", "visible", "hidden", "hidden units"], rows), "",
            "![attention per part](parts_attention.png)", "",
        ]
    lines += [
        "## 4. Fusion rate (Fig. 8) and sequence length (Fig. 11)",
        "",
        _table(["α", "mAP (%)", "R1 (%)"],
               [[f"{a:g}", _pct(x.mAP), _pct(x.cmc.get(1))] for a, x in r.fusion.items()]),
        "", "![fusion rate](fusion_rate.png)", "",
        "Rank-1 (%) with L random frames of each query (rows) and gallery tracklet (columns), drawn as "
        "§IV-D4 "
        "does (a shorter tracklet repeats frames); `all` uses every frame.", "",
    ]
    if r.length_grid is not None:
        grid_rows = [[label, *(_pct(v) for v in row)]
                     for label, row in zip(r.length_labels, r.length_grid, strict=True)]
        lines += [_table(["query \\ gallery", *r.length_labels], grid_rows),
                  "", "![sequence length](sequence_length.png)", ""]
    lines += [
        "## 5. Attention maps (Fig. 12)",
        "",
        "The tracklets with the most hidden units; rows are body parts, columns frames, crosses mark hidden "
        "units.", "",
        _table(["tracklet", "identity", "camera", "frames", "hidden units", "hidden mean", "visible mean"],
               [[e["tracklet"], e["identity"], e["camera"], e["frames"], f"{e['hidden_units']} / "
                                                                         f"{e['units']}",
                 _score(e["hidden_mean"]), _score(e["visible_mean"])] for e in r.examples]),
        "", "![attention maps](attention_maps.png)", "",
        "## 6. STAN: BatchNorm, and one FC per frame or over the clip",
        "",
        "Without BatchNorm after its convs (`model.stan_batchnorm=false`) STAN's conv outputs, and so its "
        "FC's logits, stay small and its maps near uniform. With one FC over the whole clip "
        "(`model.stan_fc=clip`, the first STAN) each position has its own weights: the FC learns where a "
        "frame sits more than what it shows, and temporal attention barely tracks occlusion; one FC shared "
        "by the frames (`frame`) is position-free (docs/attention.md has the diagnosis). The models "
        "trained here, side by side with the same data and seed (`stal` with the configured STAN, "
        f"`model.stan_fc={c.model.stan_fc}`, `model.stan_batchnorm={str(c.model.stan_batchnorm).lower()}`):",
        "",
    ]
    rows = []
    for name, results in r.before_after.items():
        summary = r.occlusion.get(name)
        low, high = summary.raw_percentiles if summary else (math.nan, math.nan)
        ratio = summary.within_part_ratio if summary else math.nan
        frames = summary.frame_ratio if summary else math.nan
        rows.append([name, _pct(results["stal"].mAP), _pct(results["tan"].mAP), _pct(results["baseline"].mAP),
                     f"{_score(low)} – {_score(high)}", _score(ratio), _score(frames)])
    headers = ["model", "stal mAP (%)", "tan mAP (%)", "baseline mAP (%)",
               "raw scores, 5th – 95th percentile", "hidden / visible score, same part",
               "occluded / clean frame score"]
    lines += [_table(headers, rows), ""]
    descriptions = {v.name: v.description for v in VARIANTS}
    models = "; ".join(f"`{name}`: {descriptions.get(name, name)}" for name in r.train_seconds)
    lines += [f"Models: {models}.", ""]
    write_bytes(path, "\n".join(lines).encode())
    return path
