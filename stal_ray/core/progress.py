"""Progress as plain log lines (done of total, percentage, rate, ETA), for jobs whose output is a log file
(`ray job submit`), where terminal progress bars are turned off."""

import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def eta(done: float, total: float, elapsed: float) -> str:
    """Time left at the rate so far, or '?' before anything is done."""
    if done <= 0 or elapsed <= 0:
        return "?"
    return format_duration(max(0.0, total - done) * elapsed / done)


class Progress:
    """Lines like `extraction: 12,345 of 100,000 frames (12%), 812 frames/s, 15s elapsed, ETA 1m47s`,
    printed at most every `every_s` seconds (and always by `step(..., force=True)` and at `done()`)."""

    def __init__(self, what: str, total: float, unit: str, *, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, out: Callable[[str], None] | None = None):
        self.what, self.total, self.unit, self.every_s, self.clock = what, total, unit, every_s, clock
        self.out = out or (lambda line: print(line, flush=True))
        self.count = 0.0
        self.start = self.last = clock()

    def step(self, amount: float, *, note: str = "", force: bool = False) -> None:
        self.count += amount
        now = self.clock()
        if force or now - self.last >= self.every_s:
            self.last = now
            self.out(self.line(note))

    def line(self, note: str = "") -> str:
        elapsed = self.clock() - self.start
        share = f" ({self.count / self.total:.0%})" if self.total else ""
        rate = self.count / elapsed if elapsed > 0 else 0.0
        return (f"{self.what}: {note}{self.count:,.0f} of {self.total:,.0f} {self.unit}{share}, "
                f"{rate:,.0f} {self.unit}/s, {format_duration(elapsed)} elapsed, "
                f"ETA {eta(self.count, self.total, elapsed)}")

    def done(self) -> None:
        self.out(self.line())
