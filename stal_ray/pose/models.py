"""Pretrained person-pose models run on whole frames (MARS frames are person crops, so no detector): the
frame is letterboxed into the model's input with a margin, the model's landmarks mapped back to frame
pixels and to the paper's 14 joints (joints.py).

* `blazepose-full` (default): BlazePose GHUM's full landmark model (Apache-2.0), the
  pose_landmark_full.tflite that the `mediapipe` wheels up to 0.10.21 ship (later ones do not), run by
  ai-edge-litert's TFLite interpreter on CPU. 33 landmarks with visibility and presence.
* an ONNX top-down model with SimCC outputs (RTMPose exports: input (N, 3, H, W) RGB normalised by the
  ImageNet mean and std, outputs simcc_x (N, K, W·r) and simcc_y (N, K, H·r)), by local path or fsspec URL,
  run by onnxruntime: on CPU the `pose` extra's build, on GPU (--use-gpu, --num-gpus) the `pose-gpu` extra's
  onnxruntime-gpu, never both (check_onnxruntime refuses a GPU run that would fall back to the CPU).

The models' bytes are read once (load_model, in the driver) and travel to the workers with the estimator,
so a cluster's nodes need no copy of the file.
"""

import hashlib
import io
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

from stal_ray.pose.joints import to_joints

logger = logging.getLogger(__name__)

BLAZEPOSE = "blazepose-full"
MODEL_NAMES = (BLAZEPOSE,)
# Where the BlazePose file comes from: the last mediapipe release that ships it, read with pip (no deps:
# mediapipe 0.10.21 itself needs numpy<2, which this project does not use; only the file is taken).
MEDIAPIPE_PIN = "mediapipe==0.10.21"
BLAZEPOSE_MEMBER = "mediapipe/modules/pose_landmark/pose_landmark_full.tflite"
BLAZEPOSE_SHA256 = "e9a5c5cb17f736fafd4c2ec1da3b3d331d6edbe8a0d32395855aeb2cdfd64b9f"
# Person height / frame height in the model input: the detector's ROI that the landmark model was trained
# on is the body box enlarged 1.25x (MediaPipe's pose_landmark_by_roi); a MARS crop is about the body box.
MARGIN = 1.25
RTMPOSE_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
RTMPOSE_STD = np.array([58.395, 57.12, 57.375], np.float32)


class UnknownModelError(ValueError):
    """--model names no known model and no file."""


@dataclass(frozen=True)
class PoseModel:
    """A model's bytes and what the manifest records of it."""

    kind: str  # "blazepose" | "onnx"
    name: str  # BLAZEPOSE or the path/URL it was read from
    content: bytes
    sha256: str
    source: str  # where the bytes came from, for the manifest

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "sha256": self.sha256, "source": self.source}


def _cache_dir() -> Path:
    return Path(os.environ.get("STAL_RAY_CACHE", Path.home() / ".cache" / "stal_ray")) / "pose"


def blazepose_bytes() -> tuple[bytes, str]:
    """pose_landmark_full.tflite and where it was found: an installed mediapipe that ships it, else the
    cache, else the pinned mediapipe wheel read from the package index with pip (once; then cached)."""
    try:
        installed = metadata.distribution("mediapipe").locate_file(BLAZEPOSE_MEMBER)
        if Path(installed).is_file():
            return Path(installed).read_bytes(), f"installed mediapipe ({installed})"
    except metadata.PackageNotFoundError:
        pass
    cached = _cache_dir() / f"pose_landmark_full-{BLAZEPOSE_SHA256[:12]}.tflite"
    if cached.is_file():
        return _checked(cached.read_bytes(), str(cached)), f"{MEDIAPIPE_PIN} wheel (cached {cached})"
    content = _checked(_from_wheel(), f"{MEDIAPIPE_PIN}:{BLAZEPOSE_MEMBER}")
    from stal_ray.core import storage  # here, as in load_model: the workers that unpickle estimators skip it

    storage.write_atomic(str(cached), content)
    return content, f"{MEDIAPIPE_PIN} wheel (cached {cached})"


def _from_wheel() -> bytes:
    logger.info("fetching %s from %s with pip (once; cached under %s)", BLAZEPOSE_MEMBER, MEDIAPIPE_PIN,
                _cache_dir())
    with tempfile.TemporaryDirectory() as folder:
        # the file is the same in every platform's wheel: ask for one pip can always take
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation",
                   "cp", "--abi", "cp311", "--dest", folder, MEDIAPIPE_PIN]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(folder).glob("mediapipe-*.whl"))
        if result.returncode != 0 or not wheels:
            raise UnknownModelError(
                f"could not fetch {MEDIAPIPE_PIN} with pip to read {BLAZEPOSE_MEMBER} "
                f"({result.stderr.strip()[-300:]}); install it (pip install --no-deps {MEDIAPIPE_PIN}) or "
                "pass --model PATH to a copy of pose_landmark_full.tflite")
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(BLAZEPOSE_MEMBER)


def _checked(content: bytes, where: str) -> bytes:
    digest = hashlib.sha256(content).hexdigest()
    if digest != BLAZEPOSE_SHA256:
        raise UnknownModelError(f"{where}: sha256 {digest}, expected {BLAZEPOSE_SHA256} (the file of "
                                f"{MEDIAPIPE_PIN}); delete it and rerun")
    return content


_RUNTIMES = {"blazepose": "ai_edge_litert", "onnx": "onnxruntime"}


def _check_runtime(kind: str) -> None:
    """The package that runs `kind` is importable here (and so, on a cluster built from the same lock, on
    the workers); else UnknownModelError naming the extra."""
    import importlib.util

    if importlib.util.find_spec(_RUNTIMES[kind]) is None:
        raise UnknownModelError(f"running a {kind} model needs {_RUNTIMES[kind]}, which is not installed: "
                                'install the pose extra (pip install -e ".[pose]")')


def load_model(model: str = BLAZEPOSE, *, endpoint_url: str | None = None) -> PoseModel:
    """A model by name (MODEL_NAMES), or a .tflite (BlazePose landmark layout) or .onnx (SimCC) file by
    local path or fsspec URL (https://, s3://)."""
    if model == BLAZEPOSE:
        _check_runtime("blazepose")
        content, source = blazepose_bytes()
        return PoseModel("blazepose", BLAZEPOSE, content, hashlib.sha256(content).hexdigest(), source)
    kind = {".tflite": "blazepose", ".onnx": "onnx"}.get(Path(model.split("?")[0]).suffix.lower())
    if kind is None:
        raise UnknownModelError(f"--model {model}: use {' or '.join(MODEL_NAMES)}, or a path or URL of a "
                                ".tflite (BlazePose landmark model) or .onnx (SimCC top-down model) file")
    _check_runtime(kind)
    from stal_ray.core import storage

    fs, path = storage.filesystem(model, endpoint_url=endpoint_url, check=False)
    with storage.errors(model, endpoint_url):
        try:
            content = fs.cat_file(path)
        except FileNotFoundError:
            raise UnknownModelError(f"--model {model}: no such file") from None
    return check_model(PoseModel(kind, model, content, hashlib.sha256(content).hexdigest(), model))


def check_model(model: PoseModel) -> PoseModel:
    """`model` when it parses and, run once on a blank frame in this process (before Ray starts its
    actors), gives the (1, 14, 3) joints the decoder needs; UnknownModelError in one line otherwise."""
    try:
        joints = estimator(model)([Image.new("RGB", (64, 128))])
    except UnknownModelError as error:
        raise UnknownModelError(f"--model {model.name}: {error}") from None
    except Exception as error:  # a runtime's parse or shape error: any type, never the user's fault to read
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UnknownModelError(
            f"--model {model.name}: not a usable {model.kind} pose model ({type(error).__name__}: {first}); "
            "expected a BlazePose landmark .tflite or a SimCC .onnx with input (N, 3, H, W) and outputs "
            "simcc_x (N, K, W·r), simcc_y (N, K, H·r) of 17 (COCO), 26 (Halpe) or 133 keypoints") from None
    if np.shape(joints) != (1, 14, 3):
        raise UnknownModelError(f"--model {model.name}: gives joints of shape {np.shape(joints)} for one "
                                "frame, expected (1, 14, 3)")
    return model


# ---------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Letterbox:
    """A frame of (height, width) scaled by `scale` and centred in an input of (in_h, in_w)."""

    scale: float
    offset_x: float
    offset_y: float
    size: tuple[int, int]  # (width, height) of the scaled frame, whole pixels

    @classmethod
    def fit(cls, frame: tuple[int, int], model_input: tuple[int, int], margin: float = MARGIN) -> "Letterbox":
        (height, width), (in_h, in_w) = frame, model_input
        scale = min(in_h / (height * margin), in_w / (width * margin))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        return cls(scale, (in_w - size[0]) / 2, (in_h - size[1]) / 2, size)

    def apply(self, image: Image.Image, model_input: tuple[int, int]) -> np.ndarray:
        """(in_h, in_w, 3) uint8: the frame resized and pasted at the offset, black around it."""
        canvas = Image.new("RGB", (model_input[1], model_input[0]))
        canvas.paste(image.resize(self.size, Image.BILINEAR), (round(self.offset_x), round(self.offset_y)))
        return np.asarray(canvas)

    def to_frame(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) model-input pixels -> frame pixels."""
        offset = np.array([round(self.offset_x), round(self.offset_y)], np.float32)
        return ((xy - offset) / self.scale).astype(np.float32)


def decode(frame: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(frame))
    image.load()
    return image.convert("RGB")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -60, 60)))


# ---------------------------------------------------------------------------------------------- estimators


class BlazePose:
    """The BlazePose landmark model through ai-edge-litert: one frame per invoke, `threads` CPU threads."""

    def __init__(self, content: bytes, threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=content, num_threads=threads)
        self.interpreter.allocate_tensors()
        (inp,) = self.interpreter.get_input_details()
        self.input_index, self.input_size = inp["index"], tuple(int(v) for v in inp["shape"][1:3])
        outputs = {tuple(d["shape"]): d["index"] for d in self.interpreter.get_output_details()}
        landmarks = next((s for s in outputs if len(s) == 2 and s[1] % 5 == 0 and s[1] >= 165), None)
        if landmarks is None:
            raise UnknownModelError(f"not a BlazePose landmark model: outputs {sorted(outputs)}")
        self.landmarks_index, self.flag_index = outputs[landmarks], outputs.get((1, 1))

    def landmarks(self, image: Image.Image) -> np.ndarray:
        """(33, 3) x, y, confidence in the frame's pixels; confidence = visibility x presence x the
        model's person score."""
        box = Letterbox.fit((image.height, image.width), self.input_size)
        x = box.apply(image, self.input_size).astype(np.float32)[None] / 255.0
        self.interpreter.set_tensor(self.input_index, x)
        self.interpreter.invoke()
        raw = self.interpreter.get_tensor(self.landmarks_index).reshape(-1, 5)[:33]
        score = float(self.interpreter.get_tensor(self.flag_index).reshape(-1)[0]) \
            if self.flag_index is not None else 1.0
        confidence = _sigmoid(raw[:, 3]) * _sigmoid(raw[:, 4]) * score
        return np.concatenate([box.to_frame(raw[:, :2]), confidence[:, None]], axis=1)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """(N, 14, 3) joints in frame pixels."""
        if not images:
            return np.zeros((0, 14, 3), np.float32)
        return to_joints(np.stack([self.landmarks(image) for image in images]))


class PoseRuntimeError(RuntimeError):
    """The node's onnxruntime cannot run the model where it was asked to (a GPU), or two builds clash."""


ONNXRUNTIME_BUILDS = ("onnxruntime", "onnxruntime-gpu")  # the `pose` and `pose-gpu` extras' (pyproject.toml)


def check_onnxruntime(use_gpu: bool, installed: tuple[str, ...] | None = None,
                      providers: list[str] | None = None) -> None:
    """Refuse what would run silently wrong: both onnxruntime builds installed (each overwrites the other's
    files in the one `onnxruntime` module, so which runs is an accident), or a GPU asked for where the
    installed build has no CUDA provider (the model would run on one CPU thread instead)."""
    if installed is None:
        installed = tuple(name for name in ONNXRUNTIME_BUILDS if _installed(name))
    fix = ("pip uninstall -y onnxruntime onnxruntime-gpu, then pip install --constraint requirements.lock "
           "-e '.[pose-gpu]' on GPU nodes or '.[pose]' on CPU nodes")
    if len(installed) > 1:
        raise PoseRuntimeError(f"{os.uname().nodename}: both onnxruntime and onnxruntime-gpu are installed "
                               f"(the extras pose and pose-gpu together); {fix}")
    if not use_gpu:
        return
    if providers is None:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise PoseRuntimeError(f"{os.uname().nodename}: --num-gpus asks for a GPU, but its onnxruntime "
                               f"({', '.join(installed) or 'none'}) has no CUDA provider (it has "
                               f"{', '.join(providers)}): {fix}")


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


class OnnxSimcc:
    """A top-down SimCC model (RTMPose) through onnxruntime, frames in batches."""

    def __init__(self, content: bytes, threads: int = 1, use_gpu: bool = False):
        check_onnxruntime(use_gpu)
        import onnxruntime as ort

        if use_gpu and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels torch's CUDA build installed
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = ["CUDAExecutionProvider"] if use_gpu else []
        self.session = ort.InferenceSession(content, options, providers=[*providers, "CPUExecutionProvider"])
        if use_gpu and "CUDAExecutionProvider" not in self.session.get_providers():
            # onnxruntime drops a provider it cannot start (no driver, CUDA or cuDNN mismatch) with a log line
            raise PoseRuntimeError(f"{os.uname().nodename}: onnxruntime could not start its CUDA provider "
                                   "(see its log above: the CUDA or cuDNN libraries it needs); the model "
                                   "would run on the CPU. Check `nvidia-smi` and the torch and "
                                   "onnxruntime-gpu builds of requirements.lock")
        (inp,) = self.session.get_inputs()
        shape = inp.shape
        if len(shape) != 4 or not all(isinstance(v, int) for v in shape[2:]):
            raise UnknownModelError(f"ONNX pose model: input {inp.name} has shape {shape}; expected "
                                    "(N, 3, H, W) with fixed H and W")
        self.input_name, self.input_size = inp.name, (shape[2], shape[3])
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        outputs = self.session.get_outputs()
        if len(outputs) < 2 or any(len(out.shape) != 3 for out in outputs[:2]):
            raise UnknownModelError("ONNX pose model: expected two outputs, simcc_x (N, K, W·r) and "
                                    f"simcc_y (N, K, H·r), got {[out.shape for out in outputs]}")

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, 14, 3), np.float32)
        boxes = [Letterbox.fit((im.height, im.width), self.input_size) for im in images]
        x = np.stack([b.apply(im, self.input_size) for b, im in zip(boxes, images, strict=True)])
        x = ((x.astype(np.float32) - RTMPOSE_MEAN) / RTMPOSE_STD).transpose(0, 3, 1, 2)
        step = self.fixed_batch or len(images)
        outs = [self.session.run(None, {self.input_name: x[i:i + step]})[:2] for i in range(0, len(x), step)]
        simcc_x = np.concatenate([o[0] for o in outs])
        simcc_y = np.concatenate([o[1] for o in outs])
        ratio_x, ratio_y = simcc_x.shape[-1] / self.input_size[1], simcc_y.shape[-1] / self.input_size[0]
        xy = np.stack([simcc_x.argmax(-1) / ratio_x, simcc_y.argmax(-1) / ratio_y], axis=-1)
        confidence = np.minimum(simcc_x.max(-1), simcc_y.max(-1)).clip(0, 1)
        landmarks = np.stack([np.concatenate([b.to_frame(p), c[:, None]], axis=1)
                              for b, p, c in zip(boxes, xy.astype(np.float32), confidence, strict=True)])
        return to_joints(landmarks)


def estimator(model: PoseModel, threads: int = 1, use_gpu: bool = False):
    """The callable (list of PIL images -> (N, 14, 3) joints in frame pixels) for `model`."""
    if model.kind == "blazepose":
        return BlazePose(model.content, threads)
    return OnnxSimcc(model.content, threads, use_gpu)
