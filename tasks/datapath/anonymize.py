"""The public module's loop for one video: decode → detect → track → de-identify → hide the
ROIs → encode, in bounded batches, then the release check on the written stream.

A plain function (no Ray): the actor in `tasks/datapath/ray_actor.py` calls it, and so do
the evaluation and the benchmarks, which run a video without a cluster.
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catalogs import CatalogStore
from tasks.datapath import stego
from tasks.datapath.decode import probe
from tasks.datapath.deidentify import FaceSwapper
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import Key
from tasks.datapath.release_check import check_public_stream
from tasks.datapath.track import FaceTracker, Roi
from tasks.datapath.video_loop import PipelineSettings, Timer, noise_source, progress_bar, timed_batches, writer_for
from tasks.judges import SFaceJudge

ROI_ROWS_PER_PART = 20_000


@dataclass
class VideoRecord:
    """What a worker returns per video: the `videos` catalog row minus run bookkeeping."""

    video_id: str
    source_path: str
    output_path: str
    width: int = 0
    height: int = 0
    frame_count: int = 0
    fps: float = 0.0
    fps_rational: str = ""
    audio_streams: int = 0
    faces: int = 0
    sequences: int = 0
    frames_with_faces: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # The release check's verdict on the written public stream (tasks/datapath/release_check.py).
    frames_checked: int = 0
    needs_review: bool = False
    review_frames: list[int] = field(default_factory=list)
    review_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _roi_rows(run_id: str, video_id: str, rois: Iterable[Roi]) -> list[dict[str, Any]]:
    return [
        dict(run_id=run_id, video_id=video_id, frame_index=r.frame_index, seq_id=r.seq_id,
             x=r.x, y=r.y, w=r.w, h=r.h, score=r.score, interpolated=r.interpolated)
        for r in rois
    ]


def anonymize_video(
    source: str | Path,
    output: str | Path,
    *,
    key: Key,
    video_id: str,
    detector: FaceDetector,
    swapper: FaceSwapper,
    settings: PipelineSettings,
    run_id: str,
    catalog: CatalogStore | None = None,
    progress: bool = True,
    judge: SFaceJudge | None = None,
) -> VideoRecord:
    """Public module for one video: detect, track, de-identify, hide the ROIs, encode losslessly,
    then run the release check on the written stream.

    ROI and sequence rows go straight to the catalog (they grow with the video, so they do
    not travel back to the caller); the returned record is small. `judge` (SFace with its
    YuNet) is loaded here when not given; a worker passes its own to load it once.
    """
    timer = Timer()
    info = probe(source)
    record = VideoRecord(video_id, str(source), str(output), info.width, info.height,
                         info.frame_count, info.fps, info.fps_rational, info.audio_streams)
    tracker = FaceTracker(info.width, info.height, max_gap=settings.max_gap, roi_scale=settings.roi_scale)
    noise_for = noise_source(key, video_id)
    pending: dict[int, np.ndarray] = {}  # decoded frames waiting until their ROIs are final
    roi_rows: list[dict[str, Any]] = []
    roi_parts = 0

    def flush_rois(final: bool) -> None:
        """ROI rows grow with the video: write them in chunks so memory does not."""
        nonlocal roi_rows, roi_parts
        if not final and len(roi_rows) < ROI_ROWS_PER_PART:
            return
        if catalog is not None and roi_rows:
            catalog.write_part("rois", run_id, f"{video_id}-{roi_parts:05d}", roi_rows)
            roi_parts += 1
        roi_rows = []

    bar = progress_bar(info.frame_count, f"anonymize {Path(source).name}", progress)

    def emit(ready: list[tuple[int, list[Roi]]]) -> None:
        if not ready:
            return
        frames = [pending.pop(f) for f, _ in ready]
        rois = [r for _, r in ready]
        with timer.stage("deidentify"):
            swapper.anonymize(frames, rois, noise_for)
        with timer.stage("stego"):
            public = [
                stego.embed(frame, stego.FramePayload(f, video_id, key.key_id, tuple(
                    stego.RoiRecord(r.x, r.y, r.w, r.h, r.seq_id) for r in frame_rois)), key)
                for frame, (f, frame_rois) in zip(frames, ready)
            ]
        with timer.stage("encode"):
            writer.write(np.stack(public))
        for _, frame_rois in ready:
            record.faces += len(frame_rois)
            record.frames_with_faces += bool(frame_rois)
            roi_rows.extend(_roi_rows(run_id, video_id, frame_rois))
        flush_rois(final=False)
        if bar is not None:
            bar.update(len(ready))

    start = time.perf_counter()
    with writer_for(output, info, source, settings) as writer:
        for first, batch in timed_batches(source, settings.batch_size, timer):
            with timer.stage("detect"):
                detections = detector.detect(batch)
            for i, dets in enumerate(detections):
                tracker.update(first + i, dets)
                pending[first + i] = batch[i]
            emit(tracker.pop_ready())
        emit(tracker.finish())
        record.frame_count = writer.frames_written
    if bar is not None:
        bar.close()
    if record.frame_count == 0:
        raise ValueError(f"{source}: no frames could be decoded")
    sequences = tracker.sequences
    record.sequences = len(sequences)
    if catalog is not None:
        flush_rois(final=True)
        catalog.write_part("sequences", run_id, video_id, [
            dict(run_id=run_id, video_id=video_id, seq_id=s.seq_id, first_frame=s.first_frame,
                 last_frame=s.last_frame, n_frames=s.n_frames, n_detected=s.n_detected,
                 n_interpolated=s.n_interpolated,
                 mean_score=s.mean_score)
            for s in sequences])
    with timer.stage("release_check"):
        # Seeded by the video id: reproducible, yet the sampled offset differs between videos.
        verdict = check_public_stream(output, source, key, detector, judge=judge,
                                      max_frames=settings.release_check_frames, seed=int(video_id[:15], 16))
    record.frames_checked = len(verdict.checked_frames)
    record.needs_review = verdict.needs_review
    record.review_frames = verdict.review_frames
    record.review_reason = verdict.reason or None
    timer.seconds["total"] = time.perf_counter() - start
    record.seconds = timer.seconds
    return record
