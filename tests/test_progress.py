"""Progress as log lines: done of total, percentage, rate and ETA, at most one line per interval; the training
loop's line carries its ETA."""

from stal_ray.core.progress import Progress, eta, format_duration
from stal_ray.train.reporting import Meter, progress_line
from stal_ray.train.settings import LoopState


def test_durations_read_as_hours_minutes_seconds():
    assert [format_duration(s) for s in (0, 42.4, 185, 3720, 90061)] == ["0s", "42s", "3m05s", "1h02m",
                                                                         "25h01m"]
    assert eta(0, 10, 5) == "?" and eta(25, 100, 10) == "30s"


def test_lines_give_share_rate_and_eta_at_most_once_per_interval():
    now, lines = [0.0], []
    progress = Progress("extraction", 1000, "frames", every_s=30, clock=lambda: now[0], out=lines.append)
    now[0] = 10
    progress.step(100)  # 10 s: too soon for a line
    now[0] = 40
    progress.step(300)
    now[0] = 50
    progress.step(100, note="shard 2 of 4, ", force=True)
    assert lines == ["extraction: 400 of 1,000 frames (40%), 10 frames/s, 40s elapsed, ETA 1m00s",
                     "extraction: shard 2 of 4, 500 of 1,000 frames (50%), 10 frames/s, 50s elapsed, ETA 50s"]
    now[0] = 100
    progress.step(500)
    progress.done()
    assert lines[-1] == "extraction: 1,000 of 1,000 frames (100%), 10 frames/s, 1m40s elapsed, ETA 0s"


def test_the_training_line_gives_iteration_share_clips_per_second_and_eta():
    class Scheduler:
        def get_last_lr(self):
            return [0.001]

    meter = Meter(steps=10, clips=640, step_time=20.0)  # 2 s per iteration
    line = progress_line(LoopState(step=1000, epoch=3), 4600, meter, Scheduler())
    assert line.startswith("iteration 1000/4600 (22%) epoch 3 lr=1.00e-03 ")
    assert "clips/s=32.0" in line and line.endswith("ETA 2h00m")
