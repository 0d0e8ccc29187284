"""Why STAN's temporal attention does not learn: the measurements of docs/attention.md, on the CPU, no Ray.

Trains the tiny STAL model in this process (the study's recipe: T = 4, 64×32, P×K = 4×2, SGD lr 0.01, λ
0.3, ground-truth keypoints) on a small occluded synthetic set rendered in memory, once per variant, and
prints for each, as markdown rows:
* gradient reaching the raw scores s (B, T, R), split into its frame effect (mean over parts, centred),
  its part effect (mean over frames, centred) and the rest: how much of STAN's training signal is temporal;
* the share of anchors whose local triplet is active (batch-hard loss > 0): the only term that reaches STAN;
* position: the same frame scored at two positions of the clip (the clip rolled by one frame), the mean
  score change over the spread of scores between frames of a clip (0 = position-independent);
* on the test tracklets, hidden units' score over visible units' of the same part (the study's figure), and
  frames with >= 3 hidden parts over frames with none (the temporal figure: one score per frame);
* test mAP of baseline, tan, san, stal (d_l + 0.3 d_g; every test tracklet a query).

    PYTHONPATH=$PWD python bench/attention_diagnosis.py --steps 240 --variants clip frame ...
"""

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

from stal_ray.data.synthetic import generator as synthetic
from stal_ray.data.synthetic import render as synthetic_render
from stal_ray.evaluate.distance import TrackletFeatures, branch_distances, fuse
from stal_ray.evaluate.ranking import ap_rule, evaluate_ranking
from stal_ray.model.stal import STAL
from stal_ray.objective import STALObjective
from stal_ray.study.analysis import occlusion_summary
from stal_ray.study.units import hidden_parts, unit_scores

T, SIZE = 4, (64, 32)
VARIANTS = {  # name: (STAL keyword arguments, objective keyword arguments, consistency on)
    "clip": ({"stan_fc": "clip"}, {}, True),  # the first STAN: one FC over the whole clip
    "clip_no_bn": ({"stan_fc": "clip", "stan_batchnorm": False}, {}, True),
    "frame": ({"stan_fc": "frame"}, {}, True),  # the default since issue 17
    "frame_no_bn": ({"stan_fc": "frame", "stan_batchnorm": False}, {}, True),
    "clip_all_triplets": ({"stan_fc": "clip"}, {"mining": "all"}, True),
    "clip_no_consistency": ({"stan_fc": "clip"}, {}, False),
    "frame_all_triplets": ({"stan_fc": "frame"}, {"mining": "all"}, True),
}


def render(identities: int, test_identities: int, occlusion: float, occluders: str, seed: int):
    """{split: list of (identity, camera, frames uint8 (n, 3, H, W), keypoints (n, 14, 3))}."""
    train, test, _ = synthetic.plan_tracklets(identities, test_identities, 4, (2, 4), (10, 24), 0, 0, seed)
    out = {}
    for split, tracks in (("train", train), ("test", test)):
        rows = []
        for track in tracks:
            jpegs, keypoints = synthetic_render.render(track, seed, SIZE, occlusion, occluders=occluders)
            frames = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
            rows.append((track.identity, track.camera, torch.from_numpy(frames).permute(0, 3, 1, 2),
                         torch.from_numpy(keypoints)))
        out[split] = rows
    return out


def restricted_random(n: int, rng: np.random.Generator) -> np.ndarray:
    """T frame indices, one from each of T equal chunks of the tracklet (repeats when n < T)."""
    edges = np.linspace(0, n, T + 1)
    return np.array([min(n - 1, int(rng.uniform(edges[i], max(edges[i + 1], edges[i] + 1))))
                     for i in range(T)])


def batches(rows, rng, p=4, k=2):
    by_identity = {}
    for index, (identity, *_rest) in enumerate(rows):
        by_identity.setdefault(identity, []).append(index)
    labels_of = {identity: i for i, identity in enumerate(sorted(by_identity))}
    while True:
        chosen = rng.choice(sorted(by_identity), p, replace=False)
        clips, keypoints, labels = [], [], []
        for identity in chosen:
            for index in rng.choice(by_identity[identity], k, replace=len(by_identity[identity]) < k):
                _, _, frames, kp = rows[index]
                picked = restricted_random(len(frames), rng)
                clips.append(frames[picked])
                keypoints.append(kp[picked])
                labels.append(labels_of[identity])
        yield torch.stack(clips), torch.stack(keypoints), torch.tensor(labels)


def effects(grad: torch.Tensor) -> tuple[float, float, float]:
    """Sum of squares of the frame effect, the part effect and the interaction of (B, T, R) gradients."""
    grand = grad.mean((1, 2), keepdim=True)
    frame = grad.mean(2, keepdim=True) - grand
    part = grad.mean(1, keepdim=True) - grand
    rest = grad - frame - part - grand
    return (float(frame.expand_as(grad).square().sum()), float(part.expand_as(grad).square().sum()),
            float(rest.square().sum()))


def active_anchors(out, labels, margin: float) -> float:
    from stal_ray.objective import local_distance
    d = local_distance(out.f, out.a, out.f, out.a)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool)
    hard_pos = d.masked_fill(~positive, float("-inf")).amax(1)
    hard_neg = d.masked_fill(same, float("inf")).amin(1)
    return float((hard_pos - hard_neg + margin > 0).float().mean())


@torch.no_grad()
def evaluate(model, rows):
    model.eval()
    chunks, features, roll_gap, spread = [], [], [], []
    for number, (identity, camera, frames, keypoints) in enumerate(rows):
        n = len(frames)
        padded = -(-n // T) * T
        order = np.minimum(np.arange(padded), n - 1)
        clips = model.preprocess(frames[order]).view(-1, T, 3, *SIZE)
        kp = keypoints[order].view(-1, T, 14, 3)
        out = model(clips, kp)
        rolled = model(clips.roll(1, dims=1), kp.roll(1, dims=1))
        roll_gap.append((rolled.scores.roll(-1, dims=1) - out.scores).abs().flatten())
        spread.append(out.scores.std(1).flatten())
        real = torch.arange(padded) < n
        s = out.scores.reshape(padded, -1)[real]  # (n, R)
        f = out.f.reshape(padded, *out.f.shape[2:])[real]  # (n, R, D)
        s_t = s.mean(1, keepdim=True).expand_as(s)
        features.append(dict(
            g=out.g_frames.reshape(padded, -1)[real].mean(0),
            f_attended=(s[..., None] * f).sum(0) / s.sum(0)[:, None],
            f_temporal=(s_t[..., None] * f).sum(0) / s_t.sum(0)[:, None],
            f_mean=f.mean(0), part_scores=s.mean(0), identity=identity, camera=camera))
        chunks.append(dict(tracklet=np.full(padded // T, number), chunk=np.arange(padded // T),
                           frames=np.clip(n - np.arange(padded // T) * T, 0, T),
                           scores=out.scores.numpy(), hidden=hidden_parts(kp.numpy()),
                           has_keypoints=np.ones(padded // T, bool)))
    model.train()
    units = unit_scores(chunks)
    summary = occlusion_summary(units)
    # one score per frame (mean over parts) relative to its tracklet's mean: frames with >= 3 hidden parts
    # against frames with none
    frame_score, frame_hidden = {}, {}
    for t, fr, s, h in zip(units.tracklet, units.frame, units.score, units.hidden, strict=True):
        key = (int(t), int(fr))
        frame_score[key] = frame_score.get(key, 0.0) + s / 6
        frame_hidden[key] = frame_hidden.get(key, 0) + int(h)
    keys = list(frame_score)
    scores = np.array([frame_score[k] for k in keys])
    hidden = np.array([frame_hidden[k] for k in keys])
    frame_ratio = scores[hidden >= 3].mean() / scores[hidden == 0].mean()
    stacked = TrackletFeatures(**{name: torch.stack([x[name] for x in features])
                                  for name in ("g", "f_attended", "f_temporal", "f_mean", "part_scores")})
    ids = np.array([x["identity"] for x in features])
    cams = np.array([x["camera"] for x in features])
    maps = {}
    for mode in ("baseline", "tan", "san", "stal"):
        d_l, d_g = branch_distances(stacked, stacked, mode, device="cpu")
        maps[mode] = evaluate_ranking(fuse(d_l, d_g, mode, 0.3), ids, ids, cams, cams,
                                      ap=ap_rule("official")).mAP
    position = float(torch.cat(roll_gap).mean() / torch.cat(spread).mean())
    return summary, float(frame_ratio), position, maps


def run(name, data, steps, seed):
    model_kwargs, objective_kwargs, consistency = VARIANTS[name]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes = len({r[0] for r in data["train"]})
    model = STAL("tiny", classes, T, SIZE, 128, "keypoints", **model_kwargs)
    objective = STALObjective(**objective_kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, steps // 4), gamma=0.1)
    squares, active = np.zeros(3), []
    stream = batches(data["train"], rng)
    start = time.perf_counter()
    for step in range(steps):
        clips, keypoints, labels = next(stream)
        out = model(model.preprocess(clips), keypoints)
        out.scores.retain_grad()
        terms = objective(out, labels)
        total = terms.total if consistency else terms.total - terms.consistency
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        schedule.step()
        if step >= steps // 4:  # after the first learning-rate phase
            squares += effects(out.scores.grad)
            active.append(active_anchors(out, labels, objective.margin_local))
    seconds = time.perf_counter() - start
    summary, frame_ratio, position, maps = evaluate(model, data["test"])
    total = squares.sum()
    return [name, seed, f"{squares[0] / total:.2f}", f"{squares[1] / total:.2f}", f"{squares[2] / total:.2f}",
            f"{np.mean(active):.2f}", f"{position:.2f}", f"{summary.within_part_ratio:.3f}",
            f"{frame_ratio:.3f}", f"{summary.raw_percentiles[0]:.2f}–{summary.raw_percentiles[1]:.2f}",
            *(f"{100 * maps[m]:.1f}" for m in ("baseline", "tan", "san", "stal")), f"{seconds:.0f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--occluders", default="moving", choices=("boxes", "moving"))
    parser.add_argument("--identities", type=int, default=30)
    parser.add_argument("--test-identities", type=int, default=30)
    parser.add_argument("--data-seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = render(args.identities, args.test_identities, 0.5, args.occluders, args.data_seed)
    headers = ["variant", "seed", "grad² frame", "grad² part", "grad² rest", "active anchors",
               "position / spread", "hidden/visible (part)", "occluded/clean frame", "raw 5–95%",
               "baseline", "tan", "san", "stal", "s"]
    print(f"{args.occluders} occluders, {args.steps} steps, data seed {args.data_seed}")
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers), flush=True)
    for name in args.variants:
        for seed in args.seeds:
            print("| " + " | ".join(str(c) for c in run(name, data, args.steps, seed)) + " |", flush=True)


if __name__ == "__main__":
    main()
