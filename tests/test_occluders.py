"""Occluders of the synthetic data: moving ones come in bursts of frames and the keypoints' visibility is
what the image shows."""

import io

import numpy as np
import pytest
from PIL import Image

from stal_ray.data.synthetic import generator as synthetic
from stal_ray.data.synthetic.occluders import EVENT_FRAMES, Occluders, plan_events
from stal_ray.data.synthetic.render import Track, render

SIZE = (64, 32)


def frames(track, occlusion, occluders="moving"):
    jpegs, keypoints = render(track, 0, SIZE, occlusion, occluders=occluders)
    return np.stack([np.asarray(Image.open(io.BytesIO(j)), np.float64) for j in jpegs]), keypoints


def test_hidden_joints_are_those_the_occluder_covers():
    # moving occluders draw from their own generator: without occlusion the same frames show the bare person
    agree = total = 0
    for identity in range(1, 7):
        track = Track("train", identity, 1, 1, 16)
        occluded, keypoints = frames(track, 0.6)
        clean, clean_keypoints = frames(track, 0.0)
        assert (clean_keypoints[..., 2] > 0).all()
        assert np.array_equal(keypoints[..., :2], clean_keypoints[..., :2])
        changed = np.abs(occluded - clean).sum(-1) > 60  # (frames, H, W), beyond JPEG noise
        x = np.clip(np.rint(keypoints[..., 0]).astype(int), 0, SIZE[1] - 1)
        y = np.clip(np.rint(keypoints[..., 1]).astype(int), 0, SIZE[0] - 1)
        covered = changed[np.arange(len(changed))[:, None], y, x]  # (frames, 14)
        hidden = keypoints[..., 2] == 0
        agree += (covered == hidden).sum()
        total += hidden.size
        assert hidden.any()
    assert agree / total > 0.95  # an occluder of the person's own colour changes no pixel


def test_moving_occlusion_comes_in_bursts_of_about_the_asked_share():
    rng = np.random.default_rng(0)
    lengths, occluded, frames_total = [], 0, 0
    for _ in range(300):
        events = plan_events(rng, 20, 0.5, 0.5)
        lengths += [e.length for e in events]
        occluded += sum(e.length for e in events)
        frames_total += 20
        starts = [e.start for e in events]
        assert starts == sorted(starts)
        # one at a time
        assert all(a.start + a.length <= b.start for a, b in zip(events, events[1:], strict=False))
    assert min(lengths) >= 1 and max(lengths) <= EVENT_FRAMES[1]
    assert np.mean(lengths) > 2.5  # contiguous frames, not one frame here and there
    assert 0.35 < occluded / frames_total < 0.65
    kinds = {e.kind for e in plan_events(np.random.default_rng(1), 200, 0.5, 0.5)}
    assert kinds == {"post", "band", "passer"}


def test_no_occlusion_hides_nothing_and_unknown_style_is_refused():
    rng = np.random.default_rng(0)
    assert plan_events(rng, 30, 0.0, 0.5) == []
    with pytest.raises(ValueError, match="occluders"):
        Occluders("walls", 0.5, rng, rng, 10, 0.5)
    with pytest.raises(ValueError, match="occluders"):
        synthetic.write_synthetic_release("/nonexistent/never-written", occluders="walls")
