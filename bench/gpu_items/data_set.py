"""Item `data` of bench/gpu_check.py: the prepared data set the stream, evaluation and determinism items read.

Full: MARS's real index (tests/data/mars_info) scaled as bench/scale.py scales it: every 4th training
identity (~124k frames, ~350 iterations of the MARS batch with data.max_groups_per_identity's 32 groups, so
the stream item's 300-iteration run stays inside one epoch) and every 48th test identity (~21k frames with
its junk and distractors, for extraction). Its frames are 256x128 JPEGs of MARS's size hard-linked from a
pool of distinct rendered frames, prepared as jobs/prepare_mars.py does: 43 s for the ~145k frames on the
shared 2-core machine. Kept under --workdir, so a second run reuses it. Quick: the embedded synthetic data
set (64x32).
"""

import time
from pathlib import Path

from bench.gpu_items.common import ItemResult, Profile

POOL_FRAMES = 600


def run(result: ItemResult, profile: Profile, args) -> None:
    start = time.perf_counter()
    if not profile.train_every:
        from stal_ray.data.source import resolve_data

        shards = resolve_data(None).uri
        result.set(shards=shards, built=False)
    else:
        shards, built = mars_like_shards(Path(args.workdir), profile.train_every, profile.test_every)
        result.set(shards=shards, built=built)
    from stal_ray.data.prepared.manifest import read_manifest

    counts = read_manifest(shards).counts
    result.row(name="data set", train_frames=counts["train"]["frames"], test_frames=counts["test"]["frames"],
               seconds=time.perf_counter() - start, reused=not result.data["built"])


def mars_like_shards(workdir: Path, train_every: int, test_every: int) -> tuple[str, bool]:
    """(shards URI, whether they were built now) of the scaled MARS layout under `workdir`."""
    from bench.scale import scaled_index, write_pool, write_release
    from stal_ray.data.prepared.manifest import IncompleteDatasetError, read_manifest
    from stal_ray.data.prepared.shards import write_shards
    from stal_ray.data.releases.mars import read_mars

    root = workdir / f"mars-train{train_every}-test{test_every}"
    shards = str(root / "shards")
    try:
        read_manifest(shards)
        return shards, False
    except (IncompleteDatasetError, FileNotFoundError):
        pass
    index = scaled_index(train_every)
    test = scaled_index(test_every)
    index.update(test=test["test"], queries=test["queries"])
    release = root / "release"
    if release.exists():  # an interrupted build: its hard links are cheap to make again
        import shutil

        shutil.rmtree(release)
    write_release(release, index, write_pool(workdir / "pool", POOL_FRAMES))
    write_shards(read_mars(str(release)), shards, progress=False)
    return shards, True
