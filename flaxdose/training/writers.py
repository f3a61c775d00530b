"""What a run logs: metrics.jsonl (one JSON record per logged step) and TensorBoard event files
(tensorboardX) in its workdir, which a resumed run first cuts back to its checkpoint (`truncate_logs`).
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import matplotlib.image
from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from flaxdose.io import atomic_file, atomic_write_text

log = logging.getLogger("flaxdose")


class NoMetricWriter:
    """What processes other than 0 of a multi-process run write: nothing (process 0 writes once)."""

    def write(self, step: int, **scalars):
        pass

    def image(self, tag: str, step: int, png: Path):
        pass

    def close(self):
        pass


METRICS_JSONL, TENSORBOARD = "metrics.jsonl", "tensorboard"


class MetricWriter:
    """metrics.jsonl (one JSON record per logged step) plus TensorBoard event files (tensorboardX) in the workdir.

    A run that starts at `start_step` (the restored checkpoint's step; 0 for a fresh run) first removes what an
    interrupted earlier attempt logged after that step (`truncate_logs`), from metrics.jsonl and the event files,
    and tells TensorBoard to purge it too (``purge_step``), so the logs read as one continuous run with every
    step once: the steps after the checkpoint are trained, and logged, again.
    """

    def __init__(self, workdir: Path, start_step: int = 0):
        removed = truncate_logs(workdir, start_step)
        if removed:
            log.info("removed %d records after step %d from %s and TensorBoard (logged by an interrupted run; "
                     "those steps are trained again)", removed, start_step, METRICS_JSONL)
        self._jsonl = open(workdir / METRICS_JSONL, "a")
        earlier = any((workdir / TENSORBOARD).glob("events.out.tfevents*"))  # a TensorBoard open on them purges too
        self._tb = SummaryWriter(str(workdir / TENSORBOARD), purge_step=start_step + 1 if earlier else None)

    def write(self, step: int, **scalars):
        self._jsonl.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))

    def image(self, tag: str, step: int, png: Path):
        """The PNG file `png` as TensorBoard image `tag` at `step`."""
        pixels = matplotlib.image.imread(str(png))  # float RGBA in [0, 1]
        self._tb.add_image(tag, pixels[..., :3], int(step), dataformats="HWC")
        self._tb.flush()

    def close(self):
        self._jsonl.close()
        self._tb.close()


def truncate_logs(workdir: Path, step: int) -> int:
    """Remove every record logged after `step` from a workdir's metrics.jsonl and TensorBoard event files
    (each rewritten atomically; a line or record cut short by a kill is dropped too); the number of
    metrics.jsonl records removed (TensorBoard holds the same steps, or fewer: it writes in batches)."""
    removed = 0
    path = workdir / METRICS_JSONL
    if path.is_file():
        lines = path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                record_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue
            if record_step <= step:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for line in kept))
            removed += len(lines) - len(kept)
    for events in sorted((workdir / TENSORBOARD).glob("events.out.tfevents*")):
        records = read_event_records(events)
        kept = [r for r in records if event_step(r) <= step]
        if len(kept) == len(records) and events.stat().st_size == sum(16 + len(r) for r in records):
            continue
        with atomic_file(events, "wb") as f:
            for record in kept:
                f.write(event_frame(record))
    return removed


def read_event_records(path: Path) -> list[bytes]:
    """The serialized `Event` protos of a TensorBoard event file (TFRecord framing: length, its CRC, data, its
    CRC); a record cut short at the end (a killed writer) is left out."""
    data, pos, records = path.read_bytes(), 0, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            break
        records.append(data[pos + 12:pos + 12 + length])
        pos = end
    return records


def event_frame(record: bytes) -> bytes:
    """`record` framed as a TFRecord, as tensorboardX writes it."""
    header = struct.pack("<Q", len(record))
    return header + struct.pack("<I", masked_crc32c(header)) + record + struct.pack("<I", masked_crc32c(record))


def event_step(record: bytes) -> int:
    return int(Event.FromString(record).step)
