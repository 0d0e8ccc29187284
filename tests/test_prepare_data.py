"""jobs/prepare_data.py run as a user runs it on tiny iLIDS-VID and PRID-2011 releases."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from release_layouts import FRAME_SIZE, make_ilidsvid, make_prid

from stal_ray.core.storage import StorageError
from stal_ray.data.prepared.manifest import read_manifest, verify
from stal_ray.data.releases.prid import MIN_FRAMES, SPLITS_FILE
from stal_ray.data.source import resolve_data
from stal_ray.data.stream.images import decode_frame
from stal_ray.evaluate.ranking import query_gallery_split

JOB = Path(__file__).resolve().parent.parent / "jobs" / "prepare_data.py"


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=120)


def test_ilidsvid_split_is_prepared_into_shards_with_the_protocol_counts(tmp_path):
    ls_set = make_ilidsvid(tmp_path / "release")
    out = str(tmp_path / "ilidsvid-split2")
    args = ("--dataset", "ilidsvid", "--root", str(tmp_path / "release"), "--out", out, "--split", "2")
    result = prepare(*args)
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out)
    verify(out)
    assert manifest.counts["train"]["identities"] == 3 and manifest.counts["train"]["tracklets"] == 6
    test = manifest.counts["test"]
    assert (test["identities"], test["tracklets"], test["queries"]) == (3, 6, 3)
    table = pq.read_table(manifest.paths("test")[0])
    persons = (1, 2, 4, 7, 9, 12)
    assert sorted(set(table.column("identity").to_pylist())) == sorted(persons[int(i) - 1]
                                                                       for i in ls_set[2, :3])
    # the paper's protocol: queries are camera 1, the gallery camera 2 only (eval.protocol=torchreid)
    identity, camera, is_query = (table.column(c).to_numpy() for c in ("identity", "camera", "is_query"))
    query, gallery = query_gallery_split(identity, camera, is_query, "torchreid")
    assert len(query) == len(gallery) == 3 and set(camera[gallery]) == {2} and set(camera[query]) == {1}
    pairs = set(zip(table.column("camera").to_pylist(), table.column("is_query").to_pylist(), strict=True))
    assert pairs == {(1, True), (2, False)}
    frame = table.column("frames")[0][0].as_py()
    assert decode_frame(frame, FRAME_SIZE[1], FRAME_SIZE[0]) is not None and frame.startswith(b"\xff\xd8")
    again = prepare(*args)
    assert again.returncode == 0 and "already up to date" in again.stdout


def test_prid_writes_seeded_splits_next_to_the_shards_and_reuses_them(tmp_path):
    make_prid(tmp_path / "release", dict.fromkeys(range(1, 6), MIN_FRAMES),
              dict.fromkeys(range(1, 8), MIN_FRAMES))
    out = tmp_path / "prid-split0"
    args = ("--dataset", "prid2011", "--root", str(tmp_path / "release"), "--out", str(out))
    result = prepare(*args)
    assert result.returncode == 0, result.stderr
    splits = json.loads((out / SPLITS_FILE).read_text())
    assert len(splits) == 10
    test = read_manifest(str(out)).counts["test"]
    assert (test["identities"], test["queries"]) == (2, 2)
    # the file next to the shards is the one used: edit it, and the next prepare follows it
    splits[0] = {"train": ["person_0001", "person_0002"],
                 "test": ["person_0003", "person_0004", "person_0005"]}
    (out / SPLITS_FILE).write_text(json.dumps(splits))
    result = prepare(*args, "--overwrite")
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(str(out))
    assert manifest.counts["test"]["queries"] == 3 and manifest.counts["train"]["identities"] == 2


def test_prid_split_file_given_is_used(tmp_path):
    make_prid(tmp_path / "release", {1: 3, 2: 3, 3: 3}, {1: 3, 2: 3, 3: 3})
    split_file = tmp_path / "splits.json"
    split_file.write_text(json.dumps([{"train": ["person_0001", "person_0003"], "test": ["person_0002"]}]))
    out = tmp_path / "prid"
    result = prepare("--dataset", "prid2011", "--root", str(tmp_path / "release"), "--out", str(out),
                     "--split-file", str(split_file))
    assert result.returncode == 0, result.stderr
    assert read_manifest(str(out)).counts["test"]["identities"] == 1 and not (out / SPLITS_FILE).exists()


def test_damaged_png_is_left_out_and_listed(tmp_path):
    make_ilidsvid(tmp_path / "release")
    frame = tmp_path / "release" / "i-LIDS-VID/sequences/cam1/person004/cam1_person004_00102.png"
    frame.write_bytes(frame.read_bytes()[:60])
    out = str(tmp_path / "out")
    result = prepare("--dataset", "ilidsvid", "--root", str(tmp_path / "release"), "--out", out,
                     "--max-bad-frames", "0.1")
    assert result.returncode == 0, result.stderr
    [bad] = read_manifest(out).bad_frames
    assert bad["path"].endswith("cam1_person004_00102.png") and "a PNG" in bad["problem"]
    assert "cam1_person004_00102.png" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (("--dataset", "ilidsvid", "--split", "3"), "missing i-LIDS-VID/sequences/cam1"),
    (("--dataset", "mars", "--split", "1"), "--split and --split-file are for ilidsvid and prid2011"),
    (("--dataset", "prid2011", "--split-file", "nowhere.json"), "split file nowhere.json does not exist"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    result = prepare(*args, "--root", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_release_given_as_data_says_how_to_prepare_it(tmp_path):
    make_ilidsvid(tmp_path)
    with pytest.raises(StorageError, match=re.escape("jobs/prepare_data.py --dataset ilidsvid --root")):
        resolve_data(str(tmp_path))
