"""The pose models of stal_ray/pose (the `pose` extra): BlazePose on a real photograph, an ONNX SimCC model,
the frame <-> model-input geometry and the landmark -> 14-joint mapping. No Ray."""

import io

import numpy as np
import pytest
from PIL import Image

from stal_ray.core.skeleton import JOINT_NAMES
from stal_ray.pose.joints import BLAZEPOSE_POINTS, COCO_POINTS, HEAD_TOP_EXTENT, NECK_SHARE, to_joints
from stal_ray.pose.models import Letterbox

J = {name: i for i, name in enumerate(JOINT_NAMES)}


def _landmarks(count: int, points: dict[str, int], rng) -> np.ndarray:
    landmarks = np.concatenate([rng.uniform(0, 100, (count, 2)), rng.uniform(0.2, 1, (count, 1))], axis=1)
    return landmarks.astype(np.float32)


@pytest.mark.parametrize("count, points", [(33, BLAZEPOSE_POINTS), (17, COCO_POINTS), (133, COCO_POINTS)])
def test_landmarks_map_to_the_papers_14_joints(count, points):
    landmarks = _landmarks(count, points, np.random.default_rng(count))
    joints = to_joints(landmarks)
    assert joints.shape == (14, 3)
    for side in ("left", "right"):
        for part in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle"):
            np.testing.assert_array_equal(joints[J[f"{side}_{part}"]], landmarks[points[f"{side}_{part}"]])
    left, right = landmarks[points["left_shoulder"]], landmarks[points["right_shoulder"]]
    shoulders = (left[:2] + right[:2]) / 2
    head = landmarks[[points[n] for n in ("nose", "left_eye", "right_eye", "left_ear", "right_ear")]]
    centre = head[:, :2].mean(0)
    neck = shoulders + NECK_SHARE * (centre - shoulders)
    np.testing.assert_allclose(joints[J["neck"], :2], neck, rtol=1e-5)
    assert joints[J["neck"], 2] == min(left[2], right[2])
    expected_top = centre + HEAD_TOP_EXTENT * (centre - shoulders)
    np.testing.assert_allclose(joints[J["head_top"], :2], expected_top, rtol=1e-5)


def test_halpe_models_keep_their_own_head_top_and_neck_and_unknown_layouts_are_refused():
    landmarks = _landmarks(26, COCO_POINTS, np.random.default_rng(1))
    joints = to_joints(landmarks[None])[0]  # batched input too
    np.testing.assert_array_equal(joints[J["head_top"]], landmarks[17])
    np.testing.assert_array_equal(joints[J["neck"]], landmarks[18])
    with pytest.raises(ValueError, match="12 keypoints.*BlazePose's 33 or a COCO layout"):
        to_joints(np.zeros((12, 3)))


@pytest.mark.parametrize("frame, model_input", [((256, 128), (256, 256)), ((64, 32), (256, 192)),
                                                 ((100, 300), (256, 192))])
def test_a_point_drawn_in_the_frame_is_found_back_through_the_letterbox(frame, model_input):
    box = Letterbox.fit(frame, model_input)
    height, width = frame
    image = np.zeros((height, width, 3), np.uint8)
    x, y = int(width * 0.3), int(height * 0.7)
    image[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = 255
    warped = box.apply(Image.fromarray(image), model_input)
    assert warped.shape == (*model_input, 3)
    ys, xs = np.nonzero(warped[..., 0] > 60)
    found = box.to_frame(np.array([xs.mean(), ys.mean()]))
    assert np.abs(found - [x + 0.5, y + 0.5]).max() < 1 / box.scale + 1


# ---------------------------------------------------------------------------------------------- BlazePose

# Where the astronaut's joints are in scikit-image's photograph (512 x 512, hand-marked; she is cut at the
# waist), in the pixels of the photo's left 400 columns; the person's right is image left.
ASTRONAUT = {"right_shoulder": (100, 240), "left_shoulder": (305, 240), "right_elbow": (70, 395),
             "left_elbow": (345, 380), "neck": (205, 205), "head_top": (225, 25)}
TOLERANCE = 40  # pixels, ~ a tenth of the crop's width: a shoulder in a pressure suit is not a point


@pytest.fixture(scope="module")
def blazepose():
    pytest.importorskip("ai_edge_litert", reason="the pose extra is not installed (pip install -e .[pose])")
    from stal_ray.pose.models import estimator, load_model

    return estimator(load_model())


def test_blazepose_finds_the_astronauts_shoulders_elbows_and_hips(blazepose):
    data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) is not installed")
    photo = Image.fromarray(data.astronaut()).crop((0, 0, 400, 512))
    # a MARS-like person crop of a whole body: the photo is her upper half, the legs are off the bottom
    frame = Image.new("RGB", (400, 1000))
    frame.paste(photo, (0, 0))
    joints = blazepose([frame])[0]
    for name, (x, y) in ASTRONAUT.items():
        got = joints[J[name]]
        assert np.hypot(got[0] - x, got[1] - y) < TOLERANCE, f"{name} at {got[:2]}, expected ({x}, {y})"
        assert got[2] > 0.5, f"{name}: confidence {got[2]}"
    for side in ("left", "right"):  # the hips: below the photo's bottom edge (the waist), at her sides
        x, y, _ = joints[J[f"{side}_hip"]]
        assert 480 < y < 620 and abs(x - ASTRONAUT[f"{side}_shoulder"][0]) < 2 * TOLERANCE
    # an empty frame has no person: low confidence everywhere
    assert blazepose([Image.new("RGB", (128, 256))])[0][:, 2].max() < 0.5


# ---------------------------------------------------------------------------------------------- ONNX


def _simcc_model(height: int, width: int, keypoints: int, ratio: float = 2.0) -> bytes:
    """A SimCC model of RTMPose's interface whose keypoint k peaks at input pixel (20 + 5k, 30 + 7k),
    exported with torch.onnx."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx", reason="onnx (test extra) is needed to export the test model")

    class Simcc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            bins_x, bins_y = int(width * ratio), int(height * ratio)
            x = torch.full((keypoints, bins_x), -4.0)
            y = torch.full((keypoints, bins_y), -4.0)
            for k in range(keypoints):
                x[k, int((20 + 5 * k) * ratio)] = 0.9
                y[k, int((30 + 7 * k) * ratio)] = 0.8
            self.register_buffer("x", x)
            self.register_buffer("y", y)

        def forward(self, image):
            zero = image.mean(dim=(1, 2, 3))[:, None, None] * 0
            return self.x[None] + zero, self.y[None] + zero

    buffer = io.BytesIO()
    torch.onnx.export(Simcc(), torch.zeros(1, 3, height, width), buffer, dynamo=False,
                      input_names=["input"], output_names=["simcc_x", "simcc_y"],
                      dynamic_axes={"input": {0: "batch"}, "simcc_x": {0: "batch"}, "simcc_y": {0: "batch"}})
    return buffer.getvalue()


def test_an_onnx_simcc_model_is_decoded_into_frame_pixels(tmp_path):
    pytest.importorskip("onnxruntime", reason="the pose extra is not installed (pip install -e .[pose])")
    from stal_ray.pose.models import estimator, load_model

    path = tmp_path / "rtmpose-like.onnx"
    path.write_bytes(_simcc_model(256, 192, 17))
    model = load_model(str(path))
    assert model.kind == "onnx"
    frames = [Image.new("RGB", (128, 256)), Image.new("RGB", (64, 128)), Image.new("RGB", (16, 32))]
    joints = estimator(model)(frames)
    assert joints.shape == (3, 14, 3)
    for frame, got in zip(frames, joints, strict=True):
        box = Letterbox.fit((frame.height, frame.width), (256, 192))
        for name, k in COCO_POINTS.items():
            if name in J:
                expected = box.to_frame(np.array([20 + 5 * k, 30 + 7 * k], np.float32))
                np.testing.assert_allclose(got[J[name], :2], expected, atol=1e-3)
                assert got[J[name], 2] == pytest.approx(0.8)


def test_a_model_that_is_neither_known_nor_a_model_file_is_refused(tmp_path):
    from stal_ray.pose.models import UnknownModelError, load_model

    with pytest.raises(UnknownModelError, match="--model rtmpose.*blazepose-full.*onnx"):
        load_model("rtmpose")
    with pytest.raises(UnknownModelError, match="no such file"):
        load_model(str(tmp_path / "missing.onnx"))


def test_without_the_pose_extra_the_job_says_which_extra_to_install(monkeypatch, tmp_path):
    import importlib.util

    from stal_ray.pose.models import UnknownModelError, load_model

    find_spec, missing = importlib.util.find_spec, ("ai_edge_litert", "onnxruntime")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else find_spec(name, *a))
    with pytest.raises(UnknownModelError, match=r"needs ai_edge_litert.*pip install -e \".\[pose\]\""):
        load_model()
    with pytest.raises(UnknownModelError, match="needs onnxruntime.*pose extra"):
        load_model(str(tmp_path / "model.onnx"))


def _one_output_model(height: int, width: int) -> bytes:
    """An ONNX model with one (N, K) output: not SimCC's two (N, K, bins)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx", reason="onnx (test extra) is needed to export the test model")

    class Flat(torch.nn.Module):
        def forward(self, image):
            return image.mean(dim=(2, 3)), image.mean(dim=(1, 3))

    buffer = io.BytesIO()
    torch.onnx.export(Flat(), torch.zeros(1, 3, height, width), buffer, dynamo=False,
                      input_names=["input"], output_names=["a", "b"])
    return buffer.getvalue()


@pytest.mark.parametrize("content, problem", [
    (lambda: _simcc_model(64, 48, 5), "5 keypoints"),  # too few joints for the decoder
    (lambda: _one_output_model(64, 48), "expected two outputs"),  # the shape decoding indexed wrongly
    (lambda: b"not an onnx file at all", "not a usable onnx pose model"),  # ActorDiedError once Ray ran
])
def test_a_pose_model_the_decoder_cannot_use_is_refused_in_one_line_before_ray(content, problem, tmp_path):
    pytest.importorskip("onnxruntime", reason="the pose extra is not installed (pip install -e .[pose])")
    from stal_ray.pose.models import UnknownModelError, load_model

    path = tmp_path / "model.onnx"
    path.write_bytes(content())
    with pytest.raises(UnknownModelError, match=problem) as refused:
        load_model(str(path))
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)


def test_a_gpu_run_on_the_cpu_build_of_onnxruntime_is_refused_not_run_on_one_thread(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="the pose extra is not installed (pip install .[pose])")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    from stal_ray.pose.models import PoseRuntimeError, estimator, load_model

    path = tmp_path / "rtmpose-like.onnx"
    path.write_bytes(_simcc_model(256, 192, 17))
    with pytest.raises(PoseRuntimeError, match="--num-gpus asks for a GPU.*no CUDA provider.*pose-gpu"):
        estimator(load_model(str(path)), use_gpu=True)


def test_both_onnxruntime_builds_on_one_node_are_refused():
    from stal_ray.pose.models import PoseRuntimeError, check_onnxruntime

    with pytest.raises(PoseRuntimeError, match="both onnxruntime and onnxruntime-gpu.*pip uninstall"):
        check_onnxruntime(False, installed=("onnxruntime", "onnxruntime-gpu"))
    check_onnxruntime(True, installed=("onnxruntime-gpu",), providers=["CUDAExecutionProvider",
                                                                      "CPUExecutionProvider"])
    check_onnxruntime(False, installed=("onnxruntime",))
