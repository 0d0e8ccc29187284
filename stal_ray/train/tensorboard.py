"""TensorBoard event files for every training run: a Ray Train callback that logs each report of rank 0
(loss terms, lr, clips/s, data wait, validation mAP) under <run folder>/tensorboard.

Train V2 writes no event files of its own (Tune writes them for its trials only), so this runs in Ray Train's
controller, which sees every report: no worker writes anything, and a replaced worker group keeps logging to
the same files. `tensorboard --logdir <storage path>/<run name>` shows them.
"""

import glob
import logging
import os
import struct
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from ray.train.v2.api.callback import UserCallback
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary

from stal_ray.core import storage

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # inside the run folder
# metric name prefix -> TensorBoard section; everything else numeric goes to "train/"
SECTIONS = {"loss_": "loss", "val_": "val"}
STEP = "iteration"  # the x axis: optimiser steps, the paper's iterations
NOT_LOGGED = frozenset({"iteration", "epoch"})


def scalar_tags(metrics: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value of one report's numeric metrics: loss_total -> loss/total, val_mAP ->
    val/mAP, lr -> train/lr, clips_per_s -> train/clips_per_s, data_wait_share -> train/data_wait_share."""
    tags = {}
    for name, value in metrics.items():
        if name in NOT_LOGGED or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        section = next((tag for prefix, tag in SECTIONS.items() if name.startswith(prefix)), None)
        tags[f"{section}/{name.removeprefix(f'{section}_')}" if section else f"train/{name}"] = float(value)
    return tags


class RunLog:
    """Writes one event per report into an event file under <run_dir>/tensorboard, synchronously
    (tensorboardX's SummaryWriter queues events for a thread, and its flush() does not wait for them). A local
    run folder is written directly; for s3:// (or any other fsspec URL) the file is written locally and copied
    up after every report."""

    def __init__(self, run_dir: str, endpoint_url: str | None = None):
        self.target = storage.join(run_dir, TENSORBOARD_DIR)
        self.endpoint_url = endpoint_url
        self.remote = "://" in run_dir and not run_dir.startswith("file://")
        self.local = tempfile.mkdtemp(prefix="stal-tensorboard-") if self.remote else self.target
        os.makedirs(self.local, exist_ok=True)
        self.writer = EventsWriter(os.path.join(self.local, "events"))

    def write(self, metrics: Mapping[str, Any]) -> None:
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalar_tags(metrics).items()]
        self.writer.write_event(Event(wall_time=time.time(), step=int(metrics.get(STEP, 0)),
                                      summary=Summary(value=values)))
        self.writer.flush()
        if self.remote:
            self._upload()

    def _upload(self) -> None:
        fs, path = storage.filesystem(self.target, endpoint_url=self.endpoint_url, check=False)
        with storage.errors(self.target, self.endpoint_url):
            for name in os.listdir(self.local):
                fs.put_file(os.path.join(self.local, name), f"{path}/{name}")


class TensorBoardCallback(UserCallback):
    """Ray Train callback: every report's rank-0 metrics (the only ones with validation) to a RunLog."""

    def __init__(self, run_dir: str, endpoint_url: str | None = None):
        self.run_dir, self.endpoint_url = run_dir, endpoint_url
        self._log: RunLog | None = None  # opened in the controller, where the callback runs

    def __getstate__(self) -> dict:
        return {"run_dir": self.run_dir, "endpoint_url": self.endpoint_url, "_log": None}

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics:
            return
        try:
            if self._log is None:
                self._log = RunLog(self.run_dir, self.endpoint_url)
            self._log.write(metrics[0])
        except OSError as error:  # StorageError included: lost logs must not stop a training run
            logger.warning("TensorBoard events of iteration %s not written to %s: %s",
                           metrics[0].get(STEP), self.run_dir, error)


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(iteration, value), ...] from the event files under a local <run_dir>/tensorboard, without
    TensorBoard itself (each file is TFRecord framed: length, its CRC, the Event message, its CRC)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, TENSORBOARD_DIR, "events.out.tfevents*"))):
        with open(path, "rb") as events:
            data = events.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
