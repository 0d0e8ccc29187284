"""The MARS release reader: index files and image folders as shipped, checked, as typed tracklets."""

import posixpath
from collections import defaultdict

import fsspec
import numpy as np

from stal_ray.data.releases.base import (
    DISTRACTOR,
    JUNK,
    SPLITS,
    Release,
    ReleaseFormatError,
    Tracklet,
    load_mat,
)

# info/ files of the release: the name list and track table (file, MATLAB variable) of every split.
NAME_LISTS = {"train": "info/train_name.txt", "test": "info/test_name.txt"}
TRACK_TABLES = {
    "train": ("info/tracks_train_info.mat", "track_train_info"),
    "test": ("info/tracks_test_info.mat", "track_test_info"),
}
QUERY_FILE, QUERY_VARIABLE = "info/query_IDX.mat", "query_IDX"
# Not part of the MARS release: ground-truth or offline-estimated keypoints, one row per frame file name.
KEYPOINTS_FILE = "info/keypoints.parquet"

LAYOUT = (
    "a MARS release holds bbox_train/<NNNN>/*.jpg, bbox_test/<NNNN>/*.jpg, info/train_name.txt, "
    "info/test_name.txt, info/tracks_train_info.mat, info/tracks_test_info.mat and info/query_IDX.mat"
)
NAME_PATTERN = "NNNNCcTttttFfff.jpg"  # identity (00-1 = junk), camera, tracklet, frame
_NAME_LENGTH = len(NAME_PATTERN)
_MISSING_SHOWN = 5


def read_mars(root: str, *, check_images: bool = True) -> Release:
    """Read and check a MARS release at a local path or fsspec URL.

    check_images=False reads the index only (no listing of the image folders), e.g. at full scale when the
    images are checked elsewhere.
    """
    fs, base = fsspec.core.url_to_fs(root)
    try:
        return _read(fs, base, root, check_images)
    except ReleaseFormatError as error:
        # the helpers name files relative to the release; the root says which release
        raise ReleaseFormatError(f"MARS release {root}: {error}") from error.__cause__


def _read(fs, base: str, root: str, check_images: bool) -> Release:
    missing = [name for name in (*NAME_LISTS.values(), *(f for f, _ in TRACK_TABLES.values()), QUERY_FILE)
               if not fs.isfile(posixpath.join(base, name))]  # fmt: skip
    if missing:
        raise ReleaseFormatError(f"missing {', '.join(missing)}; {LAYOUT}")

    splits = {split: _read_split(fs, base, split) for split in SPLITS}
    _check_identities(splits["train"][0], splits["test"][0])
    query_rows = _read_queries(fs, base, splits["test"][0])
    if check_images:
        for split, (_, names) in splits.items():
            _check_images(fs, base, split, names)

    tracklets = {}
    for split, (table, names) in splits.items():
        paths = [f"bbox_{split}/{name[:4]}/{name}" for name in names]
        is_query = np.zeros(len(table), bool)
        if split == "test":
            is_query[query_rows] = True
        tracklets[split] = [
            Tracklet(
                split, row, int(identity), int(camera), tuple(paths[first - 1 : last]), bool(is_query[row])
            )
            for row, (first, last, identity, camera) in enumerate(table.tolist())
        ]
    keypoints = posixpath.join(base, KEYPOINTS_FILE)
    keypoints_path = f"{root.rstrip('/')}/{KEYPOINTS_FILE}" if fs.isfile(keypoints) else None
    release = Release(root, tracklets["train"], tracklets["test"], keypoints_path)
    release._fs = (fs, base)
    return release


def _check_identities(train: np.ndarray, test: np.ndarray) -> None:
    """The release's rule for identities: every training track is a person (junk and distractors are test
    tracks only), and no person is in both splits (625 training, 634 test persons in the release)."""
    table_file = TRACK_TABLES["train"][0]
    not_person = np.flatnonzero(np.isin(train[:, 2], (JUNK, DISTRACTOR)))
    if len(not_person):
        row = int(not_person[0])
        kind = "junk (-1)" if train[row, 2] == JUNK else "distractor (0)"
        raise ReleaseFormatError(
            f"{table_file} row {row + 1}: identity {kind} in the training split ({len(not_person)} rows); "
            "MARS's training tracks are all persons, junk and distractors are test tracks: is the table "
            "from the test split?")
    if shared := set(train[:, 2].tolist()) & set(test[:, 2].tolist()) - {JUNK, DISTRACTOR}:
        raise ReleaseFormatError(
            f"identity {min(shared):04d} is in both {table_file} and {TRACK_TABLES['test'][0]} "
            f"({len(shared)} identities); MARS's training and test persons are disjoint: is one of the "
            "index files from another release?")


def _read_split(fs, base: str, split: str) -> tuple[np.ndarray, list[str]]:
    """The checked track table (N, 4) int64 and frame file names of a split."""
    table_file, variable = TRACK_TABLES[split]
    table = load_mat(fs, base, table_file, variable)
    if table.ndim != 2 or table.shape[1] != 4 or table.shape[0] == 0:
        raise ReleaseFormatError(
            f"{table_file}: {variable} has shape {table.shape}; expected (N, 4) rows of "
            "first frame, last frame (1-based, inclusive, into the name list), identity, camera"
        )
    if not np.issubdtype(table.dtype, np.number):
        raise ReleaseFormatError(f"{table_file}: {variable} holds {table.dtype}, expected integers")
    fractional = np.flatnonzero((table != np.round(table)).any(1))
    if len(fractional):
        row = int(fractional[0])
        raise ReleaseFormatError(
            f"{table_file} row {row + 1}: values must be integers, got {table[row].tolist()}"
        )
    table = table.astype(np.int64)
    names, identity, camera = _read_names(fs, base, NAME_LISTS[split])
    _check_table(table, table_file, NAME_LISTS[split], names, identity, camera)
    _check_overlaps(table, table_file, NAME_LISTS[split])
    return table, names


def _read_names(fs, base: str, name_file: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Frame file names of a name list and, parsed from them in one vectorised pass, identity and camera."""
    raw = fs.cat_file(posixpath.join(base, name_file))
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ReleaseFormatError(
            f"{name_file} line {line}: not ASCII; expected names like {NAME_PATTERN}"
        ) from error
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:  # a trailing newline or blank lines at the end are harmless
        names.pop()
    if not names:
        raise ReleaseFormatError(f"{name_file}: empty; expected one frame file name ({NAME_PATTERN}) "
                                 "per line")
    lengths = np.fromiter(map(len, names), np.int64, len(names))
    wrong = np.flatnonzero(lengths != _NAME_LENGTH)
    if len(wrong):
        _bad_name(name_file, names, int(wrong[0]))
    chars = np.frombuffer("".join(names).encode("ascii"), np.uint8).reshape(len(names), _NAME_LENGTH)
    digits = (chars >= ord("0")) & (chars <= ord("9"))
    pattern = np.frombuffer(NAME_PATTERN.encode(), np.uint8)
    literal = np.isin(np.arange(_NAME_LENGTH), [4, 6, 11, 15, 16, 17, 18])  # C, T, F, .jpg
    junk = (chars[:, :4] == np.frombuffer(b"00-1", np.uint8)).all(1)
    ok = (digits[:, :4].all(1) | junk) & (chars[:, literal] == pattern[literal]).all(1)
    ok &= digits[:, ~literal & (np.arange(_NAME_LENGTH) >= 4)].all(1)
    if not ok.all():
        _bad_name(name_file, names, int(np.flatnonzero(~ok)[0]))
    identity = (chars[:, :4].astype(np.int64) - ord("0")) @ np.array([1000, 100, 10, 1])
    identity[junk] = JUNK
    return names, identity, chars[:, 5].astype(np.int64) - ord("0")


def _bad_name(name_file: str, names: list[str], index: int):
    raise ReleaseFormatError(
        f"{name_file} line {index + 1}: {names[index]!r} is not a MARS frame name {NAME_PATTERN} "
        "(4-char identity or 00-1 for junk, C + camera digit, T + 4-digit tracklet, F + 3-digit frame)"
    )


def _check_table(table, table_file, name_file, names, name_identity, name_camera):
    first, last, identity, camera = table.T
    bad = (first < 1) | (last > len(names)) | (last < first)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        f, la = int(first[row]), int(last[row])
        where = f"{table_file} row {row + 1} (first {f}, last {la})"
        if la == f - 1:
            raise ReleaseFormatError(f"{where}: empty tracklet (no frames); every tracklet needs "
                                     "first <= last")
        if la < f:
            raise ReleaseFormatError(
                f"{where}: first frame after last frame; columns are first, last (inclusive)"
            )
        raise ReleaseFormatError(
            f"{where}: range outside {name_file}, which has {len(names)} names (rows 1..{len(names)}); "
            "is the name list truncated or from another split/release?"
        )
    # every frame of every tracklet against its table row, as flat arrays
    counts = last - first + 1
    frame_row = np.repeat(np.arange(len(table)), counts)
    frame_index = (
        np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + first[frame_row] - 1
    )
    for label, expected, parsed in (("camera", camera, name_camera), ("identity", identity, name_identity)):
        wrong = np.flatnonzero(parsed[frame_index] != expected[frame_row])
        if len(wrong):
            row, index = int(frame_row[wrong[0]]), int(frame_index[wrong[0]])
            raise ReleaseFormatError(
                f"{table_file} row {row + 1}: {label} {int(expected[row])} in the table but {name_file} line "
                f"{index + 1} ({names[index]}) says {int(parsed[index])}; the name list and table disagree"
            )


def _check_overlaps(table: np.ndarray, table_file: str, name_file: str) -> None:
    """No two rows share a frame: a frame in two tracklets would be trained on twice, or be its own match."""
    order = np.argsort(table[:, 0], kind="stable")
    first, last = table[order, 0], table[order, 1]
    # sorted by first frame, a row overlaps an earlier one iff it starts before the furthest end so far
    reach = np.maximum.accumulate(last)
    overlapping = np.flatnonzero(first[1:] <= reach[:-1])
    if len(overlapping):
        later = int(order[overlapping[0] + 1])
        earlier = int(order[: overlapping[0] + 1][np.argmax(last[: overlapping[0] + 1])])
        a, b = sorted((earlier, later))
        raise ReleaseFormatError(
            f"{table_file} rows {a + 1} (frames {table[a, 0]}..{table[a, 1]}) and {b + 1} (frames "
            f"{table[b, 0]}..{table[b, 1]}) share frames of {name_file}; each frame belongs to one tracklet, "
            "so fix the first/last columns of one of them (is the table from another release?)"
        )


def _read_queries(fs, base: str, test_table: np.ndarray) -> np.ndarray:
    """0-based test-table rows of the queries: a non-empty list of distinct rows of person identities."""
    test_rows = len(test_table)
    query = load_mat(fs, base, QUERY_FILE, QUERY_VARIABLE)
    if query.ndim != 2 or min(query.shape) > 1:
        raise ReleaseFormatError(f"{QUERY_FILE}: {QUERY_VARIABLE} has shape {query.shape}; expected (1, N)")
    if query.size == 0:
        raise ReleaseFormatError(
            f"{QUERY_FILE}: {QUERY_VARIABLE} is empty, so there is nothing to evaluate; it must list the "
            f"1-based rows of {TRACK_TABLES['test'][0]} that are queries (the release's file has 1980)"
        )
    if not np.issubdtype(query.dtype, np.number) or (query != np.round(query)).any():
        raise ReleaseFormatError(
            f"{QUERY_FILE}: {QUERY_VARIABLE} must hold integer row numbers, got {query.dtype} values")
    query = query.ravel().astype(np.int64)
    bad = np.flatnonzero((query < 1) | (query > test_rows))
    if len(bad):
        entry = int(bad[0])
        raise ReleaseFormatError(
            f"{QUERY_FILE} entry {entry + 1}: query index {int(query[entry])} is outside the test track "
            f"table {TRACK_TABLES['test'][0]} (rows 1..{test_rows})"
        )
    seen = {}
    for entry, row in enumerate(query.tolist()):
        if row in seen:
            raise ReleaseFormatError(
                f"{QUERY_FILE} entry {entry + 1}: query index {row} already listed at entry {seen[row] + 1}"
            )
        seen[row] = entry
    identity = test_table[query - 1, 2]
    bad = np.flatnonzero((identity == JUNK) | (identity == DISTRACTOR))
    if len(bad):
        entry = int(bad[0])
        kind = "junk (-1)" if identity[entry] == JUNK else "distractor (0)"
        raise ReleaseFormatError(
            f"{QUERY_FILE} entry {entry + 1}: query index {int(query[entry])} is {TRACK_TABLES['test'][0]} "
            f"row {int(query[entry])}, a {kind} tracklet with no true match; a query must be a person's "
            f"tracklet: remove the entry (is {QUERY_VARIABLE} from another release, or 0-based?)"
        )
    return query - 1


def _check_images(fs, base: str, split: str, names: list[str]):
    """Every named frame exists under bbox_<split>/<NNNN>/; one listing per identity folder."""
    by_folder = defaultdict(list)
    for index, name in enumerate(names):
        by_folder[name[:4]].append(index)
    missing = []
    for folder, indices in by_folder.items():
        try:
            listed = fs.ls(posixpath.join(base, f"bbox_{split}", folder), detail=False)
        except FileNotFoundError:
            listed = []
        present = {posixpath.basename(path.rstrip("/")) for path in listed}
        missing.extend(i for i in indices if names[i] not in present)
    if missing:
        missing.sort()
        shown = ", ".join(f"bbox_{split}/{names[i][:4]}/{names[i]} ({NAME_LISTS[split]} line {i + 1})"
                          for i in missing[:_MISSING_SHOWN])  # fmt: skip
        raise ReleaseFormatError(
            f"{len(missing)} of {len(names)} frames listed in {NAME_LISTS[split]} are missing under "
            f"bbox_{split}/, first: {shown}; copy the complete image folders, or pass check_images=False "
            "to read the index only"
        )
