"""Chosen frames of stored shard rows, gathered in Arrow: the step between a Parquet read and decoding.

A shard row holds every frame of an identity (training) or of a tracklet (test) as list columns (see
data.manifest). The pipeline picks some of them: K clips of T frames per group, or chunks of T. Turning each
row into Python objects (a bytes object per frame) and building a Ray block back out of them cost more CPU
than one more core's worth of decoding at MARS sizes (bench/data.py); here the picked frames are a `take`
on the flattened Arrow column, so JPEG bytes are copied once, in C++, and never become Python objects
before the decoder reads them.
"""

from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stal_ray.data.prepared.manifest import JOINTS

KEYPOINT_VALUES = JOINTS * 3  # (x, y, confidence) per joint


def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A column as numpy: a fixed-size list column as (rows, size), anything else as (rows,)."""
    column = _array(column)
    if pa.types.is_fixed_size_list(column.type):
        return to_numpy(pc.list_flatten(column)).reshape(len(column), column.type.list_size)
    return column.to_numpy(zero_copy_only=False)


def _to_arrow(values: np.ndarray) -> pa.Array:
    """(rows,) as a plain array, (rows, ...) as a fixed-size list of the rest, flattened."""
    if values.ndim == 1:
        return pa.array(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), int(np.prod(values.shape[1:])))


class StoredRows:
    """A batch of shard rows with its per-frame list columns flattened, row after row.

    Frame `starts[r] + i` is frame i of row r: the indices `table` takes.
    """

    def __init__(self, rows: pa.Table | pa.RecordBatch):
        self.rows = rows
        self.lengths = pc.list_value_length(rows.column("frames")).to_numpy(zero_copy_only=False)
        self.starts = np.cumsum(self.lengths) - self.lengths

    def __len__(self) -> int:
        return self.rows.num_rows

    def column(self, name: str) -> np.ndarray:
        """A per-row column, (rows,)."""
        return to_numpy(self.rows.column(name))

    def per_frame(self, name: str) -> np.ndarray:
        """A per-frame list column flattened, (frames,): row r's at starts[r]:starts[r] + lengths[r]."""
        return to_numpy(pc.list_flatten(self.rows.column(name)))

    def keypoints(self) -> np.ndarray:
        """(frames, 42) float32; NaN where a frame has none, or its row's whole list is null (a data set
        without keypoints)."""
        lists = _array(self.rows.column("keypoints"))
        out = np.full((int(self.lengths.sum()), KEYPOINT_VALUES), np.nan, dtype=np.float32)
        # list_flatten emits nothing for a null list, and null elements stay null: place what is there
        has_list = np.repeat(lists.is_valid().to_numpy(zero_copy_only=False), self.lengths)
        per_frame = _array(pc.list_flatten(lists))
        present = np.flatnonzero(has_list)[per_frame.is_valid().to_numpy(zero_copy_only=False)]
        out[present] = to_numpy(pc.list_flatten(per_frame)).reshape(-1, KEYPOINT_VALUES)
        return out

    def table(self, chosen: np.ndarray, columns: Mapping[str, np.ndarray]) -> pa.Table:
        """Rows of `columns` (each (n,) or (n, ...)) plus, for row j, the frames chosen[j] (n, F) as
        frames (F JPEG bytes) and keypoints (F x 42 floats, see `keypoints`)."""
        chosen = np.asarray(chosen, dtype=np.int64)
        frames = pc.list_flatten(self.rows.column("frames")).take(pa.array(chosen.reshape(-1)))
        out = {name: _to_arrow(np.asarray(values)) for name, values in columns.items()}
        out["frames"] = pa.FixedSizeListArray.from_arrays(_array(frames), chosen.shape[1])
        out["keypoints"] = _to_arrow(self.keypoints()[chosen].reshape(len(chosen), -1))
        return pa.table(out)


def chunks_of(positions: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive chunks of T of `positions`: (chunks, T) positions, the last chunk padded with its last
    one, and (chunks,) how many of each are real."""
    starts = np.arange(0, len(positions), seq_len)
    valid = np.minimum(seq_len, len(positions) - starts)
    index = np.minimum(starts[:, None] + np.arange(seq_len), (starts + valid - 1)[:, None])
    return positions[index], valid
