"""What hides a synthetic pedestrian: static random boxes, or occlusion that moves in time.

`boxes` (the first generator's occluders): each frame independently, with probability `occlusion`, one
random box covers the bottom or one side of the crop. `moving`: occlusion comes in events that last several
contiguous frames, as in real tracklets: a *burst*, the person walking behind something (a post sliding
across the crop as the camera follows the person, or a car or bench along the bottom), or a *passer-by*,
another pedestrian walking across in front. Every occluder is drawn into a mask as well as the image, and a
joint is hidden when the mask covers its pixel, so the keypoints' visibility is the ground truth of what
the image shows.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from stal_ray.core.skeleton import CANONICAL_POSE, JOINT_NAMES

OCCLUDER_STYLES = ("boxes", "moving")
EVENT_FRAMES = (2, 6)  # inclusive range of a moving event's length, frames (mean 4)
_J = {name: index for index, name in enumerate(JOINT_NAMES)}


@dataclass(frozen=True)
class Event:
    """One occluder over frames [start, start + length) of a tracklet."""

    kind: str  # "post", "band" (bursts) or "passer" (a passer-by)
    start: int
    length: int
    colour: tuple[int, int, int]
    accent: tuple[int, int, int]
    position: float  # post/passer: x of its centre at the event's middle, crop fraction; band: top, fraction
    speed: float  # post/passer: crop fractions per frame (signed); band: 0
    extent: float  # post: width; passer: height; band: unused; crop fractions


def plan_events(rng: np.random.Generator, frames: int, occlusion: float, neck_x: float) -> list[Event]:
    """Moving occluders of one tracklet: a two-state chain over frames whose occluded share is `occlusion`
    on average (events of EVENT_FRAMES frames, mean m, start at a free frame with probability
    s / (m (1 - s)), so that the stationary share of occluded frames is s). neck_x: the person's mean
    neck x, crop fraction, so that every occluder crosses the body during its event."""
    low, high = EVENT_FRAMES
    mean = (low + high) / 2
    start_probability = 1.0 if occlusion >= 1 else min(1.0, occlusion / (mean * (1 - occlusion)))
    events, t = [], 0
    while t < frames:
        if occlusion <= 0 or rng.random() >= start_probability:
            t += 1
            continue
        length = min(int(rng.integers(low, high + 1)), frames - t)
        kind = ("post", "band", "passer")[int(rng.choice(3, p=(0.3, 0.2, 0.5)))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        accent = tuple(int(v) for v in rng.integers(0, 256, 3))
        direction = 1.0 if rng.random() < 0.5 else -1.0
        if kind == "band":
            position, speed, extent = float(rng.uniform(0.45, 0.7)), 0.0, 0.0
        elif kind == "post":
            position = neck_x + float(rng.uniform(-0.1, 0.1))
            speed, extent = direction * float(rng.uniform(0.05, 0.15)), float(rng.uniform(0.3, 0.55))
        else:
            position = neck_x + float(rng.uniform(-0.12, 0.12))
            speed, extent = direction * float(rng.uniform(0.08, 0.2)), float(rng.uniform(0.95, 1.1))
        events.append(Event(kind, t, length, colour, accent, position, speed, extent))
        t += length
    return events


def draw_event(image: Image.Image, event: Event, index: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the event's occluder as it is in frame `index` of the tracklet; returns its (H, W) bool mask."""
    width, height = image.size
    mask = Image.new("L", image.size, 0)
    layers = (ImageDraw.Draw(image), ImageDraw.Draw(mask))
    x = (event.position + event.speed * (index - event.start - (event.length - 1) / 2)) * width
    if event.kind == "band":
        for draw, fill in zip(layers, (event.colour, 255), strict=True):
            draw.rectangle((0, event.position * height, width, height), fill=fill)
    elif event.kind == "post":
        half = event.extent * width / 2
        for draw, fill in zip(layers, (event.colour, 255), strict=True):
            draw.rectangle((x - half, 0, x + half, height), fill=fill)
    else:
        _draw_passer(layers, x, index, event, rng, (height, width))
    return np.asarray(mask) > 0


def _draw_passer(layers, centre_x: float, index: int, event: Event, rng, size) -> None:
    """A walking figure of the event's colours, nearer the camera than the person (event.extent × the crop
    height), its centre at centre_x."""
    height, width = size
    pose = np.asarray(CANONICAL_POSE, np.float64).copy()
    swing = np.sin(np.pi * index / 2)
    for joint, amount in (("right_ankle", 0.1), ("left_wrist", 0.06), ("left_ankle", -0.1),
                          ("right_wrist", -0.06)):
        pose[_J[joint], 0] += amount * swing
    x = centre_x + (pose[:, 0] - 0.5) * event.extent * width
    y = (0.5 + (pose[:, 1] - 0.5) * event.extent) * height + rng.normal(0, 0.3)
    point = {name: (float(x[_J[name]]), float(y[_J[name]])) for name in JOINT_NAMES}
    limb = max(2, round(width * 0.15))
    for draw, (upper, lower, skin) in zip(layers, ((event.colour, event.accent, (200, 160, 130)),
                                                   (255, 255, 255)), strict=True):
        for side in ("right", "left"):
            draw.line([point[f"{side}_hip"], point[f"{side}_knee"], point[f"{side}_ankle"]], lower, limb)
            draw.line([point[f"{side}_shoulder"], point[f"{side}_elbow"], point[f"{side}_wrist"]], upper,
                      max(2, round(width * 0.1)))
        draw.polygon([point["right_shoulder"], point["left_shoulder"], point["left_hip"], point["right_hip"]],
                     fill=upper)
        head, neck = np.asarray(point["head_top"]), np.asarray(point["neck"])
        centre, radius = (head + neck) / 2, max(2.0, float(np.linalg.norm(neck - head)) / 2)
        draw.ellipse([centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius],
                     fill=skin)


def joints_visible(joints: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(14, 2) joint pixels, (H, W) occluder mask -> (14,) bool: the mask does not cover the joint."""
    height, width = mask.shape
    cols = np.clip(np.rint(joints[:, 0]).astype(int), 0, width - 1)
    rows = np.clip(np.rint(joints[:, 1]).astype(int), 0, height - 1)
    return ~mask[rows, cols]


def static_box(image: Image.Image, joints: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The `boxes` style's occluder of one frame (something in front of the person: the bottom, always
    hiding the ankles, or one side up to near the body's axis, always hiding an arm); returns (14,) visible.
    Draws from `rng` exactly as the first generator did, so `boxes` releases keep their bytes."""
    width, height = image.size
    if rng.random() < 0.5:
        box = (0, height * rng.uniform(0.45, 0.75), width, height)
    else:
        split = joints[_J["neck"], 0] + width * rng.uniform(-0.08, 0.08)
        box = (0, 0, split, height) if rng.random() < 0.5 else (split, 0, width, height)
    ImageDraw.Draw(image).rectangle(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    x, y = joints[:, 0], joints[:, 1]
    return ~((x >= box[0]) & (x <= box[2]) & (y >= box[1]) & (y <= box[3]))


class Occluders:
    """The occluders of one tracklet, frame by frame: `occluders.visible(image, index, joints)` draws what
    hides the person in that frame (if anything) and returns the (14,) visibility of its joints."""

    def __init__(self, style: str, occlusion: float, rng: np.random.Generator, event_rng: np.random.Generator,
                 frames: int, neck_x: float):
        if style not in OCCLUDER_STYLES:
            raise ValueError(f"occluders = {style!r} is invalid: use one of {', '.join(OCCLUDER_STYLES)}")
        self.style, self.occlusion, self.rng, self.event_rng = style, occlusion, rng, event_rng
        self.events = plan_events(event_rng, frames, occlusion, neck_x) if style == "moving" else []

    def visible(self, image: Image.Image, index: int, joints: np.ndarray) -> np.ndarray:
        if self.style == "boxes":
            if self.rng.random() < self.occlusion:
                return static_box(image, joints, self.rng)
            return np.ones(len(JOINT_NAMES), bool)
        for event in self.events:
            if event.start <= index < event.start + event.length:
                return joints_visible(joints, draw_event(image, event, index, self.event_rng))
        return np.ones(len(JOINT_NAMES), bool)
