"""Ranked galleries, as torchreid's visrank draws them: for a seeded sample of queries and for the worst ones
by AP, one image per query and mode with the query tracklet's frames and its top-K gallery tracklets, each
bordered green (a true match) or red, its distance, identity and camera written under it; and an index of
them (index.json, index.html).

The top-K is the ranked list the metrics use (ranking.evaluate_ranking): the gallery sorted by distance with a
stable sort (ties in gallery order), the entries of the query's identity in its own camera skipped (MARS's
protocol; the query itself among them under `official`); junk is not in the gallery (query_gallery_split). No
Ray and no torch: numpy and PIL on what evaluate.py hands over (distance rows, identities, a few frames).
"""

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stal_ray.core import storage
from stal_ray.data.releases.base import DISTRACTOR, JUNK
from stal_ray.evaluate.report import shown_frames, write_bytes

RANKED_DIR = "ranked"
INDEX_JSON, INDEX_HTML = "index.json", "index.html"
SAMPLED_QUERIES = 10  # drawn at random (seeded), the same queries in every mode
WORST_QUERIES = 10  # the lowest AP of each mode
QUERY_FRAMES = 4  # evenly spaced frames of the query tracklet
GALLERY_FRAMES = 1  # frames of each gallery tracklet (the middle of those read)
FRAME_HEIGHT = 144  # frames are drawn at this height, in their aspect ratio
BORDER, PAD, GAP, MARGIN = 5, 6, 24, 8  # pixels: cell border, between cells, before the gallery, around
LINE = 14  # pixels per line of text
MATCH, MISMATCH, QUERY = (0, 190, 0), (220, 0, 0), (40, 40, 40)  # border colours (RGB)
BACKGROUND, TEXT, MISSING = (255, 255, 255), (0, 0, 0), (128, 128, 128)


@dataclass(frozen=True)
class RankedQuery:
    """One query's top-K under one mode: the gallery entries the metrics rank, best first."""

    query: int  # row among the queries (of the distance matrix)
    tracklet: int
    identity: int
    camera: int
    average_precision: float  # by the protocol's AP rule (RankingResult.average_precision)
    reasons: tuple[str, ...]  # why it is shown: "worst" (lowest AP), "sample" (the seeded sample)
    gallery: np.ndarray  # (k,) columns of the distance matrix
    tracklets: np.ndarray  # (k,) their tracklets
    identities: np.ndarray  # (k,)
    cameras: np.ndarray  # (k,)
    distances: np.ndarray  # (k,)

    @property
    def matches(self) -> np.ndarray:
        """(k,) bool: the entry is a true match (the query's identity; its own camera is never ranked)."""
        return self.identities == self.identity

    @property
    def file_name(self) -> str:
        return (f"q{self.query:04d}_id{self.identity}_c{self.camera}_"
                f"{'-'.join(self.reasons)}.png")


def chosen_queries(evaluated: np.ndarray, average_precision: np.ndarray, *, sample: int = SAMPLED_QUERIES,
                   worst: int = WORST_QUERIES, seed: int = 0) -> dict[int, tuple[str, ...]]:
    """Query rows to draw -> why: the `worst` evaluated queries by AP (lowest first, ties in query order),
    then a seeded sample of `sample` evaluated queries (query order). `evaluated` (Nq,) bool and
    `average_precision` (one per evaluated query) as RankingResult holds them; queries without a true match
    are in no metric and not drawn."""
    rows = np.flatnonzero(np.asarray(evaluated, dtype=bool))
    average_precision = np.asarray(average_precision, dtype=np.float64)
    if len(rows) != len(average_precision):
        raise ValueError(f"{len(average_precision)} APs for {len(rows)} evaluated queries")
    reasons: dict[int, list[str]] = {}
    for row in rows[np.argsort(average_precision, kind="stable")[:max(0, worst)]]:
        reasons.setdefault(int(row), []).append("worst")
    rng = np.random.default_rng(seed)
    for row in np.sort(rng.choice(rows, size=min(max(0, sample), len(rows)), replace=False)):
        reasons.setdefault(int(row), []).append("sample")
    return {row: tuple(why) for row, why in reasons.items()}


def top_k(distance: np.ndarray, identity: int, camera: int, g_pids: np.ndarray, g_cams: np.ndarray,
          k: int) -> np.ndarray:
    """Gallery columns of one query's first k ranked entries: by distance, ties in gallery order (a stable
    sort, as ranking.py), those of the query's identity in its camera skipped."""
    order = np.argsort(np.asarray(distance), kind="stable")
    kept = order[~((g_pids[order] == identity) & (g_cams[order] == camera))]
    return kept[:k]


def ranked_queries(chosen: Mapping[int, Sequence[str]], rows: np.ndarray, ids: Mapping[str, np.ndarray],
                   tracklets: Mapping[str, np.ndarray], evaluated: np.ndarray, average_precision: np.ndarray,
                   k: int) -> list[RankedQuery]:
    """RankedQuery of each chosen query row (chosen_queries); rows (len(chosen), Ng): their distances, in
    the order of `chosen`; ids: q_pids, g_pids, q_cams, g_cams; tracklets: q (Nq,) and g (Ng,)."""
    ap_of = dict(zip(np.flatnonzero(evaluated).tolist(), np.asarray(average_precision).tolist(), strict=True))
    g_pids, g_cams = np.asarray(ids["g_pids"]), np.asarray(ids["g_cams"])
    shown = []
    for (query, reasons), distance in zip(chosen.items(), np.asarray(rows), strict=True):
        identity, camera = int(ids["q_pids"][query]), int(ids["q_cams"][query])
        columns = top_k(distance, identity, camera, g_pids, g_cams, k)
        shown.append(RankedQuery(query=query, tracklet=int(tracklets["q"][query]), identity=identity,
                                 camera=camera, average_precision=float(ap_of.get(query, float("nan"))),
                                 reasons=tuple(reasons), gallery=columns,
                                 tracklets=np.asarray(tracklets["g"])[columns], identities=g_pids[columns],
                                 cameras=g_cams[columns], distances=np.asarray(distance)[columns]))
    return shown


def frames_to_read(shown: Mapping[str, Sequence[RankedQuery]], num_frames: Mapping[int, int]
                   ) -> dict[int, np.ndarray]:
    """tracklet -> frame positions to read (QUERY_FRAMES evenly spaced) of every tracklet drawn; a gallery
    cell shows GALLERY_FRAMES of them."""
    wanted = {ranked.tracklet for queries in shown.values() for ranked in queries}
    wanted |= {int(t) for queries in shown.values() for ranked in queries for t in ranked.tracklets}
    return {t: shown_frames(int(num_frames[t]), QUERY_FRAMES) for t in sorted(wanted)}


@dataclass(frozen=True)
class Layout:
    """Where an image's parts are, in pixels: boxes (x0, y0, x1, y1), x1 and y1 exclusive, each a cell's
    outer edge (its border BORDER pixels wide inside it)."""

    size: tuple[int, int]  # width, height
    frame: tuple[int, int]  # a frame's drawn width, height
    query: tuple[int, int, int, int]
    gallery: tuple[tuple[int, int, int, int], ...]


def layout(num_gallery: int, frame_size: tuple[int, int], title_width: int = 0,
           query_frames: int = QUERY_FRAMES) -> Layout:
    """The layout of an image with the query's frames (QUERY_FRAMES, fewer for a shorter tracklet), then
    num_gallery cells of GALLERY_FRAMES frames, frame_size (width, height) each as drawn, a title line above
    and two caption lines under."""
    width, height = frame_size
    top = MARGIN + LINE + PAD
    cell_height = height + 2 * BORDER

    def cell(x: int, frames: int) -> tuple[int, int, int, int]:
        return (x, top, x + frames * width + (frames - 1) * 2 + 2 * BORDER, top + cell_height)

    query = cell(MARGIN, query_frames)
    x, gallery = query[2] + GAP, []
    for _ in range(num_gallery):
        gallery.append(cell(x, GALLERY_FRAMES))
        x = gallery[-1][2] + PAD
    right = max(gallery[-1][2] if gallery else query[2], MARGIN + title_width)
    bottom = top + cell_height + 2 * LINE + 2 + MARGIN  # two caption lines under the cells
    return Layout((right + MARGIN, bottom), frame_size, query, tuple(gallery))


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: its fixed bitmap font
        return ImageFont.load_default()


def _frame_size(frames: Mapping[int, np.ndarray]) -> tuple[int, int]:
    for stack in frames.values():
        if len(stack):
            height, width = np.asarray(stack).shape[1:3]
            return max(1, round(FRAME_HEIGHT * width / height)), FRAME_HEIGHT
    return FRAME_HEIGHT // 2, FRAME_HEIGHT


def _paste(image: Image.Image, box: tuple[int, int, int, int], stack, count: int, size: tuple[int, int],
           colour: tuple[int, int, int]) -> None:
    """A cell: `count` of the frames in `stack` (evenly spread; grey when missing) inside a border."""
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
    stack = np.asarray(stack) if stack is not None else np.zeros((0,))
    if len(stack) > count:
        stack = stack[np.linspace(0, len(stack) - 1, count + 2)[1:-1].round().astype(int)
                      if count == 1 else np.linspace(0, len(stack) - 1, count).round().astype(int)]
    x = box[0] + BORDER
    for i in range(count):
        if i < len(stack):
            frame = Image.fromarray(np.ascontiguousarray(stack[i], dtype=np.uint8)).resize(size,
                                                                                         Image.BILINEAR)
        else:
            frame = Image.new("RGB", size, MISSING)
        image.paste(frame, (x, box[1] + BORDER))
        x += size[0] + 2


def _who(identity: int, camera: int) -> str:
    name = {DISTRACTOR: "distractor", JUNK: "junk"}.get(int(identity), f"id {identity}")
    return f"{name} c{camera}"


def draw_ranked(ranked: RankedQuery, frames: Mapping[int, np.ndarray], mode: str) -> Image.Image:
    """The image of one query under `mode`: its frames (dark border), then its ranked gallery cells,
    green-bordered for a true match and red otherwise, "#rank distance" and "id <identity> c<camera>"
    under each. frames: tracklet -> uint8 (n, H, W, 3), e.g. tracklet_frames at frames_to_read."""
    font = _font()
    why = " and ".join({"worst": "lowest AP", "sample": "sampled"}[r] for r in ranked.reasons)
    title = (f"{mode}: query {ranked.query} (tracklet {ranked.tracklet}, identity {ranked.identity}, camera "
             f"{ranked.camera}), AP {ranked.average_precision:.1%} ({why}); top {len(ranked.gallery)}")
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_width = int(probe.textlength(title, font=font))
    size = _frame_size(frames)
    read = len(frames.get(ranked.tracklet, ()))
    query_frames = min(QUERY_FRAMES, read) if read else QUERY_FRAMES
    where = layout(len(ranked.gallery), size, title_width, query_frames)
    image = Image.new("RGB", where.size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=TEXT, font=font)

    def caption(box, lines):
        for i, line in enumerate(lines):
            draw.text((box[0], box[3] + 2 + i * LINE), line, fill=TEXT, font=font)

    _paste(image, where.query, frames.get(ranked.tracklet), query_frames, size, QUERY)
    caption(where.query, ["query", _who(ranked.identity, ranked.camera)])
    for rank, (box, tracklet, identity, camera, distance, match) in enumerate(zip(
            where.gallery, ranked.tracklets, ranked.identities, ranked.cameras, ranked.distances,
            ranked.matches, strict=True), start=1):
        _paste(image, box, frames.get(int(tracklet)), GALLERY_FRAMES, size, MATCH if match else MISMATCH)
        caption(box, [f"#{rank} d={float(distance):.3g}", _who(int(identity), int(camera))])
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_ranked_results(out_dir: str, shown: Mapping[str, Sequence[RankedQuery]],
                         frames: Mapping[int, np.ndarray], top: int) -> str:
    """One PNG per shown query and mode, out_dir/ranked/<mode>/<RankedQuery.file_name>, and their index
    (ranked/index.json, ranked/index.html); returns index.html's path."""
    root = storage.join(out_dir, RANKED_DIR)
    index = {"top_k": int(top), "legend": "green border: true match; red: another identity; same identity "
                                          "in the query's camera skipped (not ranked)", "modes": {}}
    html = ["<!doctype html><meta charset=utf-8><title>ranked galleries</title>",
            f"<h1>Top-{int(top)} ranked galleries</h1><p>{escape(index['legend'])}</p>"]
    for mode, queries in shown.items():
        entries = index["modes"][mode] = []
        html.append(f"<h2>{escape(mode)}</h2>")
        for ranked in queries:
            file = f"{mode}/{ranked.file_name}"
            write_bytes(storage.join(root, file), _png(draw_ranked(ranked, frames, mode)))
            entries.append({
                "file": file, "query": ranked.query, "tracklet": ranked.tracklet, "identity": ranked.identity,
                "camera": ranked.camera, "average_precision": ranked.average_precision,
                "reasons": list(ranked.reasons),
                "gallery": [{"tracklet": int(t), "identity": int(i), "camera": int(c), "distance": float(d),
                             "match": bool(m)}
                            for t, i, c, d, m in zip(ranked.tracklets, ranked.identities, ranked.cameras,
                                                     ranked.distances, ranked.matches, strict=True)]})
            html.append(f"<p>{escape(file)}: AP {ranked.average_precision:.1%}, {', '.join(ranked.reasons)}"
                        f"<br><img src=\"{escape(file)}\" loading=lazy></p>")
    write_bytes(storage.join(root, INDEX_JSON), (json.dumps(index, indent=1) + "\n").encode())
    path = storage.join(root, INDEX_HTML)
    write_bytes(path, "\n".join(html).encode())
    return path
