"""The private module's loop for one public file: unwrap the video's data key with an
authority's private key, then restore every ROI, writing a lossless working copy.

Two restore paths, chosen per video and reported as `restore_path`:
- `sealed`: the original pixels from the sealed data attached to the file, pasted at their
  boxes (exact, or within 42 dB); each chunk is verified, a failed one is counted and the
  rest still restored;
- `learned`: no originals sealed (`--seal none`) or the attachment is gone: U_d on the ROIs
  of the in-pixel payload (lossless formats; the payload also carries the envelope) or of
  the sealed ROI list, with the sequence's noise (the paper's path, 64x64 detail).
PSNR inside the ROIs against the source is measured on the way when the source is at hand.
A plain function (no Ray), like the public module's loop in `tasks/datapath/anonymize.py`.
"""
from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.datapath import stego
from tasks.datapath.decode import iter_frames, probe, read_attachment, read_frames
from tasks.datapath.deidentify import FaceSwapper
from tasks.datapath.encode import ATTACHMENT_MIMETYPE
from tasks.datapath.keys import AuthorityPrivateKey, DataKey, envelope_from_bytes, unwrap_data_key
from tasks.datapath.seal import SealedVideo
from tasks.datapath.track import Roi
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

# Frames whose in-pixel envelopes vote for the video's identity when no sealed data is attached.
ENVELOPE_VOTERS = 9


class NothingToRestore(Exception):
    """A public file that holds neither sealed data nor an in-pixel payload."""


@dataclass
class RestoreRecord:
    """What the private module returns per public file (the `audit` row's content)."""

    video_id: str | None
    public_path: str
    output_path: str
    key_fingerprint: str = ""
    restore_path: str = "none"
    seal: str | None = None  # the sealed data's quality; None when it is absent
    frames: int = 0
    frames_with_payload: int = 0
    frames_payload_invalid: int = 0
    invalid_examples: list[str] = field(default_factory=list)
    rois_restored: int = 0
    chunks_total: int = 0
    chunks_failed: int = 0
    psnr_roi: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Keys:
    """What opening a public file gives: its video id and data key, and the sealed data if attached."""

    video_id: str
    data_key: DataKey
    sealed: SealedVideo | None


def _open(public: Path, sealed_part: Path, private_key: AuthorityPrivateKey, frame_count: int) -> _Keys:
    """Unwrap the data key from the attachment's envelope, else from frame 0's payload."""
    if read_attachment(public, ATTACHMENT_MIMETYPE, sealed_part):
        sealed = SealedVideo(sealed_part)
        data_key = unwrap_data_key(sealed.envelope, private_key, sealed.video_id)
        sealed.unlock(data_key)
        return _Keys(sealed.video_id, data_key, sealed)
    # Every frame carries the envelope; the first ones vote, so one frame spliced in from another
    # video (frame 0 included) is counted as a bad payload like any other instead of deciding the key.
    votes: collections.Counter[tuple[str, bytes]] = collections.Counter()
    for frame in read_frames(public, range(min(ENVELOPE_VOTERS, frame_count))):
        try:
            envelope, unverified = stego.read_envelope(frame)
        except stego.PayloadError:
            continue
        votes[unverified.video_id, envelope] += 1
    if not votes:
        raise NothingToRestore(f"{public}: no sealed data attached and no in-pixel payload (a lossy public "
                               "file whose attachment was stripped): nothing to restore from")
    (video_id, envelope), _ = votes.most_common(1)[0]
    # The envelope binds the video id, so a forged id fails to unwrap; extract() then checks the tag.
    data_key = unwrap_data_key(envelope_from_bytes(envelope), private_key, video_id)
    return _Keys(video_id, data_key, None)


def _carries_payload(frame: np.ndarray) -> bool:
    try:
        stego.read_envelope(frame)
        return True
    except stego.PayloadError:
        return False


def _psnr(squared_error: float, pixels: int) -> float | None:
    if not pixels:
        return None
    mse = squared_error / pixels
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def reconstruct_video(
    public: str | Path,
    output: str | Path,
    *,
    private_key: AuthorityPrivateKey,
    swapper: FaceSwapper,
    settings: PipelineSettings,
    source: str | Path | None = None,
    progress: bool = True,
) -> RestoreRecord:
    """Private module for one public file; needs nothing but the file and an authority's private key.

    Raises `NotARecipientError` / `EnvelopeError` (keys.py) before anything is written when
    the key cannot open the video, and `NothingToRestore` when the file carries nothing to
    restore from. Frames whose payload fails authentication are written unchanged and counted.
    """
    bound_heap_fragmentation()
    timer = Timer()
    public = Path(public)
    info = probe(public)
    record = RestoreRecord(None, str(public), str(output), private_key.fingerprint)
    with temporary_beside(output, ".uuseal") as sealed_part:
        with timer.stage("unseal"):
            keys = _open(public, sealed_part, private_key, info.frame_count)
        record.video_id = keys.video_id
        sealed = keys.sealed
        payload_key = keys.data_key.payload_key()
        noise_for = noise_source(keys.data_key)
        use_crops = sealed is not None and sealed.quality != "none"
        record.restore_path = "sealed" if use_crops else "learned"
        record.seal = sealed.quality if sealed is not None else None
        crops: Iterator[tuple[int, list]] = sealed.crops_by_frame() if use_crops else iter(())
        listed: Iterator[tuple[int, list]] = sealed.rois_by_frame() if sealed is not None else iter(())
        next_crops, next_listed = next(crops, None), next(listed, None)
        bar = progress_bar(info.frame_count, f"reconstruct {public.name}", progress, settings.progress_style)
        source_frames = iter_frames(source, batch_size=settings.batch_size) if source else None
        source_buffer: list[np.ndarray] = []
        squared_error, roi_pixels = 0.0, 0
        has_payload: bool | None = None
        start = time.perf_counter()
        with writer_for(output, info, public, settings.restore_format) as writer:
            for first, batch in timed_batches(public, settings.batch_size, timer):
                if has_payload is None:
                    # A lossy public file has no in-pixel payload; a lossless one has it in every frame.
                    has_payload = sealed is None or _carries_payload(batch[0])
                rois: list[list[Roi]] = []
                with timer.stage("stego"):
                    for i, frame in enumerate(batch):
                        f = first + i
                        frame_rois: list[Roi] = []
                        if has_payload:
                            try:
                                payload = stego.extract(frame, payload_key, expected_frame_index=f,
                                                        expected_video_id=keys.video_id)
                                record.frames_with_payload += 1
                                frame_rois = [Roi(f, r.seq_id, r.x, r.y, r.w, r.h, None, False) for r in payload.rois]
                            except stego.PayloadError as err:
                                record.frames_payload_invalid += 1
                                if len(record.invalid_examples) < 5:
                                    record.invalid_examples.append(f"frame {f}: {err}")
                        else:
                            while next_listed is not None and next_listed[0] < f:
                                next_listed = next(listed, None)
                            if next_listed is not None and next_listed[0] == f:
                                frame_rois = next_listed[1]
                        rois.append(frame_rois)
                if use_crops:
                    with timer.stage("paste"):
                        for i, frame in enumerate(batch):
                            while next_crops is not None and next_crops[0] < first + i:
                                next_crops = next(crops, None)
                            pasted = []
                            if next_crops is not None and next_crops[0] == first + i:
                                for roi, pixels in next_crops[1]:
                                    frame[roi.y : roi.y + roi.h, roi.x : roi.x + roi.w] = pixels
                                    pasted.append(roi)
                            record.rois_restored += len(pasted)
                            rois[i] = pasted
                else:
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
        if sealed is not None:
            record.chunks_total, record.chunks_failed = sealed.chunk_count, sealed.chunks_failed
            record.invalid_examples += sealed.failures[: max(0, 5 - len(record.invalid_examples))]
    record.psnr_roi = _psnr(squared_error, roi_pixels)
    timer.seconds["total"] = time.perf_counter() - start
    record.seconds = timer.seconds
    return record
