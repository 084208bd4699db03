"""The public module's loop for one video: decode → detect → track → seal the originals →
de-identify → hide the ROIs → encode, in bounded batches; then the sealed data is attached
and the release check reads the written file back.

A plain function (no Ray): the actor in `tasks/datapath/ray_actor.py` calls it, and so do
the evaluation and the benchmarks, which run a video without a cluster. It is given the
authorities' public keys only, and the video's data key is drawn here unless its caller
draws it: the flow does, to share the release check out among the workers that are free
(`check_release_shared`), and never writes it anywhere.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from catalogs import CatalogStore
from tasks.datapath import stego
from tasks.datapath.decode import probe, read_attachment
from tasks.datapath.deidentify import SMOOTHING_WEIGHT, FaceSwapper, TemporalSmoother
from tasks.datapath.detect import DetectionSchedule, FaceDetector
from tasks.datapath.encode import ATTACHMENT_MIMETYPE, LOSSLESS_CODECS, VideoWriter, attach
from tasks.datapath.keys import AuthorityPublicKey, DataKey, WrappedKey, envelope_to_bytes, wrap_data_key
from tasks.datapath.release_check import (
    ReleaseVerdict,
    check_public_stream,
    listed_rois,
    payload_rois,
    sample_frames,
)
from tasks.datapath.seal import SealedVideo, SealStats, SealWriter
from tasks.datapath.track import FaceTracker, Roi, SequenceStats
from tasks.datapath.video_loop import (
    PipelineSettings,
    Timer,
    bound_heap_fragmentation,
    noise_source,
    progress_bar,
    temporary_beside,
    timed_batches,
    writer_for,
)
from tasks.judges import SFaceJudge

SEALED_NAME = "sealed.uuseal"  # the attachment's file name inside the public file

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
    frames_detected: int = 0  # frames the detector ran on (the schedule skips agreeing stretches)
    public_format: str = ""
    seal: str = ""
    recipients: list[str] = field(default_factory=list)  # fingerprints of the public keys sealed to
    public_bytes: int = 0  # the whole public file, sealed data included
    sealed_bytes: int = 0
    seal_psnr_db: float | None = None  # `high`: ROI PSNR pooled over the video, when sealing; None otherwise
    seal_min_psnr_db: float | None = None  # `high`: the worst chunk's, when sealing; None otherwise
    seconds: dict[str, float] = field(default_factory=dict)
    # The release check's verdict on the written public stream (tasks/datapath/release_check.py).
    frames_checked: int = 0
    needs_review: bool | None = None  # None until the release check has run: never `done` unchecked
    review_frames: list[int] = field(default_factory=list)
    review_reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def take_verdict(self, verdict: ReleaseVerdict) -> None:
        self.frames_checked = len(verdict.checked_frames)
        self.needs_review = verdict.needs_review
        self.review_frames = verdict.review_frames
        self.review_reason = verdict.reason or None


def _roi_rows(run_id: str, video_id: str, rois: Iterable[Roi]) -> list[dict[str, Any]]:
    return [
        dict(run_id=run_id, video_id=video_id, frame_index=r.frame_index, seq_id=r.seq_id,
             x=r.x, y=r.y, w=r.w, h=r.h, score=r.score, interpolated=r.interpolated)
        for r in rois
    ]


class PublicSink:
    """The public stream's back half for a run of frames in order: seal the originals, de-identify,
    hide the ROIs (lossless formats), encode; ROI rows to the catalog in parts.

    Frames wait in `pending` (frame index → decoded frame) until `emit` gets their final ROIs.
    `anonymize_video` feeds it a whole video; `render_segment` one segment of a split video,
    with `index_base` keeping its sealed records apart from the other segments'. It owns
    `writer`. Use as a context manager: a failure removes what it wrote.
    """

    def __init__(self, writer: VideoWriter, sealed_part: Path, video_id: str, data_key: DataKey,
                 envelope: Sequence[WrappedKey], settings: PipelineSettings, swapper: FaceSwapper, timer: Timer,
                 run_id: str, catalog: CatalogStore | None, bar: Any, index_base: int = 0,
                 roi_part_prefix: str = "") -> None:
        self.pending: dict[int, np.ndarray] = {}
        self.video_id, self.swapper, self.timer, self.bar = video_id, swapper, timer, bar
        self.run_id, self.catalog, self.roi_part_prefix = run_id, catalog, roi_part_prefix
        self.payload_key = data_key.payload_key()
        # Lossless formats keep an in-pixel payload, with the envelope: reversible from the pixels alone.
        self.in_pixels = settings.public_format in LOSSLESS_CODECS
        self.envelope_bytes = envelope_to_bytes(envelope)
        self.noise_for = noise_source(data_key)
        # Sealed originals free the public face from carrying them: blended and smoothed for viewers.
        self.blend = settings.seal != "none"
        self.smoother = TemporalSmoother(SMOOTHING_WEIGHT) if self.blend else None
        self.faces = self.frames_with_faces = 0
        self.stats: SealStats | None = None
        self._roi_rows: list[dict[str, Any]] = []
        self._roi_parts = 0
        self._writer = writer
        try:
            self._sealer = SealWriter(sealed_part, video_id, data_key, envelope, settings.seal,
                                      index_base=index_base)
        except BaseException:
            writer.abort()
            raise

    @property
    def frames_written(self) -> int:
        return self._writer.frames_written

    def emit(self, ready: list[tuple[int, list[Roi]]]) -> None:
        """Write the frames of `ready` (frame index, final ROIs), in order; each must be in `pending`."""
        if not ready:
            return
        frames = [self.pending.pop(f) for f, _ in ready]
        rois = [r for _, r in ready]
        with self.timer.stage("seal"):
            for frame, (f, frame_rois) in zip(frames, ready):
                self._sealer.add(f, frame, frame_rois)
        with self.timer.stage("deidentify"):
            self.swapper.anonymize(frames, rois, self.noise_for, self.smoother, blend=self.blend)
        if self.in_pixels:
            with self.timer.stage("stego"):
                frames = [
                    stego.embed(frame, stego.FramePayload(f, self.video_id, self.payload_key.key_id, tuple(
                        stego.RoiRecord(r.x, r.y, r.w, r.h, r.seq_id) for r in frame_rois)), self.payload_key,
                        self.envelope_bytes)
                    for frame, (f, frame_rois) in zip(frames, ready)
                ]
        with self.timer.stage("encode"):
            self._writer.write(np.stack(frames))
        for _, frame_rois in ready:
            self.faces += len(frame_rois)
            self.frames_with_faces += bool(frame_rois)
            self._roi_rows.extend(_roi_rows(self.run_id, self.video_id, frame_rois))
        self._flush_rois(final=False)
        if self.bar is not None:
            self.bar.update(len(ready))

    def _flush_rois(self, final: bool) -> None:
        """ROI rows grow with the video: written in parts so memory does not."""
        if not final and len(self._roi_rows) < ROI_ROWS_PER_PART:
            return
        if self.catalog is not None and self._roi_rows:
            self.catalog.write_part("rois", self.run_id,
                                    f"{self.video_id}-{self.roi_part_prefix}{self._roi_parts:05d}", self._roi_rows)
            self._roi_parts += 1
        self._roi_rows = []

    def __enter__(self) -> PublicSink:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self._writer.abort()
            self._sealer.abort()
            return
        try:
            self._writer.close()
        except BaseException:
            self._sealer.abort()
            raise
        with self.timer.stage("seal"):
            self.stats = self._sealer.close()
        self._flush_rois(final=True)
        if self.bar is not None:
            self.bar.close()


def sequence_rows(run_id: str, video_id: str, sequences: Iterable[SequenceStats]) -> list[dict[str, Any]]:
    return [dict(run_id=run_id, video_id=video_id, seq_id=s.seq_id, first_frame=s.first_frame,
                 last_frame=s.last_frame, n_frames=s.n_frames, n_detected=s.n_detected,
                 n_interpolated=s.n_interpolated, mean_score=s.mean_score)
            for s in sequences]


def anonymize_video(
    source: str | Path,
    output: str | Path,
    *,
    recipients: Sequence[AuthorityPublicKey],
    video_id: str,
    detector: FaceDetector,
    swapper: FaceSwapper,
    settings: PipelineSettings,
    run_id: str,
    catalog: CatalogStore | None = None,
    progress: bool = True,
    judge: SFaceJudge | None = None,
    data_key: DataKey | None = None,
    release_check: bool = True,
) -> VideoRecord:
    """Public module for one video: detect, track, seal, de-identify, hide the ROIs, encode, attach,
    then run the release check on the written file.

    ROI and sequence rows go straight to the catalog (they grow with the video, so they do
    not travel back to the caller); the returned record is small. `judge` (SFace with its
    YuNet) is loaded here when not given; a worker passes its own to load it once.
    `data_key` is drawn at random when not given (tests and the evaluation fix it).
    `release_check=False` leaves the check to the caller, who holds the data key
    (`check_release_shared`); the record's `needs_review` stays None until then.
    """
    bound_heap_fragmentation()
    timer = Timer()
    info = probe(source)
    record = VideoRecord(video_id, str(source), str(output), info.width, info.height,
                         info.frame_count, info.fps, info.fps_rational, info.audio_streams,
                         public_format=settings.public_format, seal=settings.seal,
                         recipients=[r.fingerprint for r in recipients])
    tracker = FaceTracker(info.width, info.height, max_gap=settings.max_gap, roi_scale=settings.roi_scale)
    schedule = DetectionSchedule(detector, every=settings.detect_every)
    data_key = data_key or DataKey.generate()
    envelope = wrap_data_key(data_key, recipients, video_id)
    bar = progress_bar(info.frame_count, f"anonymize {Path(source).name}", progress, settings.progress_style)
    start = time.perf_counter()
    with temporary_beside(output, ".mkv") as video_part, temporary_beside(output, ".uuseal") as sealed_part:
        writer = writer_for(video_part, info, source, settings.public_format)
        with PublicSink(writer, sealed_part, video_id, data_key, envelope, settings, swapper, timer, run_id,
                        catalog, bar) as sink:
            for first, batch in timed_batches(source, settings.batch_size, timer):
                with timer.stage("detect"):
                    detections = schedule.detect(batch)
                for i, dets in enumerate(detections):
                    tracker.update(first + i, dets)
                    sink.pending[first + i] = batch[i]
                sink.emit(tracker.pop_ready())
            sink.emit(tracker.finish())
        stats = sink.stats
        record.frame_count = sink.frames_written
        record.frames_detected = schedule.frames_detected
        record.faces, record.frames_with_faces = sink.faces, sink.frames_with_faces
        with timer.stage("attach"):
            attach(video_part, sealed_part, output, SEALED_NAME)
    record.public_bytes, record.sealed_bytes = Path(output).stat().st_size, stats.bytes
    if settings.seal == "high" and stats.crop_chunks:
        record.seal_psnr_db, record.seal_min_psnr_db = stats.psnr_db, stats.min_psnr_db
    if record.frame_count == 0:
        raise ValueError(f"{source}: no frames could be decoded")
    sequences = tracker.sequences
    record.sequences = len(sequences)
    if catalog is not None:
        catalog.write_part("sequences", run_id, video_id, sequence_rows(run_id, video_id, sequences))
    if release_check:
        with timer.stage("release_check"):
            verdict = check_release(output, source, video_id, data_key, release_check_sample(record, settings),
                                    settings.public_format, detector, judge)
        record.take_verdict(verdict)
    timer.seconds["total"] = time.perf_counter() - start
    record.seconds = timer.seconds
    return record


def release_check_sample(record: VideoRecord, settings: PipelineSettings) -> list[int]:
    """The frames the release check decodes; seeded by the video id: reproducible, yet the
    sampled offset differs between videos."""
    return sample_frames(record.frame_count, settings.release_check_frames, seed=int(record.video_id[:15], 16))


def check_release(public: str | Path, source: str | Path, video_id: str, data_key: DataKey, frames: Sequence[int],
                  public_format: str, detector: FaceDetector, judge: SFaceJudge | None) -> ReleaseVerdict:
    """The release check on `frames` of the written public file, its ROIs read back from the file
    itself: the sealed data must verify in every format (tasks/datapath/release_check.py)."""
    sealed_rois = read_back_rois(public, video_id, data_key, frames)
    in_pixels = public_format in LOSSLESS_CODECS
    rois_of = payload_rois(data_key.payload_key()) if in_pixels else listed_rois(sealed_rois)
    return check_public_stream(public, source, rois_of, detector, judge=judge, frames=frames)


def check_release_shared(call: Callable[..., ReleaseVerdict], workers: int, public: str | Path,
                         source: str | Path, record: VideoRecord, data_key: DataKey,
                         settings: PipelineSettings) -> None:
    """The release check of a written video with its sampled frames shared out among up to
    `workers` workers at once: `call("check_frames", public, source, video_id, data_key, frames)`
    runs a share on a free one (the flow's `ActorPool.call`). The merged verdict goes into
    `record`. The same frames and the same verdict as one worker's check: only the wait is
    shorter while other workers are idle.

    Seconds, like the other stages': `release_check` is the shares' own time summed over the
    workers, and `total` grows by the longest share. A share that waited for a free worker
    (busy with another video) does not count that wait: `total` stays the time the video's
    work took, and frames / total its speed (the task's wall time, waits included, is the
    `videos` row's seconds_total).
    """
    sample = release_check_sample(record, settings)
    shares = [[int(f) for f in part] for part in np.array_split(np.asarray(sample, dtype=np.int64), max(1, workers))
              if len(part)]
    with ThreadPoolExecutor(max_workers=len(shares), thread_name_prefix="check") as pool:
        verdicts = list(pool.map(lambda share: call("check_frames", str(public), str(source), record.video_id,
                                                    data_key, share), shares))
    checking = sum(v.seconds for v in verdicts)
    record.take_verdict(ReleaseVerdict(sorted(f for v in verdicts for f in v.checked_frames),
                                       sorted(f for v in verdicts for f in v.face_outside_frames),
                                       sorted(f for v in verdicts for f in v.identity_match_frames), checking))
    record.seconds["release_check"] = checking
    record.seconds["total"] = record.seconds.get("total", 0.0) + max(v.seconds for v in verdicts)


def read_back_rois(public: str | Path, video_id: str, data_key: DataKey,
                   frames: Iterable[int]) -> dict[int, list[stego.RoiRecord]]:
    """The ROIs of `frames` as the written public file's sealed data gives them (verified)."""
    with temporary_beside(public, ".uuseal") as part:
        if not read_attachment(public, ATTACHMENT_MIMETYPE, part):
            raise ValueError(f"{public}: the sealed data is missing from the written file")
        sealed = SealedVideo(part)
        if sealed.video_id != video_id:
            raise ValueError(f"{public}: the sealed data names video {sealed.video_id}, not {video_id}")
        sealed.unlock(data_key)
        rois = sealed.roi_lists(frames)
        if sealed.failures:
            raise ValueError(f"{public}: the sealed data does not verify: {'; '.join(sealed.failures[:3])}")
    return {f: [stego.RoiRecord(r.x, r.y, r.w, r.h, r.seq_id) for r in items] for f, items in rois.items()}
