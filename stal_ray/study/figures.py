"""The study's own plots (fusion sweep, sequence-length heat map, attention per part); CMC curves and
attention maps come from evaluate.report."""

from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402

from stal_ray.evaluate.ranking import RankingResult  # noqa: E402
from stal_ray.evaluate.report import save_figure  # noqa: E402


def plot_fusion_rates(path: str, results: Mapping[float, RankingResult], chosen: float) -> str:
    """Fig. 8: rank-1 and mAP against the fusion rate α, the configured α marked."""
    alphas = sorted(results)
    figure, axes = plt.subplots(figsize=(6, 3.6))
    axes.plot(alphas, [100 * results[a].cmc[1] for a in alphas], marker="o", label="rank-1")
    axes.plot(alphas, [100 * results[a].mAP for a in alphas], marker="s", label="mAP")
    axes.axvline(chosen, color="grey", linestyle=":", label=f"configured α = {chosen:g}")
    axes.set(xlabel="fusion rate α  (d = d_l + α·d_g)", ylabel="%", title="Fusion rate")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return save_figure(figure, path)


def plot_sequence_lengths(path: str, labels: list[str], grid: np.ndarray) -> str:
    """Fig. 11: rank-1 (%) per query length (rows) and gallery length (columns), annotated."""
    figure, axes = plt.subplots(figsize=(1.1 * len(labels) + 2, 0.9 * len(labels) + 1.5))
    image = axes.imshow(100 * grid, cmap="viridis", origin="lower")
    for (i, j), value in np.ndenumerate(100 * grid):
        axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize="small",
                  color="white" if value < 100 * (grid.min() + grid.max()) / 2 else "black")
    axes.set_xticks(range(len(labels)), labels)
    axes.set_yticks(range(len(labels)), labels)
    axes.set(xlabel="gallery sequence length", ylabel="query sequence length", title="Rank-1 (%)")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    return save_figure(figure, path)


def plot_part_attention(path: str, by_part: Mapping[str, tuple[float, float, int]]) -> str:
    """Mean relative attention score (1 = the tracklet's average unit) of each part, visible and hidden."""
    names = list(by_part)
    x = np.arange(len(names))
    visible = [by_part[n][0] for n in names]
    hidden = [by_part[n][1] for n in names]
    figure, axes = plt.subplots(figsize=(7, 3.6))
    axes.bar(x - 0.2, visible, 0.4, label="visible")
    axes.bar(x + 0.2, np.nan_to_num(hidden), 0.4, label="hidden (no visible joint)")
    axes.axhline(1.0, color="grey", linestyle=":")
    axes.set_xticks(x, [n.replace("_", " ") for n in names])
    axes.set(ylabel="score / tracklet mean", title="Spatial attention per body part")
    axes.legend(fontsize="small")
    return save_figure(figure, path)
