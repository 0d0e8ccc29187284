"""Decoded frames of stream rows -> the rows' clips and keypoints: the one step that both places decoding can
happen share (data.decode_at: the stream's decoding tasks, data.pipeline; or the consumer, data.consumer),
so the two give the same arrays to the byte.

Keypoints are stored in the stored frame's pixels: they are scaled to the decoded frame's size, which only
decoding tells (the stored frame's size comes with it), and a frame without keypoints gets confidence 0, so
it cannot pull the pose head.
"""

import numpy as np

from stal_ray.data.prepared.manifest import JOINTS


def clip_rows(images: np.ndarray, ok: np.ndarray, sizes: np.ndarray, keypoints: np.ndarray, *, rows: int,
              clip_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """images (rows·F, H, W, 3) decoded (any array type with reshape: numpy or a torch tensor), ok (rows·F,),
    sizes (rows·F, 2) stored (height, width), keypoints (rows, F·42) or (rows·F, 14, 3) in stored pixels,
    NaN where absent -> clips (rows, *clip_shape, H, W, 3), keypoints (rows, *clip_shape, 14, 3) in the
    decoded frame's pixels, has_keypoints (rows,), corrupt_frames (rows,)."""
    height, width = images.shape[1:3]
    keypoints = np.array(keypoints, dtype=np.float32).reshape(-1, JOINTS, 3)
    scale = np.where(sizes > 0, np.array([height, width]) / np.maximum(sizes, 1), 0.0)
    keypoints[..., 0] *= scale[:, None, 1]
    keypoints[..., 1] *= scale[:, None, 0]
    has_keypoints = ~np.isnan(keypoints).reshape(rows, -1).all(axis=1)
    keypoints = np.nan_to_num(keypoints, nan=0.0)
    return {"clips": images.reshape(rows, *clip_shape, height, width, 3),
            "keypoints": keypoints.reshape(rows, *clip_shape, JOINTS, 3),
            "has_keypoints": has_keypoints,
            "corrupt_frames": (~np.asarray(ok)).reshape(rows, -1).sum(axis=1)}
