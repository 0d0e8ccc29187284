"""Gathering chosen frames of stored rows in Arrow (data.frames) against plain Python on the same rows."""

import numpy as np
import pyarrow as pa

from stal_ray.data.prepared.manifest import TEST_SCHEMA
from stal_ray.data.stream.frames import StoredRows, chunks_of, to_numpy


def _rows(rng):
    """Test-schema rows of 3, 0 and 5 frames: keypoints per frame, null for one frame, null for a row."""
    frames = [[f"r0f{i}".encode() for i in range(3)], [], [f"r2f{i}".encode() for i in range(5)]]
    values = rng.normal(size=(8, 42)).astype(np.float32)
    keypoints = [[list(values[0]), None, list(values[1])], [], None]
    table = pa.table({"tracklet": [7, 8, 9], "identity": [1, 2, 3], "camera": [1, 2, 3],
                      "is_query": [True, False, False], "frames": frames, "keypoints": keypoints},
                     schema=TEST_SCHEMA)
    return table, frames, keypoints


def test_chosen_frames_and_keypoints_match_the_rows():
    rng = np.random.default_rng(0)
    table, frames, keypoints = _rows(rng)
    stored = StoredRows(table)
    assert stored.lengths.tolist() == [3, 0, 5] and stored.starts.tolist() == [0, 3, 3]
    flat_frames = [f for row in frames for f in row]
    flat_keypoints = [k for row, n in zip(keypoints, (3, 0, 5), strict=True) for k in (row or [None] * n)]

    chosen = np.array([[0, 2, 2], [4, 3, 7]])
    out = stored.table(chosen, {"label": np.array([5, 6]), "pair": np.array([[1, 2], [3, 4]])})
    assert out.column("frames").to_pylist() == [[flat_frames[i] for i in row] for row in chosen]
    assert to_numpy(out.column("pair")).tolist() == [[1, 2], [3, 4]]
    assert out.column("label").to_pylist() == [5, 6]
    gathered = to_numpy(out.column("keypoints")).reshape(2, 3, 42)
    for row, indices in enumerate(chosen):
        for column, index in enumerate(indices):
            expected = flat_keypoints[index]
            if expected is None:
                assert np.isnan(gathered[row, column]).all()
            else:
                assert np.array_equal(gathered[row, column], np.asarray(expected, np.float32))


def test_a_slice_of_a_batch_reads_its_own_rows():
    table, frames, _ = _rows(np.random.default_rng(1))
    stored = StoredRows(table.slice(2, 1))  # Ray hands out slices of blocks: offsets do not start at 0
    assert stored.lengths.tolist() == [5]
    assert stored.table(np.array([[0, 4]]), {}).column("frames").to_pylist() == [[frames[2][0], frames[2][4]]]
    assert np.isnan(stored.keypoints()).all()


def test_chunks_of_cover_every_position_once_and_pad_the_last():
    positions = np.arange(10, 17)  # 7 frames, T = 3
    chunks, valid = chunks_of(positions, 3)
    assert chunks.tolist() == [[10, 11, 12], [13, 14, 15], [16, 16, 16]]
    assert valid.tolist() == [3, 3, 1]
    real = np.concatenate([chunk[:v] for chunk, v in zip(chunks, valid, strict=True)])
    assert real.tolist() == positions.tolist()
