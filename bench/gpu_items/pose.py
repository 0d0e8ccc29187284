"""Item `pose` of bench/gpu_check.py: pose estimation on onnxruntime's CUDA provider against its CPU provider.

The model is --pose-model (an ONNX SimCC export such as RTMPose's), else a stand-in exported here with the
same interface and about RTMPose-m's cost (a ResNet-18 trunk, untrained: ~1.8 GFLOP a frame at 256x192,
RTMPose-m 1.9), so the runtime path and its speed are measured, not its joints. The same MARS-size
frames (bench/mars_frames.py) go through pose/models.py's estimator (letterbox, the model, SimCC decoding,
the 14 joints) in batches of BATCH, on the CPU with one thread (as jobs/estimate_pose.py's actors run) and on
the GPU. Without onnxruntime's CUDA provider (the onnxruntime-gpu build) the GPU row says so.
"""

import io
import time

import numpy as np
import torch

from bench.gpu_items.common import ItemResult, Profile, verdict

BATCH = 64
WARM_UP = 8  # frames
COCO_KEYPOINTS = 17


class BasicBlock(torch.nn.Module):
    """ResNet's basic block: two 3x3 convolutions and the shortcut (a 1x1 projection if the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int):
        super().__init__()
        conv = torch.nn.Conv2d
        self.body = torch.nn.Sequential(
            conv(inputs, outputs, 3, stride, 1, bias=False), torch.nn.BatchNorm2d(outputs), torch.nn.ReLU(),
            conv(outputs, outputs, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(outputs))
        self.shortcut = torch.nn.Identity() if stride == 1 and inputs == outputs else torch.nn.Sequential(
            conv(inputs, outputs, 1, stride, bias=False), torch.nn.BatchNorm2d(outputs))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet18_trunk() -> torch.nn.Sequential:
    """ResNet-18 without its pooling and classifier: (N, 3, H, W) -> (N, 512, H/32, W/32)."""
    layers = [torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
              torch.nn.MaxPool2d(3, 2, 1)]
    channels = 64
    for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(channels, outputs, stride), BasicBlock(outputs, outputs, 1)]
        channels = outputs
    return torch.nn.Sequential(*layers)


def stand_in(height: int, width: int) -> bytes:
    """An untrained SimCC model of RTMPose's interface: input (N, 3, H, W), outputs simcc_x (N, 17, 2W) and
    simcc_y (N, 17, 2H)."""

    class Simcc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = resnet18_trunk()
            self.keypoints = torch.nn.Conv2d(512, COCO_KEYPOINTS, 1)
            cells = -(-height // 32) * -(-width // 32)
            self.x, self.y = torch.nn.Linear(cells, 2 * width), torch.nn.Linear(cells, 2 * height)

        def forward(self, image):
            k = self.keypoints(self.trunk(image)).flatten(2)  # (N, 17, cells)
            return self.x(k), self.y(k)

    buffer = io.BytesIO()
    torch.onnx.export(Simcc().eval(), torch.zeros(1, 3, height, width), buffer, dynamo=False,
                      input_names=["input"], output_names=["simcc_x", "simcc_y"],
                      dynamic_axes={"input": {0: "batch"}, "simcc_x": {0: "batch"}, "simcc_y": {0: "batch"}})
    return buffer.getvalue()


def timed(run, images: list) -> tuple[float, np.ndarray]:
    run(images[:WARM_UP])  # session start, the provider's first kernels
    start = time.perf_counter()
    joints = np.concatenate([run(images[i:i + BATCH]) for i in range(0, len(images), BATCH)])
    return time.perf_counter() - start, joints


def run(result: ItemResult, profile: Profile, args) -> None:
    import hashlib

    import onnxruntime

    from bench.mars_frames import frame_pool
    from stal_ray.pose.models import PoseModel, decode, estimator, load_model

    if args.pose_model:
        model = load_model(args.pose_model)
    else:
        with result.phase("stand-in export"):
            content = stand_in(*profile.pose_input)
        model = PoseModel("onnx", "stand-in (ResNet-18 trunk, untrained)", content,
                          hashlib.sha256(content).hexdigest(), "bench/gpu_items/pose.py")
    result.set(model=model.name)
    images = [decode(frame) for frame in frame_pool(profile.pose_frames)]
    cpu_run = estimator(model, threads=1)
    with result.phase("CPU provider"):
        seconds, on_cpu = timed(cpu_run, images)
    result.row(name=f"{model.name}, CPU provider, 1 thread", frames=len(images), seconds=seconds,
               frames_per_s=len(images) / seconds)
    if args.device != "cuda":
        result.check("pose on the GPU runtime", "-", "-", "n/a on cpu")
        return
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        result.check("pose on the GPU runtime", "-", "-", "skipped: onnxruntime has no CUDAExecutionProvider "
                     f"(providers: {', '.join(available)}); pip install onnxruntime-gpu")
        return
    gpu_run = estimator(model, use_gpu=True)
    used = gpu_run.session.get_providers()[0]
    seconds_gpu, on_gpu = timed(gpu_run, images)
    result.row(name=f"{model.name}, {used}", frames=len(images), seconds=seconds_gpu,
               frames_per_s=len(images) / seconds_gpu,
               max_joint_px_difference=float(np.abs(on_gpu[..., :2] - on_cpu[..., :2]).max()))
    result.check(f"pose on the GPU runtime ({seconds / seconds_gpu:.1f}x the CPU's frames/s)", used,
                 "runs on CUDA", verdict(used == "CUDAExecutionProvider"))
