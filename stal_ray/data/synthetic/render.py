"""How a synthetic pedestrian frame is drawn: identities' looks, cameras, walking poses, scenes, occluders.

`render(track, seed, size, occlusion)` gives the JPEG bytes and ground-truth keypoints of every frame of one
tracklet, drawn from seeded generators only (same arguments, same bytes). `appearance` is what makes an
identity recognisable in every camera, `camera` what a camera does to every crop; STYLES are the generator
styles. stal_ray/data/synthetic/generator.py lays the tracklets out as a MARS release, synthetic_layouts.py
as the iLIDS-VID and PRID-2011 ones; stal_ray/data/synthetic/occluders.py draws what hides the person.
"""

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from stal_ray.core.skeleton import CANONICAL_POSE, JOINT_NAMES
from stal_ray.data.releases import mars
from stal_ray.data.synthetic.occluders import OCCLUDER_STYLES, Occluders
from stal_ray.data.synthetic.sessions import session, session_of

_J = {name: index for index, name in enumerate(JOINT_NAMES)}
# Hand-picked separable colours first (learnable in a few steps), then random ones for larger sets.
PALETTE = (
    (200, 30, 30), (30, 60, 200), (30, 160, 50), (230, 200, 40), (240, 240, 240), (25, 25, 25),
    (140, 40, 160), (240, 130, 20), (40, 190, 200), (120, 80, 40), (130, 130, 130), (240, 120, 170),
)  # fmt: skip
SKIN = ((235, 195, 160), (200, 150, 110), (150, 100, 70), (95, 60, 40))
PATTERNS = ("plain", "stripes", "stripe", "blob", "bag")
# Generator styles: "default", the data set every config was tuned on, and "alternate", one no config was
# tuned on (issue 22): muted and dark clothing colours drawn at random (none of PALETTE's), strong camera
# colour casts and darker, more saturated scenes.
STYLES = ("default", "alternate")


@dataclass(frozen=True)
class Appearance:
    """What makes an identity recognisable in every camera."""

    upper: tuple[int, int, int]
    lower: tuple[int, int, int]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    accent: tuple[int, int, int]
    pattern: str
    build: float  # shoulder/hip width factor
    stature: float  # height factor


@dataclass(frozen=True)
class Camera:
    """What a camera does to every crop it takes: colour cast, background, framing."""

    cast: np.ndarray  # per-channel gain
    ground: tuple[int, int, int]
    wall: tuple[int, int, int]
    scale: float  # person height as a share of the crop
    offset: tuple[float, float]  # person centre shift, share of the crop


@dataclass(frozen=True)
class Track:
    split: str
    identity: int
    camera: int
    number: int  # tracklet number within the identity, as in the file name
    frames: int

    @property
    def folder(self) -> str:
        return "00-1" if self.identity == mars.JUNK else f"{self.identity:04d}"

    def name(self, frame: int) -> str:
        return f"{self.folder}C{self.camera}T{self.number:04d}F{frame:03d}.jpg"


def _colour(rng: np.random.Generator, index: int) -> tuple[int, int, int]:
    if index < len(PALETTE):
        return PALETTE[index]
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _alternate_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A muted or dark colour: a random hue at low to middle saturation and value, unlike PALETTE's."""
    hue, saturation, value = rng.uniform(0, 1), rng.uniform(0.15, 0.7), rng.uniform(0.2, 0.75)
    rgb = value * (1 - saturation * np.clip(np.abs((hue * 6 - np.array([3, 2, 4])) % 6 - 3) - 1, 0, 1))
    return tuple(int(v) for v in np.round(rgb * 255))


def appearance(seed: int, identity: int, style: str = "default") -> Appearance:
    rng = np.random.default_rng([seed, 1, identity])
    if style == "alternate":
        colours = [_alternate_colour(rng) for _ in range(4)]
        return Appearance(
            upper=colours[0], lower=colours[1], skin=SKIN[int(rng.integers(len(SKIN)))], hair=colours[2],
            accent=colours[3], pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
            build=float(rng.uniform(0.8, 1.25)), stature=float(rng.uniform(0.88, 1.0)),
        )  # fmt: skip
    upper, lower = rng.choice(len(PALETTE) * 2, 2, replace=False)
    return Appearance(
        upper=_colour(rng, int(upper)),
        lower=_colour(rng, int(lower)),
        skin=SKIN[int(rng.integers(len(SKIN)))],
        hair=_colour(rng, int(rng.choice([5, 9, 10, 3]))),
        accent=_colour(rng, int(rng.integers(len(PALETTE)))),
        pattern=PATTERNS[int(rng.integers(len(PATTERNS)))],
        build=float(rng.uniform(0.85, 1.2)),
        stature=float(rng.uniform(0.92, 1.0)),
    )


# Per style, the ranges a camera is drawn from: person height as a share of the crop, colour cast gain,
# ground and wall colours, and how far the person's centre may shift (share of the slack). "alternate": strong
# casts (a warm, a cold camera), darker and more saturated scenes.
_CAMERA_RANGES = {
    "default": dict(scale=(0.78, 0.95), cast=(0.8, 1.2), ground=(60, 180), wall=(60, 220), shift=0.6),
    "alternate": dict(scale=(0.72, 0.95), cast=(0.6, 1.4), ground=(20, 140), wall=(0, 256), shift=0.8),
}


def camera(seed: int, camera: int, style: str = "default") -> Camera:
    r = _CAMERA_RANGES[style]
    rng = np.random.default_rng([seed, 2, camera])
    scale = float(rng.uniform(*r["scale"]))
    slack = (1 - scale) / 2
    return Camera(
        cast=rng.uniform(*r["cast"], 3),
        ground=tuple(int(v) for v in rng.integers(*r["ground"], 3)),
        wall=tuple(int(v) for v in rng.integers(*r["wall"], 3)),
        scale=scale,
        offset=tuple(float(rng.uniform(-slack, slack) * r["shift"]) for _ in range(2)),
    )


def _pose(track: Track, look: Appearance, camera: Camera, rng: np.random.Generator, size) -> np.ndarray:
    """(frames, 14, 2) joint pixels: the canonical pose walking, jittered, framed by the camera."""
    height, width = size
    frames = np.arange(track.frames)
    base = np.asarray(CANONICAL_POSE, np.float64)
    base = np.stack([0.5 + (base[:, 0] - 0.5) * look.build, base[:, 1]], axis=1)
    phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * frames / rng.uniform(6, 10)
    swing = np.sin(phase)[:, None]
    pose = np.repeat(base[None], track.frames, axis=0)
    for joint, amount in (
        ("right_ankle", 0.10),
        ("right_knee", 0.05),
        ("left_wrist", 0.06),
        ("left_elbow", 0.03),
    ):
        pose[:, _J[joint], 0] += amount * swing[:, 0]
    for joint, amount in (
        ("left_ankle", 0.10),
        ("left_knee", 0.05),
        ("right_wrist", 0.06),
        ("right_elbow", 0.03),
    ):
        pose[:, _J[joint], 0] -= amount * swing[:, 0]
    pose[:, :, 1] += 0.015 * np.abs(swing)  # the body bobs twice per stride
    pose += rng.normal(0, 0.008, pose.shape)
    # crossing the view: a slow drift over the tracklet, within the camera's framing slack
    drift = rng.uniform(-0.04, 0.04) * (frames / max(track.frames - 1, 1) - 0.5)
    scale = camera.scale * look.stature
    x = 0.5 + camera.offset[0] + drift[:, None] + (pose[..., 0] - 0.5) * scale
    y = 0.5 + camera.offset[1] + (pose[..., 1] - 0.5) * scale
    return np.stack([np.clip(x, 0, 1) * (width - 1), np.clip(y, 0, 1) * (height - 1)], axis=-1)


def _background(camera: Camera, rng: np.random.Generator, size) -> np.ndarray:
    """(H, W, 3) float: a wall above a ground line, shaded, as the camera sees its scene."""
    height, width = size
    horizon = int(height * rng.uniform(0.45, 0.75))
    image = np.empty((height, width, 3))
    image[:horizon] = camera.wall
    image[horizon:] = camera.ground
    image *= np.linspace(0.85, 1.1, height)[:, None, None]
    return image + rng.normal(0, 6, (1, width, 3))  # vertical streaks: texture that is not identity


def _draw_person(image: Image.Image, joints: np.ndarray, look: Appearance, size) -> None:
    height, width = size
    draw = ImageDraw.Draw(image)
    point = {name: tuple(joints[_J[name]]) for name in JOINT_NAMES}
    limb = max(2, round(width * 0.13))
    for side in ("right", "left"):
        draw.line([point[f"{side}_hip"], point[f"{side}_knee"], point[f"{side}_ankle"]], look.lower, limb)
    torso = [point["right_shoulder"], point["left_shoulder"], point["left_hip"], point["right_hip"]]
    draw.polygon(torso, fill=look.upper)
    for side in ("right", "left"):
        arm = [point[f"{side}_shoulder"], point[f"{side}_elbow"], point[f"{side}_wrist"]]
        draw.line(arm, look.upper, max(2, round(width * 0.09)))
        draw.ellipse(_box(point[f"{side}_wrist"], width * 0.05), fill=look.skin)
    (rsx, rsy), (lsx, lsy) = point["right_shoulder"], point["left_shoulder"]
    (rhx, rhy), (lhx, lhy) = point["right_hip"], point["left_hip"]
    if look.pattern == "stripes":
        for share in (0.3, 0.55, 0.8):
            left = (rsx + (rhx - rsx) * share, rsy + (rhy - rsy) * share)
            right = (lsx + (lhx - lsx) * share, lsy + (lhy - lsy) * share)
            draw.line([left, right], look.accent, max(1, round(height * 0.03)))
    elif look.pattern == "stripe":
        top, bottom = ((rsx + lsx) / 2, (rsy + lsy) / 2), ((rhx + lhx) / 2, (rhy + lhy) / 2)
        draw.line([top, bottom], look.accent, max(2, round(width * 0.12)))
    elif look.pattern == "blob":
        centre = ((rsx + lsx + rhx + lhx) / 4, (rsy + lsy + rhy + lhy) / 4)
        draw.ellipse(_box(centre, width * 0.11), fill=look.accent)
    elif look.pattern == "bag":
        x, y = point["left_hip"]
        draw.rectangle([x, y - height * 0.08, x + width * 0.16, y + height * 0.06], fill=look.accent)
    head_top, neck = np.asarray(point["head_top"]), np.asarray(point["neck"])
    centre, radius = (head_top + neck) / 2, max(2.0, float(np.linalg.norm(neck - head_top)) / 2)
    draw.ellipse(_box(centre, radius), fill=look.skin)
    draw.pieslice(_box(centre, radius), 180, 360, fill=look.hair)


def _box(centre, radius: float) -> list[float]:
    x, y = centre
    return [x - radius, y - radius, x + radius, y + radius]


def _finish(image: np.ndarray, camera: Camera, rng: np.random.Generator, light=None) -> bytes:
    image = image * (camera.cast if light is None else camera.cast * light) + rng.normal(0, 4, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def render(track: Track, seed: int, size, occlusion: float, *, style: str = "default",
           occluders: str = "boxes", session_identities: int = 0) -> tuple[list[bytes], np.ndarray]:
    """JPEG bytes and (frames, 14, 3) keypoints of every frame of a tracklet (session_identities: see
    stal_ray.data.synthetic.sessions)."""
    height, width = size
    rng = np.random.default_rng(
        [seed, 3, 0 if track.split == "train" else 1, track.identity + 2, track.number]
    )
    view = camera(seed, track.camera, style)
    keypoints = np.zeros((track.frames, len(JOINT_NAMES), 3), np.float32)
    frames = []
    if track.identity in (mars.JUNK, mars.DISTRACTOR):
        scene = _background(view, rng, size)
        for _ in range(track.frames):
            if track.identity == mars.JUNK:  # detector misfires: coloured noise, no person
                image = rng.uniform(0, 255, (1, 1, 3)) + rng.normal(0, 50, (height, width, 3))
            else:  # background crops: the scene without a person, slightly shifted per frame
                image = np.roll(scene, int(rng.integers(-2, 3)), axis=1)
            frames.append(_finish(image, view, rng))
        return frames, keypoints  # confidence 0: no joints to see

    look = appearance(seed, track.identity, style)
    index = session_of(track.identity, session_identities)
    recorded = None if index is None else session(seed, index)
    if recorded is not None:
        look = recorded.dress(look)
    light = None if recorded is None else recorded.light
    joints = _pose(track, look, view, rng, size)
    scene = _background(view, rng, size)
    # something in front of the person (a car, a post, another pedestrian): stal_ray.data.synthetic.occluders
    event_rng = np.random.default_rng([seed, 4, 0 if track.split == "train" else 1, track.identity + 2,
                                       track.number])
    hiders = Occluders(occluders, occlusion, rng, event_rng, track.frames,
                       float(joints[:, _J["neck"], 0].mean()) / (width - 1))
    for index in range(track.frames):
        image = Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8))
        _draw_person(image, joints[index], look, size)
        visible = hiders.visible(image, index, joints[index])
        confidence = np.where(visible, rng.uniform(0.7, 1.0, len(JOINT_NAMES)), 0.0)
        keypoints[index] = np.concatenate([joints[index], confidence[:, None]], axis=1)
        frames.append(_finish(np.asarray(image, np.float64), view, rng, light))
    return frames, keypoints


def check_arguments(
    identities, test_identities, cameras, tracklets, frames, height, width, occlusion, junk, distractors,
    occluders="boxes",
):
    """Refuse arguments no release can be written from, with every problem in one message."""
    problems = []
    if identities < 1 or test_identities < 1 or identities + test_identities > 9999:
        problems.append("identities and test_identities must be >= 1 and together <= 9999 (4-digit folders)")
    if not 1 <= cameras <= 9:
        problems.append("cameras must be 1..9 (one digit in the file name)")
    if len(tracklets) != 2 or not 1 <= tracklets[0] <= tracklets[1] <= 9999:
        problems.append(f"tracklets_per_identity must be (low, high) with 1 <= low <= high, got {tracklets}")
    if len(frames) != 2 or not 1 <= frames[0] <= frames[1] <= 999:
        problems.append(f"frames_per_tracklet must be (low, high) with 1 <= low <= high <= 999, got {frames}")
    if height < 16 or width < 8:
        problems.append(f"frames must be at least 16 x 8 pixels, got {height} x {width}")
    if not 0 <= occlusion <= 1:
        problems.append(f"occlusion is a share of frames in [0, 1], got {occlusion}")
    if occluders not in OCCLUDER_STYLES:
        problems.append(f"occluders must be one of {', '.join(OCCLUDER_STYLES)}, got {occluders!r}")
    if junk < 0 or distractors < 0:
        problems.append("junk_tracklets and distractor_tracklets must be >= 0")
    if problems:
        raise ValueError("; ".join(problems))
