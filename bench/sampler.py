"""Benchmark: the training sampler on the real MARS index, old (before issue 36) and new, same run, no frames.

The training identities and tracklets of MARS's track table (tracks_train_info.mat, as data.releases.mars
reads it with scipy; identities > 0, tracklets in table order as the prepare writes them) are laid out as
the prepare lays them out: rows sorted by identity, files of --target-file-mb, one identity per row group
(the column "new, 32MiB groups": row groups of 32 MiB, the prepare's layout before), ~11.5 KiB JPEG frames
(bench/mars_frames.py's mean). Per epoch and sampler:

* old: the sampling.py before issue 36 (loaded from git), identities in the order of the shuffled files,
  each identity's groups in a row, through the real batcher (data.batches.TrainingBatches, its 8·P shuffle
  buffer).
* new: sampling.epoch_plan (mixing global, weighting frames and identities), through the same batcher.
* uniform: the ideal: every group of the epoch drawn P distinct identities at a time in proportion to the
  groups they have left, over all identities (sampling.interleave over the whole training set), no batcher.

Statistics: distinct identities per batch; how far apart a batch's P identities are in identity order (mean
|rank difference| over its pairs, as a fraction of the identities; a uniform draw gives ~1/3) and the share
of its pairs within 8 ranks of each other (neighbours in the shards); distinct batch partners of an identity
per epoch; the share of tracklets seen after 1, 2 and 5 epochs and the epochs until every tracklet is seen;
the share of groups from the 20% largest identities. Memory: the blocks the batcher pins at the peak
(bench/scale.py's held_groups measure: decoded blocks of decode_batch_size groups at 256x128, a block alive
while any of its groups is held), the undecoded bytes a read task holds (a window's chosen frames plus one
row group) and the bytes read per byte stored. Blocks are dealt round-robin to --workers consumers as
streaming_split deals them.

    PYTHONPATH=. python bench/sampler.py [--info /work/shared/mars/info] [--epochs 5] [--workers 1 4]
"""

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import scipy.io

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stal_ray.config import Config  # noqa: E402
from stal_ray.data.releases import mars  # noqa: E402
from stal_ray.data.stream import sampling  # noqa: E402
from stal_ray.data.stream.batches import training_batches  # noqa: E402
from stal_ray.data.stream.pipeline import decode_batch_size  # noqa: E402

HEIGHT, WIDTH, SEQ_LEN, P, K = 256, 128, 8, 8, 4
JPEG_BYTES = 11.5 * 1024
ROW_GROUP_BYTES = 32 << 20
NEIGHBOURS = 8


def read_index(info: Path) -> dict[int, np.ndarray]:
    """identity -> tracklet_of_frame (track-table rows), identities > 0, as the prepare orders a row."""
    table_file, variable = mars.TRACK_TABLES["train"]
    table = scipy.io.loadmat(info / Path(table_file).name)[variable].astype(np.int64)
    out: dict[int, list] = {}
    for row, (first, last, identity, _) in enumerate(table):
        if identity > 0:
            out.setdefault(int(identity), []).append(np.full(last - first + 1, row, np.int64))
    return {identity: np.concatenate(parts) for identity, parts in sorted(out.items())}


def recording_order(info: Path, block: int = 125) -> dict:
    """Does identity order follow recording time? The mean Jaccard similarity of the camera sets of
    neighbouring training identities against random pairs, and the share of tracklets per camera in blocks
    of `block` consecutive identities (a camera that stops appearing: the numbers follow time)."""
    table_file, variable = mars.TRACK_TABLES["train"]
    table = scipy.io.loadmat(info / Path(table_file).name)[variable].astype(np.int64)
    table = table[table[:, 2] > 0]
    people = np.unique(table[:, 2])
    cameras = {int(p): set(table[table[:, 2] == p, 3].tolist()) for p in people}

    def jaccard(a: int, b: int) -> float:
        return len(cameras[a] & cameras[b]) / len(cameras[a] | cameras[b])

    pairs = np.random.default_rng(0).integers(0, len(people), (5000, 2))
    blocks = []
    for start in range(0, len(people), block):
        seen = table[np.isin(table[:, 2], people[start:start + block]), 3]
        blocks.append((np.bincount(seen, minlength=7)[1:] / len(seen)).round(3).tolist())
    neighbours = [jaccard(a, b) for a, b in zip(people[:-1], people[1:], strict=True)]
    return {"neighbours_jaccard": float(np.mean(neighbours)),
            "random_jaccard": float(np.mean([jaccard(people[i], people[j]) for i, j in pairs if i != j])),
            "camera_share_per_block": blocks, "block": block}


def layout(tracklets: dict[int, np.ndarray], target_file_bytes: int,
           row_per_group: bool = True) -> tuple[list, dict, dict]:
    """Files (lists of identities) and each identity's row group, cut as shard_files.write_split cuts them:
    one identity per row group (the prepare's training split), or (row_per_group=False) row groups of
    32 MiB, as the prepare wrote them before."""
    files, row_group, group_bytes = [], {}, {}
    current, buffered, file_bytes, number = [], 0, 0, 0
    for identity, frames in tracklets.items():
        nbytes = len(frames) * JPEG_BYTES
        current.append(identity)
        row_group[identity] = number
        buffered += nbytes
        file_bytes += nbytes
        group_bytes[number] = group_bytes.get(number, 0) + nbytes
        if row_per_group or buffered >= ROW_GROUP_BYTES or file_bytes >= target_file_bytes:
            number, buffered = number + 1, 0
        if file_bytes >= target_file_bytes:
            files.append(current)
            current, file_bytes = [], 0
    if current:
        files.append(current)
    return files, row_group, group_bytes


# the sampler before the epoch over all identities (issue 36): data/sampling.py at that commit
OLD_SAMPLING = "c457115:stal_ray/data/sampling.py"


def old_sampling():
    """The old sampling.py (OLD_SAMPLING), loaded from git as a module of its own."""
    source = subprocess.run(["git", "-C", str(REPO), "show", OLD_SAMPLING],
                            capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("old_sampling", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, OLD_SAMPLING, "exec"), module.__dict__)
    return module


def old_plan(tracklets, files, seed, epoch, cap, old) -> tuple[np.ndarray, np.ndarray]:
    """(identity, tracklet of each clip (G, K)) per group of the old stream: shuffled files, rows in order."""
    identities, clips = [], []
    for index in np.random.default_rng([seed, epoch]).permutation(len(files)):
        for identity in files[index]:
            own = tracklets[identity]
            for group in old.identity_groups(own, K, SEQ_LEN, np.random.default_rng([seed, epoch, identity]),
                                             cap):
                identities.append(identity)
                clips.append(own[group[:, 0]])
    return np.array(identities), np.array(clips)


def new_plan(tracklets, seed, epoch, cap, weighting, window=None):
    plan = sampling.epoch_plan(tracklets, clips_per_identity=K, seq_len=SEQ_LEN, identities_per_batch=P,
                               seed=seed, epoch=epoch, max_groups=cap, weighting=weighting, window=window)
    clips = np.array([tracklets[i][g[:, 0]] for i, g in zip(plan.identity, plan.positions, strict=True)])
    return plan, clips


def batches_through_batcher(arrivals: np.ndarray, workers: int, seed: int) -> tuple[list, int]:
    """Batches (arrays of identities) of the real batcher fed `arrivals` (identity per group) in decoded
    blocks dealt round-robin to `workers` consumers, and the most blocks any consumer held at once."""
    rows = decode_batch_size(_config().data, (K, SEQ_LEN))
    blocks = [arrivals[start:start + rows] for start in range(0, len(arrivals), rows)]
    out, peak = [], 0
    for rank in range(workers):
        live, most = 0, 0

        def released():
            nonlocal live
            live -= 1

        gc.collect()  # the last consumer's blocks are gone before this one counts

        class Source:
            def __init__(self, mine):
                self.mine = mine

            def iter_batches(self, **_):
                nonlocal live, most
                for block in self.mine:
                    n = len(block)
                    clips = np.zeros((n, 1, 1, 1, 1, 3), np.uint8)  # one array per block: groups are views
                    weakref.finalize(clips, released)
                    live += 1
                    most = max(most, live)
                    yield {"label": block, "identity": block, "corrupt_frames": np.zeros(n, np.int64),
                           "clips": clips, "tracklets": np.zeros((n, 1), np.int32),
                           "has_keypoints": np.zeros(n, bool),
                           "keypoints": np.zeros((n, 1, 1, 14, 3), np.float32)}

        batcher = training_batches(Source(blocks[rank::workers]), P, seed=seed + rank, normalize=False)
        for batch in batcher:
            out.append(np.unique(batch["identities"].numpy()))
        peak = max(peak, most)
    return out, peak


def _config() -> Config:
    config = Config()
    config.data.height, config.data.width, config.data.seq_len = HEIGHT, WIDTH, SEQ_LEN
    config.data.identities_per_batch, config.data.clips_per_identity = P, K
    return config


def batch_stats(batches: list[np.ndarray], rank: dict[int, int]) -> dict:
    n = len(rank)
    distinct, spread, near = [], [], []
    partners: dict[int, set] = {}
    for members in batches:
        distinct.append(len(members))
        ranks = np.array([rank[i] for i in members])
        diff = np.abs(ranks[:, None] - ranks[None, :])[np.triu_indices(len(ranks), 1)]
        spread.append(diff.mean() / n)
        near.append((diff <= NEIGHBOURS).mean())
        for i in members.tolist():
            partners.setdefault(i, set()).update(members.tolist())
    return {"batches": len(batches), "distinct_per_batch": float(np.mean(distinct)),
            "rank_spread": float(np.mean(spread)), "neighbour_pairs": float(np.mean(near)),
            "partners_per_identity": float(np.mean([len(s) - 1 for s in partners.values()]))}


def coverage(clips_per_epoch: list[np.ndarray], tracklets: dict[int, np.ndarray]) -> dict:
    everything = np.unique(np.concatenate(list(tracklets.values())))
    seen, out, all_at = set(), {}, None
    for epoch, clips in enumerate(clips_per_epoch, start=1):
        seen.update(np.unique(clips).tolist())
        out[f"seen_after_{epoch}"] = len(seen) / len(everything)
        if all_at is None and len(seen) == len(everything):
            all_at = epoch
    out["all_seen_at_epoch"] = all_at
    return out


def top_share(identities: np.ndarray, tracklets: dict[int, np.ndarray]) -> float:
    frames = {i: len(t) for i, t in tracklets.items()}
    top = set(sorted(frames, key=frames.get, reverse=True)[:len(frames) // 5])
    return float(np.isin(identities, list(top)).mean())


def read_cost(plan_windows: list[list[int]], row_group: dict, group_bytes: dict, total: float,
              chosen_bytes: dict) -> dict:
    """Bytes read per byte stored when each window reads the row groups of its identities once, and the
    most undecoded bytes one read task holds (its window's chosen frames plus its largest row group)."""
    read, peak = 0.0, 0.0
    for members in plan_windows:
        groups = {row_group[i] for i in members}
        read += sum(group_bytes[g] for g in groups)
        peak = max(peak, sum(chosen_bytes[i] for i in members) + max(group_bytes[g] for g in groups))
    return {"read_per_stored": read / total, "read_task_peak_mb": peak / 2**20}


def old_read_cost(files: list[list[int]], row_group: dict, group_bytes: dict, chosen_bytes: dict) -> dict:
    """the old read task: a file's rows 4 at a time (pipeline._ROWS_PER_READ), each file read once; it holds
    one row group and the chosen frames of the 4 rows it is cutting."""
    peak = 0.0
    for members in files:
        for start in range(len(members)):
            rows = members[start:start + 4]
            held = sum(chosen_bytes[i] for i in rows) + max(group_bytes[row_group[i]] for i in rows)
            peak = max(peak, held)
    return {"read_per_stored": 1.0, "read_task_peak_mb": peak / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--info", default="/work/shared/mars/info")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--target-file-mb", type=float, default=128)
    parser.add_argument("--windows", type=int, nargs="*", default=[2 * P, 8 * P],
                        help="window sizes (identities per read task) to run besides the default 4·P")
    parser.add_argument("--out", default="bench/results/sampler.json")
    args = parser.parse_args()
    cap = Config().data.max_groups_per_identity
    tracklets = read_index(Path(args.info))
    ids = list(tracklets)
    rank = {identity: index for index, identity in enumerate(ids)}
    layouts = {rows: layout(tracklets, int(args.target_file_mb * 2**20), rows) for rows in (True, False)}
    files, row_group, group_bytes = layouts[True]
    total = sum(group_bytes.values())
    print(f"MARS train index {args.info}: {len(ids)} identities, "
          f"{sum(len(np.unique(t)) for t in tracklets.values())} tracklets, "
          f"{sum(len(t) for t in tracklets.values())} frames; {len(files)} files, "
          f"{len(group_bytes)} row groups of one identity ({len(layouts[False][2])} of 32 MiB before) "
          f"(simulated, {JPEG_BYTES / 1024:.1f} KiB a frame); P={P} K={K} T={SEQ_LEN}, "
          f"max_groups_per_identity={cap}", flush=True)
    order = recording_order(Path(args.info))
    print(f"recording order: camera sets of neighbouring identities {order['neighbours_jaccard']:.2f} alike "
          f"(Jaccard), random pairs {order['random_jaccard']:.2f}; tracklets per camera 1-6 in blocks of "
          f"{order['block']} identities: " + "; ".join(" ".join(f"{v:.2f}" for v in b)
                                                       for b in order["camera_share_per_block"]))
    old = old_sampling()
    results: dict = {"index": args.info, "identities": len(ids), "P": P, "K": K, "T": SEQ_LEN, "cap": cap,
                     "files": len(files), "row_groups": len(group_bytes), "recording_order": order,
                     "samplers": {}}
    row_mb = K * SEQ_LEN * HEIGHT * WIDTH * 3 / 2**20
    block_mb = decode_batch_size(_config().data, (K, SEQ_LEN)) * row_mb
    # name: (weighting, window, one identity per row group); the old sampler read the old layout
    samplers = {"old": (None, None, False), "new (frames)": ("frames", None, True),
                "new, 32MiB groups": ("frames", None, False), "new (identities)": ("identities", None, True),
                "uniform": ("uniform", None, True)}
    samplers.update({f"new W={w}": ("frames", w, True) for w in args.windows})
    for name, (weighting, window, row_per_group) in samplers.items():
        files, row_group, group_bytes = layouts[row_per_group]
        per_epoch, clips_per_epoch, timings, reads = [], [], [], []
        for epoch in range(args.epochs):
            start = time.perf_counter()
            if weighting is None:
                identities, clips = old_plan(tracklets, files, args.seed, epoch, cap, old)
                windows = files
            else:
                plan, clips = new_plan(tracklets, args.seed, epoch, cap,
                                       "frames" if weighting == "uniform" else weighting, window)
                identities = plan.identity
                windows = [np.unique(plan.identity[plan.window == w]).tolist()
                           for w in range(plan.window.max() + 1)]
                if weighting == "uniform":
                    counts = np.bincount([rank[i] for i in identities], minlength=len(ids))
                    identities = np.array(ids)[sampling.interleave(counts, P, np.random.default_rng(epoch))]
            timings.append(time.perf_counter() - start)
            chosen = {i: 0.0 for i in ids}
            for identity in identities.tolist():
                chosen[identity] += K * SEQ_LEN * JPEG_BYTES
            reads.append(old_read_cost(files, row_group, group_bytes, chosen) if weighting is None
                         else read_cost(windows, row_group, group_bytes, total, chosen))
            per_epoch.append(identities)
            clips_per_epoch.append(clips)
        entry = {"plan_s_per_epoch": float(np.mean(timings)), "groups_per_epoch": int(np.mean(
            [len(i) for i in per_epoch])), "top20_share": top_share(np.concatenate(per_epoch), tracklets),
            **coverage(clips_per_epoch, tracklets)}
        if weighting != "uniform":
            entry.update(read_per_stored=float(np.mean([r["read_per_stored"] for r in reads])),
                         read_task_peak_mb=float(max(r["read_task_peak_mb"] for r in reads)))
        for workers in args.workers:
            if weighting == "uniform":
                batches = [np.unique(per_epoch[0][s:s + P]) for s in range(0, len(per_epoch[0]) - P + 1, P)]
                peak = None
            else:
                batches, peak = batches_through_batcher(per_epoch[0], workers, args.seed)
            entry[f"workers_{workers}"] = {**batch_stats(batches, rank),
                                           "pinned_blocks": peak,
                                           "pinned_mb": None if peak is None else peak * block_mb}
        results["samplers"][name] = entry
        print(f"  {name}: done", flush=True)
    print_table(results, args.workers)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"written {args.out}")


def print_table(results: dict, workers: list[int]) -> None:
    names = list(results["samplers"])
    rows = [("groups per epoch", "groups_per_epoch", "{:.0f}"),
            ("groups from top 20% identities", "top20_share", "{:.1%}"),
            ("tracklets seen after 1 epoch", "seen_after_1", "{:.1%}"),
            ("tracklets seen after 2 epochs", "seen_after_2", "{:.1%}"),
            ("tracklets seen after 5 epochs", "seen_after_5", "{:.1%}"),
            ("epoch when all tracklets seen", "all_seen_at_epoch", "{}"),
            ("bytes read / bytes stored", "read_per_stored", "{:.2f}"),
            ("read task peak MB (undecoded)", "read_task_peak_mb", "{:.0f}"),
            ("plan s per epoch (driver)", "plan_s_per_epoch", "{:.2f}")]
    for w in workers:
        rows += [(f"[{w} worker(s)] batches", f"workers_{w}.batches", "{}"),
                 (f"[{w}] distinct identities per batch", f"workers_{w}.distinct_per_batch", "{:.2f}"),
                 (f"[{w}] rank spread (uniform ~0.333)", f"workers_{w}.rank_spread", "{:.3f}"),
                 (f"[{w}] pairs within {NEIGHBOURS} ranks", f"workers_{w}.neighbour_pairs", "{:.1%}"),
                 (f"[{w}] partners per identity (epoch 1)", f"workers_{w}.partners_per_identity", "{:.0f}"),
                 (f"[{w}] batcher pinned blocks", f"workers_{w}.pinned_blocks", "{}"),
                 (f"[{w}] batcher pinned MB", f"workers_{w}.pinned_mb", "{:.0f}")]
    width = max(len(r[0]) for r in rows) + 2
    print("".ljust(width) + "".join(n.rjust(17) for n in names))
    for label, key, fmt in rows:
        cells = []
        for name in names:
            value = results["samplers"][name]
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            cells.append("-" if value is None else fmt.format(value))
        print(label.ljust(width) + "".join(c.rjust(17) for c in cells))


if __name__ == "__main__":
    main()
