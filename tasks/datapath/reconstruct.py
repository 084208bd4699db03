"""The private module's loop for one public stream: read each frame's payload, restore its
ROIs with U_d, encode; PSNR inside the ROIs against the source when it is at hand.

A plain function (no Ray), like the public module's loop in `tasks/datapath/anonymize.py`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.datapath import stego
from tasks.datapath.decode import iter_frames, probe
from tasks.datapath.deidentify import FaceSwapper
from tasks.datapath.keys import Key
from tasks.datapath.track import Roi
from tasks.datapath.video_loop import PipelineSettings, Timer, noise_source, progress_bar, timed_batches, writer_for


@dataclass
class RestoreRecord:
    """What the private module returns per public stream (the `audit` row's content)."""

    video_id: str | None
    public_path: str
    output_path: str
    frames: int = 0
    frames_with_payload: int = 0
    frames_payload_invalid: int = 0
    invalid_examples: list[str] = field(default_factory=list)
    rois_restored: int = 0
    psnr_roi: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def reconstruct_video(
    public: str | Path,
    output: str | Path,
    *,
    key: Key,
    swapper: FaceSwapper,
    settings: PipelineSettings,
    source: str | Path | None = None,
    progress: bool = True,
) -> RestoreRecord:
    """Private module for one public stream: read each frame's payload, restore its ROIs with U_d.

    Needs nothing but the stream and the key. A frame whose payload is missing or fails
    authentication is written unchanged and counted: it is never trusted. When the source
    video is at hand, PSNR inside the ROIs (frame resolution) is measured on the way.
    """
    timer = Timer()
    info = probe(public)
    record = RestoreRecord(None, str(public), str(output))
    bar = progress_bar(info.frame_count, f"reconstruct {Path(public).name}", progress)
    source_frames = iter_frames(source, batch_size=settings.batch_size) if source else None
    source_buffer: list[np.ndarray] = []
    squared_error, roi_pixels = 0.0, 0
    noise_for: Callable[[int], np.ndarray] | None = None
    start = time.perf_counter()
    with writer_for(output, info, public, settings) as writer:
        for first, batch in timed_batches(public, settings.batch_size, timer):
            rois: list[list[Roi]] = []
            with timer.stage("stego"):
                for i, frame in enumerate(batch):
                    try:
                        payload = stego.extract(frame, key, expected_frame_index=first + i)
                    except stego.PayloadError as err:
                        record.frames_payload_invalid += 1
                        if len(record.invalid_examples) < 5:
                            record.invalid_examples.append(f"frame {first + i}: {err}")
                        rois.append([])
                        continue
                    if record.video_id is None:
                        record.video_id = payload.video_id
                        noise_for = noise_source(key, payload.video_id)
                    elif payload.video_id != record.video_id:
                        raise stego.PayloadMismatch(
                            f"frame {first + i} belongs to video {payload.video_id}, not {record.video_id}")
                    record.frames_with_payload += 1
                    rois.append([Roi(first + i, r.seq_id, r.x, r.y, r.w, r.h, None, False)
                                 for r in payload.rois])
            if noise_for is not None:
                with timer.stage("deidentify"):
                    record.rois_restored += swapper.restore(batch, rois, noise_for)
            if source_frames is not None:
                with timer.stage("compare"):
                    while len(source_buffer) < len(batch):
                        _, src_batch = next(source_frames)
                        source_buffer.extend(src_batch)
                    for frame, frame_rois in zip(batch, rois):
                        original = source_buffer.pop(0)
                        for r in frame_rois:
                            a = frame[r.y : r.y + r.h, r.x : r.x + r.w].astype(np.float64)
                            b = original[r.y : r.y + r.h, r.x : r.x + r.w].astype(np.float64)
                            squared_error += float(((a - b) ** 2).sum())
                            roi_pixels += a.size
            with timer.stage("encode"):
                writer.write(batch)
            record.frames += len(batch)
            if bar is not None:
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    if roi_pixels:
        mse = squared_error / roi_pixels
        record.psnr_roi = float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)
    timer.seconds["total"] = time.perf_counter() - start
    record.seconds = timer.seconds
    return record
