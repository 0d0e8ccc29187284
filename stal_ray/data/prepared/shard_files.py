"""Shard files: Parquet written row group by row group, hashed and counted as the bytes stream out, so a
file's sha256 and size are known the moment it closes (data/shards.py records them in the manifest)."""

import contextlib
import hashlib
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.spec import AbstractBufferedFile
from tqdm import tqdm

# JPEG does not compress further: storing frames plain saves the reader's CPU; the small columns get zstd.
_COMPRESSION = {"frames": "none", "tracklet": "zstd", "camera": "zstd", "frame_index": "zstd",
                "keypoints": "zstd", "identity": "zstd", "is_query": "zstd"}
# Row groups bound the memory of one read step (Ray Data reads a file row group by row group).
_ROW_GROUP_BYTES = 32 << 20

@dataclass(frozen=True)
class ShardFile:
    path: str  # relative to the data set root, '/'-separated
    bytes: int
    sha256: str
    rows: int


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (scalars, per-frame lists, per-frame numpy arrays, keypoint arrays or None) as one table."""
    lengths = np.array([len(row["frames"]) for row in rows])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    columns = []
    for f in schema:
        values = [row[f.name] for row in rows]
        if f.name == "frames":
            column = pa.ListArray.from_arrays(offsets, pa.array([b for v in values for b in v], pa.binary()))
        elif f.name == "keypoints":  # all rows have them (nulls for frames without) or none has
            if values[0] is None:
                column = pa.nulls(len(rows), f.type)
            else:
                column = pa.ListArray.from_arrays(offsets, pa.concat_arrays(values))
        elif pa.types.is_list(f.type):
            column = pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(values), f.type.value_type))
        else:
            column = pa.array(values, f.type)
        columns.append(column.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


class HashingFile:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, raw):
        self.raw, self.sha256, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = memoryview(data)
        self.sha256.update(data)
        self.size += data.nbytes
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True  # the owner closes self.raw: that is where an upload completes or fails


class PartWriter:
    """One shard file under construction, written row group by row group."""

    def __init__(self, fs, path: str, relative: str, schema: pa.Schema):
        self.fs, self.relative, self.schema, self.rows = fs, relative, schema, 0
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.raw = fs.open(path, "wb")
        self.file = HashingFile(self.raw)
        self.writer = pq.ParquetWriter(self.file, schema, compression=_COMPRESSION,
                                       use_dictionary=["identity", "camera", "tracklet", "is_query"])

    def add(self, rows: list[dict]) -> None:
        self.writer.write_table(rows_table(rows, self.schema), row_group_size=len(rows))
        self.rows += len(rows)

    def close(self) -> ShardFile:
        self.writer.close()
        self.raw.close()
        return ShardFile(self.relative, self.file.size, self.file.sha256.hexdigest(), self.rows)

    def abort(self) -> None:
        # cleaning up after an error that is already on its way up: a second one would only hide it
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(Exception):
            if isinstance(self.raw, AbstractBufferedFile):
                # an object store: abort the upload rather than complete a truncated object
                self.raw.discard()
                self.raw.closed = True  # or its __del__ would try to finish the upload
            else:
                self.raw.close()


def write_split(fs, tmp: str, split: str, schema: pa.Schema, rows: Iterator[tuple[dict, int]],
                target_file_bytes: int, bar: tqdm, *, row_per_group: bool = False) -> list[ShardFile]:
    """Stream rows into files of about target_file_bytes of frames (a file closes once it reaches it), in
    row groups of about 32 MiB, or of one row each with row_per_group (the training split: one identity per
    row group, so a read of some identities reads only theirs)."""
    row_group_bytes = 0 if row_per_group else min(_ROW_GROUP_BYTES, target_file_bytes)
    files: list[ShardFile] = []
    part, buffer, buffered, file_bytes = None, [], 0, 0
    try:
        with bar:
            for row, nbytes in rows:
                if part is None:
                    relative = f"{split}/part-{len(files):05d}.parquet"
                    part = PartWriter(fs, posixpath.join(tmp, relative), relative, schema)
                buffer.append(row)
                buffered += nbytes
                file_bytes += nbytes
                bar.update()
                if buffered >= row_group_bytes or file_bytes >= target_file_bytes:
                    part.add(buffer)
                    buffer, buffered = [], 0
                if file_bytes >= target_file_bytes:
                    files.append(part.close())
                    part, file_bytes = None, 0
            if buffer:
                part.add(buffer)
            if part is not None:
                files.append(part.close())
                part = None
    finally:
        if part is not None:
            part.abort()
    return files
