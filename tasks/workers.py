"""Workers: the per-video loops of the public and the private module, and the Ray actor that runs them.

`anonymize_video` and `reconstruct_video` are plain functions (testable without Ray): they
stream one video through decode → … → encode in bounded batches and return a small
record. `FaceWorker` is the long-lived Ray actor that holds the models once and calls
them; frames never leave the actor, only records do.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import ray

from catalogs import CatalogStore
from tasks import stego
from tasks.decode import VideoInfo, iter_frames, probe
from tasks.deidentify import FaceSwapper, load_face_pair
from tasks.detect import FaceDetector
from tasks.encode import LosslessVideoWriter
from tasks.judges import SFaceJudge
from tasks.keys import Key, keyed_noise
from tasks.release_check import check_public_stream
from tasks.track import FaceTracker, Roi


ROI_ROWS_PER_PART = 20_000


@dataclass(frozen=True)
class PipelineSettings:
    """Everything a worker needs to know, passed once when the actor starts."""

    model: str = "uunet"
    weights: str | None = None
    codec: str = "x264rgb"
    batch_size: int = 16
    min_face_size: int = 20
    max_gap: int = 8
    roi_scale: float = 1.3
    device: str = "auto"  # "auto": CUDA when this worker was given a GPU, CPU otherwise
    torch_threads: int = 0  # 0: leave torch's default
    release_check_frames: int = 48  # at most this many public frames re-checked per video


class Timer:
    """Wall time per stage, summed over a video."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


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
    # The release check's verdict on the written public stream (tasks/release_check.py).
    frames_checked: int = 0
    needs_review: bool = False
    review_frames: list[int] = field(default_factory=list)
    review_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _noise_source(key: Key, video_id: str) -> Callable[[int], np.ndarray]:
    cache: dict[int, np.ndarray] = {}

    def noise_for(seq_id: int) -> np.ndarray:
        if seq_id not in cache:
            cache[seq_id] = keyed_noise(key, video_id, seq_id)
        return cache[seq_id]

    return noise_for


def _progress(total: int, desc: str, enabled: bool):
    """A progress bar that renders on the driver when called inside a Ray actor."""
    if not enabled:
        return None
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            from ray.experimental.tqdm_ray import tqdm as ray_tqdm

            return ray_tqdm(total=total, desc=desc, unit="frame")
    except ImportError:
        pass
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False)


def _timed_batches(path: str | Path, batch_size: int, timer: Timer) -> Iterator[tuple[int, np.ndarray]]:
    """Decoded batches, with the decoding time charged to the "decode" stage."""
    frames = iter_frames(path, batch_size=batch_size)
    while True:
        with timer.stage("decode"):
            item = next(frames, None)
        if item is None:
            return
        yield item


def _writer_for(output: str | Path, info: VideoInfo, audio_from: str | Path,
                settings: PipelineSettings) -> LosslessVideoWriter:
    """A lossless writer with the input's size and rate, copying its audio streams if it has any."""
    return LosslessVideoWriter(output, info.width, info.height, info.fps_rational,
                               audio_source=str(audio_from) if info.audio_streams else None,
                               codec=settings.codec)


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
    noise_for = _noise_source(key, video_id)
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

    bar = _progress(info.frame_count, f"anonymize {Path(source).name}", progress)

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
    with _writer_for(output, info, source, settings) as writer:
        for first, batch in _timed_batches(source, settings.batch_size, timer):
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
    bar = _progress(info.frame_count, f"reconstruct {Path(public).name}", progress)
    source_frames = iter_frames(source, batch_size=settings.batch_size) if source else None
    source_buffer: list[np.ndarray] = []
    squared_error, roi_pixels = 0.0, 0
    noise_for: Callable[[int], np.ndarray] | None = None
    start = time.perf_counter()
    with _writer_for(output, info, public, settings) as writer:
        for first, batch in _timed_batches(public, settings.batch_size, timer):
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
                        noise_for = _noise_source(key, payload.video_id)
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


def _pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class FaceWorkerImpl:
    """Holds the detector and the face pair once; the Ray actor below is this class, remote."""

    def __init__(self, settings: PipelineSettings) -> None:
        import torch

        self.settings = settings
        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        self.device = _pick_device(settings.device)
        self.pair = load_face_pair(settings.model, settings.weights, self.device)
        self.swapper = FaceSwapper(self.pair)
        self._detector: FaceDetector | None = None
        self._judge: SFaceJudge | None = None

    @property
    def detector(self) -> FaceDetector:
        # The private module never detects: load MTCNN only when the public module needs it.
        if self._detector is None:
            self._detector = FaceDetector(device=self.device, min_face_size=self.settings.min_face_size,
                                          batch_size=self.settings.batch_size)
        return self._detector

    @property
    def judge(self) -> SFaceJudge:
        # Only the public module's release check needs SFace and YuNet.
        if self._judge is None:
            self._judge = SFaceJudge()
        return self._judge

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "model": self.pair.name, "weights": self.pair.source, "pid": os.getpid()}

    def anonymize(self, source: str, output: str, key: Key, video_id: str, run_id: str,
                  catalog_root: str | None) -> dict[str, Any]:
        catalog = CatalogStore(catalog_root) if catalog_root else None
        record = anonymize_video(source, output, key=key, video_id=video_id, detector=self.detector,
                                 swapper=self.swapper, settings=self.settings, run_id=run_id,
                                 catalog=catalog, judge=self.judge)
        return record.as_dict()

    def reconstruct(self, public: str, output: str, key: Key, source: str | None = None) -> dict[str, Any]:
        record = reconstruct_video(public, output, key=key, swapper=self.swapper,
                                   settings=self.settings, source=source)
        return record.as_dict()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


# The Ray actor: one per pool slot, alive for the whole flow run, models loaded once.
FaceWorker = ray.remote(FaceWorkerImpl)
