"""iLIDS-VID and PRID-2011 on the synthetic releases in their layouts: the protocol the manifest records and
its counts, the evaluation protocol it implies, cross-dataset notes, and the polluted data (Table VII)."""

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stal_ray.data.prepared import pollution, protocol
from stal_ray.data.prepared.manifest import DatasetExistsError, read_manifest
from stal_ray.data.prepared.shards import write_shards
from stal_ray.data.releases.prid import SHARED_PERSONS
from stal_ray.data.releases.registry import read_release
from stal_ray.data.synthetic.generator import main as synthetic_main
from stal_ray.data.synthetic.layouts import PRID_A_ONLY, PRID_B_ONLY, PRID_SHORT
from stal_ray.evaluate.ranking import query_gallery_split

PERSONS, HEIGHT, WIDTH = 8, 32, 16


@pytest.fixture(scope="module", params=["ilidsvid", "prid2011"])
def release(request, tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp(request.param) / "release"
    synthetic_main([str(root), "--layout", request.param, "--identities", str(PERSONS // 2),
                    "--test-identities", str(PERSONS // 2), "--frames-per-tracklet", "3", "5",
                    "--height", str(HEIGHT), "--width", str(WIDTH)])
    return request.param, str(root)


def prepare(dataset: str, root: str, out, split: int = 0, seed: int | None = None, **options):
    polluted = None if seed is None else pollution.settings(seed)
    release = read_release(dataset, root, split=split, out=str(out))
    return write_shards(release, str(out), progress=False, **options,
                        dataset=protocol.describe(dataset, split, polluted))


def test_synthetic_layout_keeps_the_persons_the_protocol_keeps(release):
    dataset, root = release
    read = read_release(dataset, root, split=3, out=root + "-splits")
    assert len(read.identities("train")) == len(read.identities("test")) == PERSONS // 2
    if dataset == "prid2011":  # short sequences and single-camera persons are in the release, left out
        folders = Path(root, "prid_2011/multi_shot")
        assert len(list((folders / "cam_a").iterdir())) == PERSONS + PRID_SHORT + PRID_A_ONLY
        assert len(list((folders / "cam_b").iterdir())) == PERSONS + PRID_SHORT + PRID_B_ONLY
        # as in the release, single-camera persons share folder numbers above the shared range
        assert (folders / "cam_a" / f"person_{SHARED_PERSONS + 1:04d}").is_dir()
        assert (folders / "cam_b" / f"person_{SHARED_PERSONS + 1:04d}").is_dir()
        assert max(read.identities("train") + read.identities("test")) <= SHARED_PERSONS


def test_manifest_records_the_protocol_and_its_counts(release, tmp_path):
    dataset, root = release
    manifest = prepare(dataset, root, tmp_path / "shards", split=1)
    assert read_manifest(str(tmp_path / "shards")).dataset == manifest.dataset
    assert manifest.dataset["name"] == dataset and manifest.dataset["split"] == 1
    assert manifest.dataset["protocol"] == protocol.TWO_CAMERA and manifest.dataset["pollution"] is None
    half = PERSONS // 2
    assert (manifest.counts["train"]["identities"], manifest.counts["train"]["tracklets"]) == (half, 2 * half)
    test = manifest.counts["test"]
    assert (test["identities"], test["tracklets"], test["queries"]) == (half, 2 * half, half)
    # the evaluation ranks camera 1 against camera 2 alone, whatever eval.protocol says
    chosen = protocol.eval_protocol(manifest.dataset, None, "official")
    table = pq.read_table(manifest.paths("test"))
    identity, camera, is_query = (table.column(c).to_numpy() for c in ("identity", "camera", "is_query"))
    query, gallery = query_gallery_split(identity, camera, is_query, chosen)
    assert len(query) == len(gallery) == half
    assert set(camera[query]) == {1} and set(camera[gallery]) == {2}
    assert sorted(identity[query]) == sorted(identity[gallery])  # one true match per query
    with pytest.raises(ValueError, match="--protocol official does not fit"):
        protocol.eval_protocol(manifest.dataset, "official", "torchreid")


def test_the_real_releases_protocol_counts():
    """What the readers do with the releases as shipped: iLIDS-VID's 300 persons halved (150 queries and
    150 gallery sequences per split), PRID-2011's 178 kept persons halved (89)."""
    from stal_ray.data.releases.prid import make_splits

    splits = make_splits(list(range(1, 179)))
    assert len(splits) == 10 and all(len(s["test"]) == len(s["train"]) == 89 for s in splits)
    assert len({tuple(s["test"]) for s in splits}) == 10


def test_mars_keeps_its_configured_protocol():
    mars = protocol.describe("mars")
    assert protocol.eval_protocol(mars, None, "official") == "official"
    assert protocol.eval_protocol(mars, "torchreid", "official") == "torchreid"
    assert protocol.of_manifest(None) == mars  # a manifest from before descriptions is MARS's


def test_cross_dataset_is_said_and_the_same_data_set_is_not():
    ilids, prid = protocol.describe("ilidsvid", 0), protocol.describe("prid2011", 0)
    trained = {"uri": "s3://b/ilidsvid-0", "name": "ilidsvid", "split": 0, "pollution": None}
    cross = protocol.cross_dataset(trained, prid)
    assert cross["cross_dataset"] and cross["trained_on"] == trained and cross["name"] == "prid2011"
    assert "cross-dataset test" in cross["note"] and "classifiers" in cross["note"]
    same = protocol.cross_dataset(trained, ilids)
    assert not same["cross_dataset"] and "note" not in same
    other_split = protocol.cross_dataset(trained, protocol.describe("ilidsvid", 4))
    assert not other_split["cross_dataset"] and "may have been trained on" in other_split["note"]
    assert protocol.cross_dataset(None, prid)["cross_dataset"] is False  # a model that does not say


def shard_frames(manifest) -> dict[str, np.ndarray]:
    """Every frame of both splits' shards, decoded, by its release path (tracklets and frames in order)."""
    release = read_release("ilidsvid", manifest.source["release"])
    paths = {(t.split, t.row): t.frames for t in (*release.train, *release.test)}
    decoded = {}
    for split in ("train", "test"):
        for row in pq.read_table(manifest.paths(split)).to_pylist():
            tracklets = row["tracklet"] if split == "train" else [row["tracklet"]] * len(row["frames"])
            positions = row["frame_index"] if split == "train" else range(len(row["frames"]))
            for tracklet, position, frame in zip(tracklets, positions, row["frames"], strict=True):
                path = paths[split, tracklet][position]
                decoded[path] = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
    return decoded


def test_polluted_frames_hold_a_seeded_black_box_and_the_manifest_says_so(tmp_path):
    root = str(tmp_path / "release")
    synthetic_main([root, "--layout", "ilidsvid", "--identities", "2", "--test-identities", "2",
                    "--frames-per-tracklet", "2", "3", "--height", "64", "--width", "32"])
    clean = prepare("ilidsvid", root, tmp_path / "clean")
    polluted = prepare("ilidsvid", root, tmp_path / "seed1", seed=1)
    again = prepare("ilidsvid", root, tmp_path / "seed1-again", seed=1)
    other = prepare("ilidsvid", root, tmp_path / "seed2", seed=2)
    assert polluted.dataset["pollution"] == pollution.settings(1) and clean.dataset["pollution"] is None
    assert polluted.dataset["pollution"]["box"] == 25 and polluted.dataset["pollution"]["seed"] == 1
    # the same seed, the same bytes; another seed, other boxes
    assert [f.sha256 for f in polluted.files["test"]] == [f.sha256 for f in again.files["test"]]
    assert [f.sha256 for f in polluted.files["test"]] != [f.sha256 for f in other.files["test"]]
    # in every frame of both splits, a 12x12 box (25x25 scaled from 128x64 to 64x32) is black, where the
    # clean frame is not
    clean_frames, dirty_frames = shard_frames(clean), shard_frames(polluted)
    assert clean_frames.keys() == dirty_frames.keys()
    assert len(dirty_frames) == clean.counts["train"]["frames"] + clean.counts["test"]["frames"]
    for path, dirty in dirty_frames.items():
        top, left, h, w = pollution.box_of(path, 64, 32, pollution.settings(1))
        assert (h, w) == (12, 12)
        assert dirty[top:top + h, left:left + w].max() <= 16, path  # black, up to JPEG ringing
        assert clean_frames[path][top:top + h, left:left + w].max() > 16, path
    # a prepare asked for another pollution over an existing data set names the difference
    with pytest.raises(DatasetExistsError,
                       match=r"pollution \(none, asked 25x25 box per 128x64 frame, seed 3\)"):
        prepare("ilidsvid", root, tmp_path / "clean", seed=3)
