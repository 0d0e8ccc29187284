"""The whole study: train the variants, extract their test features, measure, plot, write report.md."""

import json
import time

from stal_ray.config import Config, with_overrides
from stal_ray.core import storage
from stal_ray.data.prepared.handle import PreparedData, as_prepared
from stal_ray.data.stream.pipeline import evaluation_dataset
from stal_ray.evaluate.features import extract_features, tracklet_frames
from stal_ray.evaluate.report import plot_attention, plot_cmc, shown_frames, write_bytes
from stal_ray.study import analysis, figures
from stal_ray.study.report import StudyResults, write_report
from stal_ray.study.seeds import seeds_table
from stal_ray.study.units import extract_with_units
from stal_ray.study.variants import SEQUENCE_LENGTHS, VARIANTS, train_variants
from stal_ray.train.preflight import preflight
from stal_ray.train.run_config import record_config

FUSION_RATES = tuple(round(0.1 * i, 1) for i in range(11))  # Fig. 8: 0 to 1 by 0.1
# the models of the STAN comparison (report section 6): their unit scores are extracted
STAN_VARIANTS = ("stan_clip_fc", "stan_no_bn", "stal")
ATTENTION_EXAMPLES = 4  # tracklets in the Fig. 12 figure
REPORT_FILE, RESULTS_FILE, SEEDS_FILE = "report.md", "results.json", "seeds.md"


def run_study(config: Config, data: PreparedData | str, out: str, *, command: str,
              sequence_lengths=SEQUENCE_LENGTHS, fusion_rates=FUSION_RATES, variants=VARIANTS,
              allow_changed_config: bool = False) -> str:
    """Run every step into `out` and return the path of report.md. `command` is recorded in the report.
    `variants` (stal always among them) chooses the models trained; the sections that compare a variant
    left out are left out of the report. A study in `out` started earlier resumes with the settings of its
    config.yaml: others raise ChangedConfigError naming them, unless allow_changed_config, which records the
    change (train/run_config.py)."""
    start = time.perf_counter()
    if "stal" not in {v.name for v in variants}:
        raise ValueError("a study needs the stal variant: every section ranks its model")
    endpoint_url = data.endpoint_url if isinstance(data, PreparedData) else None
    storage.check_output_folder(out, "--out", endpoint_url=endpoint_url)  # before hours of training
    data = as_prepared(data)
    # before the first variant's run folder is written, with the storage path the variants train into
    preflight(with_overrides(config, [f"train.storage_path={storage.join(out, 'runs')}"]), data)
    settings = config.to_dict()
    settings["data"]["root"] = data.uri  # the data set studied (the synthetic one's cache path, generated)
    record_config(out, settings, allow_changed=allow_changed_config, endpoint_url=data.endpoint_url,
                  what="study")
    trained = train_variants(config, data, out, variants=variants, allow_changed_config=allow_changed_config)
    stream = dict(batch_size=config.eval.batch_size, use_gpu=config.train.use_gpu or None)
    alpha, protocol = config.eval.fusion_rate, config.eval.protocol

    def test_split(**options):
        return evaluation_dataset(data, config, **options)

    print("study: extracting test features", flush=True)
    features, units = {}, {}
    for name, variant in trained.items():
        if name in STAN_VARIANTS:  # the occlusion comparison needs their unit scores
            features[name], units[name] = extract_with_units(test_split(), variant.model_path, **stream)
        else:
            features[name] = extract_features(test_split(), variant.model_path, **stream)
    part_norm = config.model.part_norm
    rankers = {name: analysis.Ranker(feature_set, protocol, part_norm=part_norm)
               for name, feature_set in features.items()}
    stal = rankers["stal"]

    results = StudyResults(data=data.uri, command=command, config=config, alpha=alpha, protocol=protocol,
                           num_query=len(stal.query), num_gallery=len(stal.gallery),
                           identities=len((set(stal.ids[0].tolist()) | set(stal.ids[1].tolist())) - {-1, 0}),
                           train_seconds={n: v.seconds for n, v in trained.items()})
    results.attention = analysis.attention_ablation(stal, alpha)
    results.attention_local = analysis.attention_ablation(stal, 0.0)  # d_l alone: where attention acts
    branches = {
        "global branch trained alone": ("global_alone", "global"),
        "local branch trained alone": ("local_alone", "local"),
        "global branch of STAL": ("stal", "global"),
        "local branch of STAL": ("stal", "local"),
        "STAL without RAN": ("no_ran", "stal"),
        "STAL": ("stal", "stal"),
    }
    results.branches = {label: rankers[name].mode(mode, alpha)
                        for label, (name, mode) in branches.items() if name in rankers}
    results.parts = analysis.per_part(stal)
    results.fusion = analysis.fusion_rates(stal, fusion_rates)
    results.occlusion = {name: analysis.occlusion_summary(u) for name, u in units.items()}
    results.has_keypoints = units["stal"].has_keypoints
    results.before_after = {name: analysis.attention_ablation(rankers[name], alpha)
                            for name in STAN_VARIANTS if name in rankers}

    print("study: sequence lengths", flush=True)
    by_length = {}
    for length in sequence_lengths:
        label = "all" if length is None else str(length)
        by_length[label] = features["stal"] if length is None else extract_features(
            test_split(sequence_length=length, seed=config.train.seed), trained["stal"].model_path, **stream)
    results.length_labels, results.length_grid = analysis.sequence_lengths(by_length, alpha, protocol,
                                                                           part_norm)

    def figure(name: str) -> str:
        return storage.join(out, name)

    plot_cmc(figure("attention_ablation.png"), results.attention)
    plot_cmc(figure("branch_ablation.png"), results.branches)
    plot_cmc(figure("parts_cmc.png"), results.parts)
    figures.plot_part_attention(figure("parts_attention.png"), results.occlusion["stal"].by_part)
    figures.plot_fusion_rates(figure("fusion_rate.png"), results.fusion, alpha)
    figures.plot_sequence_lengths(figure("sequence_length.png"), results.length_labels, results.length_grid)
    results.examples = _attention_maps(figure("attention_maps.png"), units["stal"], features["stal"], data,
                                       config)
    results.seconds = time.perf_counter() - start
    write_bytes(storage.join(out, RESULTS_FILE), json.dumps(results.to_json(), indent=2).encode())
    return write_report(storage.join(out, REPORT_FILE), results)


def run_seeds(config: Config, data: PreparedData | str, out: str, seeds: list[int], **options) -> str:
    """run_study once per training seed, into <out>/seed-S/, then <out>/seeds.md: each seed's figures, their
    mean ± standard deviation, and the paired differences (stal − baseline of the same model) over seeds.
    Returns the path of seeds.md; a seed whose study finished before is resumed (nothing is retrained)."""
    data = as_prepared(data)
    studies = {}
    for seed in seeds:
        folder = storage.join(out, f"seed-{seed}")
        print(f"study: training seed {seed} of {list(seeds)}, into {folder}", flush=True)
        run_study(with_overrides(config, [f"train.seed={seed}"], source="--seeds"), data, folder, **options)
        fs, path = storage.filesystem(storage.join(folder, RESULTS_FILE), endpoint_url=data.endpoint_url)
        studies[f"seed-{seed}"] = json.loads(fs.cat_file(path))
    text = (f"# The study over training seeds {', '.join(map(str, seeds))}\n\n"
            "Each seed's study is in seed-S/ (its report.md). mAP (%) of the stal model ranked four ways, "
            "the paired differences to its baseline ranking, and the attention ratios; the last table's "
            "mean ± sample standard deviation is over the seeds (stal_ray/study/seeds.py).\n\n"
            + seeds_table(studies))
    target = storage.join(out, SEEDS_FILE)
    write_bytes(target, text.encode())
    return target


def _attention_maps(path, units, feature_set, data: PreparedData, config) -> list[dict]:
    """Fig. 12 for the tracklets with the most hidden units (any tracklets when nothing is known hidden)."""
    chosen = analysis.most_occluded(units, ATTENTION_EXAMPLES) or sorted(set(units.tracklet.tolist()))[
        :ATTENTION_EXAMPLES]
    row_of = {t: i for i, t in enumerate(feature_set.tracklet.tolist())}
    scores, hidden, captions, examples = {}, {}, {}, []
    for tracklet in chosen:
        scores[tracklet], hidden[tracklet] = units.tracklet_map(tracklet)
        row = row_of[tracklet]
        s, h = scores[tracklet], hidden[tracklet]
        example = {"tracklet": tracklet, "identity": int(feature_set.identity[row]),
                   "camera": int(feature_set.camera[row]), "frames": int(s.shape[0]),
                   "hidden_units": int(h.sum()), "units": int(h.size),
                   "hidden_mean": float(s[h].mean()) if h.any() else float("nan"),
                   "visible_mean": float(s[~h].mean()) if (~h).any() else float("nan")}
        examples.append(example)
        captions[tracklet] = (f"identity {example['identity']}, camera {example['camera']}, tracklet "
                              f"{tracklet}: "
                              f"{example['hidden_units']} hidden units (x), mean score "
                              f"{example['hidden_mean']:.2f} "
                              f"vs {example['visible_mean']:.2f} visible")
    positions = {t: shown_frames(len(s)) for t, s in scores.items()}
    frames = tracklet_frames(data, positions, config.data.height, config.data.width)
    plot_attention(path, scores, frames, captions, marks=hidden)
    return examples
