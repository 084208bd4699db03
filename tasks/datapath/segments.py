"""One long video across several workers: split at keyframes, processed at once, joined.

A video runs whole on one worker (`anonymize.anonymize_video`) unless it is long enough to
split and more than one worker is there (`plan_segments`). Then, for each segment:

1. `detect_segment` (a worker): decode the segment and run the detection schedule on it.
   Only the boxes come back: a few bytes per frame.
2. Here, in segment order: one `FaceTracker` over the whole video's detections, exactly as
   the unsplit loop would run it, so sequence ids are the video's and a face that crosses a
   segment border keeps its sequence, hence its noise channel, hence its virtual identity.
3. `render_segment` (a worker), as soon as the tracker has released every frame of the
   segment: decode it again, seal, de-identify, hide the ROIs, encode a video-only file; its
   sealed records numbered from `segment.index * INDEX_STRIDE`, its ROI rows to the catalog.
4. Here: the segments' files joined without re-encoding (`encode.join_segments`, each
   segment starts on a keyframe of its own), their sealed files merged (`seal.merge_sealed`),
   the source's audio and the sealed data attached.
5. `check_release_shared` (the workers, a share of the sampled frames each) on the joined file.

Decoding twice costs less than it saves: decoding is the cheapest stage. The workers get
the video's data key (drawn here) with their share of the work: they see the original pixels
anyway, and it travels inside Ray's task arguments, never to disk.

`call(method, *args)` runs one of the worker's methods (`ray_actor.FaceWorkerImpl`) on a
free worker and returns its result (blocking, thread-safe): the flow passes its pool's, so
this module does not need Ray. What is left at the borders: each segment's temporal
smoothing starts afresh (one frame of slightly less smoothing at each border), and each
segment's detection schedule opens with a full interval.
"""
from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from catalogs import CatalogStore
from tasks.datapath.anonymize import (
    SEALED_NAME,
    PublicSink,
    VideoRecord,
    check_release_shared,
    sequence_rows,
)
from tasks.datapath.decode import VideoInfo, keyframe_indices, probe
from tasks.datapath.deidentify import FaceSwapper
from tasks.datapath.detect import DetectionSchedule, FaceDetector
from tasks.datapath.encode import VideoWriter, attach, join_segments
from tasks.datapath.keys import AuthorityPublicKey, DataKey, WrappedKey, wrap_data_key
from tasks.datapath.seal import SealStats, merge_sealed, merge_stats
from tasks.datapath.track import FaceTracker, Roi
from tasks.datapath.video_loop import PipelineSettings, Timer, progress_bar, temporary_beside, timed_batches
from tasks.judges import SFaceJudge

# Segment k's sealed records are numbered from k * INDEX_STRIDE: no segment holds that many.
INDEX_STRIDE = 1 << 32
# At most this many frames per segment, however few workers: the tracker's output for one
# segment waits here for its render, so this bounds the memory a long video takes (10 min at 25 fps).
MAX_SEGMENT_FRAMES = 15_000

Call = Callable[..., Any]  # call(method name, *args) -> the method's result, on a free worker


@dataclass(frozen=True)
class Segment:
    index: int
    start: int  # first frame, a keyframe
    stop: int  # one past the last frame

    @property
    def frames(self) -> int:
        return self.stop - self.start


def plan_segments(keyframes: Sequence[int], frame_count: int, workers: int, min_frames: int,
                  max_frames: int = MAX_SEGMENT_FRAMES) -> list[Segment]:
    """Split frames 0..frame_count-1 at keyframes into segments of at least `min_frames`.

    As many segments as `workers` (or more, to keep each under `max_frames`), each border the
    keyframe nearest an even split that leaves both sides at least `min_frames` long. One
    segment (no split) when `min_frames` is 0, there is one worker, or the video is too short.
    """
    whole = [Segment(0, 0, frame_count)]
    if min_frames <= 0 or workers <= 1 or frame_count < 2 * min_frames:
        return whole
    parts = min(max(workers, math.ceil(frame_count / max_frames)), frame_count // min_frames)
    keys = sorted({int(k) for k in keyframes if 0 < k < frame_count})
    borders: list[int] = []
    for i in range(1, parts):
        target = round(i * frame_count / parts)
        previous = borders[-1] if borders else 0
        usable = [k for k in keys if k - previous >= min_frames and frame_count - k >= min_frames]
        if not usable:
            break
        borders.append(min(usable, key=lambda k: (abs(k - target), k)))
    edges = [0, *borders, frame_count]
    return [Segment(i, a, b) for i, (a, b) in enumerate(zip(edges, edges[1:]))]


def split_plan(source: str | Path, workers: int, settings: PipelineSettings) -> list[Segment]:
    """`plan_segments` for a video file (its keyframes read from the container's index)."""
    keyframes, frame_count = keyframe_indices(source)
    return plan_segments(keyframes, frame_count, workers, settings.segment_frames)


@dataclass
class SegmentDetections:
    """What `detect_segment` returns: per frame of the segment, boxes as `FaceDetector.detect`'s."""

    segment: Segment
    detections: list[np.ndarray]
    frames_detected: int
    seconds: dict[str, float]


@dataclass
class SegmentResult:
    """What `render_segment` returns."""

    segment: Segment
    frames_written: int
    faces: int
    frames_with_faces: int
    stats: SealStats
    seconds: dict[str, float] = field(default_factory=dict)


def _batches(source: str | Path, segment: Segment, batch_size: int, timer: Timer):
    return timed_batches(source, batch_size, timer, segment.start, segment.stop)


def detect_segment(source: str | Path, segment: Segment, detector: FaceDetector, settings: PipelineSettings,
                   progress: bool = True) -> SegmentDetections:
    """Step 1 (a worker): the detection schedule over one segment."""
    timer = Timer()
    schedule = DetectionSchedule(detector, every=settings.detect_every)
    bar = progress_bar(segment.frames, f"detect {Path(source).name} [{segment.index + 1}]", progress,
                       settings.progress_style)
    detections: list[np.ndarray] = []
    for _, batch in _batches(source, segment, settings.batch_size, timer):
        with timer.stage("detect"):
            detections.extend(schedule.detect(batch))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    if len(detections) != segment.frames:
        raise ValueError(f"{source}: segment {segment.index} gave {len(detections)} frames, "
                         f"expected {segment.frames} ({segment.start}..{segment.stop - 1})")
    return SegmentDetections(segment, detections, schedule.frames_detected, timer.seconds)


def render_segment(source: str | Path, segment: Segment, rois: list[tuple[int, list[Roi]]], video_part: str | Path,
                   sealed_part: str | Path, *, info: VideoInfo, video_id: str, data_key: DataKey,
                   envelope: Sequence[WrappedKey], swapper: FaceSwapper, settings: PipelineSettings, run_id: str,
                   catalog: CatalogStore | None, progress: bool = True) -> SegmentResult:
    """Step 3 (a worker): one segment's public frames, video only, and its sealed file. `info` is
    the driver's probe of the source: probing again would decode every keyframe of the file per segment."""
    timer = Timer()
    if [f for f, _ in rois] != list(range(segment.start, segment.stop)):
        raise ValueError(f"segment {segment.index}: ROIs for frames {segment.start}..{segment.stop - 1} expected")
    roi_lists = iter(rois)
    bar = progress_bar(segment.frames, f"anonymize {Path(source).name} [{segment.index + 1}]", progress,
                       settings.progress_style)
    writer = VideoWriter(video_part, info.width, info.height, info.fps_rational, codec=settings.public_format)
    with PublicSink(writer, Path(sealed_part), video_id, data_key, envelope, settings, swapper, timer, run_id,
                    catalog, bar, index_base=segment.index * INDEX_STRIDE,
                    roi_part_prefix=f"s{segment.index:05d}-") as sink:
        for first, batch in _batches(source, segment, settings.batch_size, timer):
            for i in range(len(batch)):
                sink.pending[first + i] = batch[i]
            sink.emit([next(roi_lists) for _ in range(len(batch))])
    assert sink.stats is not None
    return SegmentResult(segment, sink.frames_written, sink.faces, sink.frames_with_faces, sink.stats,
                         timer.seconds)


def _add_seconds(total: dict[str, float], part: dict[str, float]) -> None:
    for stage, seconds in part.items():
        total[stage] = total.get(stage, 0.0) + seconds


def anonymize_split(source: str | Path, output: str | Path, segments: Sequence[Segment], call: Call, workers: int, *,
                    recipients: Sequence[AuthorityPublicKey], video_id: str, settings: PipelineSettings,
                    run_id: str, catalog: CatalogStore | None) -> VideoRecord:
    """The public module for one video, split into `segments` (from `plan_segments`) run on the
    workers through `call`; the same record, files and catalog rows as `anonymize_video`.

    The record's per-stage seconds are summed over the workers (CPU-side time); `total` is wall time,
    the release check counted as its longest share (`check_release_shared`).
    """
    start = time.perf_counter()
    info = probe(source)
    record = VideoRecord(video_id, str(source), str(output), info.width, info.height,
                         info.frame_count, info.fps, info.fps_rational, info.audio_streams,
                         public_format=settings.public_format, seal=settings.seal,
                         recipients=[r.fingerprint for r in recipients])
    data_key = DataKey.generate()
    envelope = wrap_data_key(data_key, recipients, video_id)
    tracker = FaceTracker(info.width, info.height, max_gap=settings.max_gap, roi_scale=settings.roi_scale)
    shape = replace(info, frame_times=None)  # what a render needs; the frame times are the join's
    seconds: dict[str, float] = {}
    with ExitStack() as files, ThreadPoolExecutor(max_workers=2 * workers + 1,
                                                  thread_name_prefix="segment") as pool:
        try:
            parts = [(files.enter_context(temporary_beside(output, f".seg{s.index:05d}.mkv")),
                      files.enter_context(temporary_beside(output, f".seg{s.index:05d}.uuseal"))) for s in segments]
            window = 2 * workers  # detections asked for ahead of the tracker: bounds what waits here
            detecting: deque[Future] = deque(pool.submit(call, "detect_segment", str(source), s)
                                             for s in segments[:window])
            renders: list[Future] = []
            waiting: list[tuple[int, list[Roi]]] = []  # released by the tracker, not yet sent to a render

            def release(ready: list[tuple[int, list[Roi]]]) -> None:
                waiting.extend(ready)
                while len(renders) < len(segments) and waiting and waiting[-1][0] >= segments[len(renders)].stop - 1:
                    segment = segments[len(renders)]
                    cut = bisect.bisect_left([f for f, _ in waiting], segment.stop)
                    mine, waiting[:] = waiting[:cut], waiting[cut:]
                    renders.append(pool.submit(call, "render_segment", str(source), segment, mine,
                                               str(parts[segment.index][0]), str(parts[segment.index][1]),
                                               shape, video_id, data_key, envelope, run_id,
                                               None if catalog is None else str(catalog.root)))

            for k, segment in enumerate(segments):
                found: SegmentDetections = detecting.popleft().result()
                if k + window < len(segments):
                    detecting.append(pool.submit(call, "detect_segment", str(source), segments[k + window]))
                record.frames_detected += found.frames_detected
                _add_seconds(seconds, found.seconds)
                for i, dets in enumerate(found.detections):
                    tracker.update(segment.start + i, dets)
                release(tracker.pop_ready())
            release(tracker.finish())
            results: list[SegmentResult] = [f.result() for f in renders]
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # no worker may still write when the parts go
            raise
        record.frame_count = 0  # from here on: what was written
        for result in results:
            record.frame_count += result.frames_written
            record.faces += result.faces
            record.frames_with_faces += result.frames_with_faces
            _add_seconds(seconds, result.seconds)
        if record.frame_count != info.frame_count:
            raise ValueError(f"{source}: the segments wrote {record.frame_count} frames, the source has "
                             f"{info.frame_count}")
        attach_start = time.perf_counter()
        with temporary_beside(output, ".mkv") as joined, temporary_beside(output, ".uuseal") as sealed:
            packets = join_segments([v for v, _ in parts], [s.start for s in segments], joined, info.fps,
                                    info.frame_times)
            if packets != info.frame_count:
                raise ValueError(f"{source}: the joined stream holds {packets} frames, not {info.frame_count}")
            stats = merge_stats([r.stats for r in results])
            stats.bytes = merge_sealed([s for _, s in parts], sealed, data_key)
            attach(joined, sealed, output, SEALED_NAME, audio_from=source if info.audio_streams else None)
        seconds["attach"] = time.perf_counter() - attach_start
    record.public_bytes, record.sealed_bytes = Path(output).stat().st_size, stats.bytes
    if settings.seal == "high" and stats.crop_chunks:
        record.seal_psnr_db, record.seal_min_psnr_db = stats.psnr_db, stats.min_psnr_db
    sequences = tracker.sequences
    record.sequences = len(sequences)
    if catalog is not None:
        catalog.write_part("sequences", run_id, video_id, sequence_rows(run_id, video_id, sequences))
    seconds["total"] = time.perf_counter() - start
    record.seconds = seconds
    check_release_shared(call, workers, output, source, record, data_key, settings)
    return record
