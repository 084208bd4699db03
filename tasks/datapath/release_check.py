"""Release check: look at a finished public stream the way an outsider would, before it is released.

The anonymizer's own bookkeeping (tracks, ROI rows, counters) is not trusted here: a bug in
tracking, pasting or encoding would be invisible in it. Instead sampled frames of the
written public file are decoded, and where its ROIs are is read back from the file itself: from
each frame's in-pixel payload (lossless formats) or from the sealed data attached to it
(every format), with the video's data key. Then two questions are asked:

1. Is there a face outside the ROIs? Our MTCNN and, as a second opinion trained elsewhere,
   YuNet look at the whole public frame. A face box counts as covered when its centre lies
   inside some ROI and that ROI holds at least half of the box's area (`MIN_COVERED_FRACTION`).
   Coverage rather than IoU: the ROI is the face box x1.3, so a perfectly hidden face has
   IoU <= 0.59 with it, and a small spurious detection inside a scrambled ROI has IoU near 0
   while being entirely hidden. Faces whose shorter side is under `MIN_FACE_SIDE` pixels are
   ignored, as the pipeline's detector ignores them (`PipelineSettings.min_face_size`).
   A frame whose payload or sealed ROI list is missing or fails authentication has no trusted
   ROIs at all, so every face in it is outside.
2. Is the identity still recognisable? For each ROI, SFace embeds the public crop and the
   same region of the source frame; `same_person` means the de-identification failed there.
   ROIs whose shorter side is under `MIN_IDENTITY_SIDE` are skipped: SFace has no identity
   to compare on so few pixels (its own input is 112 px, and the judge wants 64 px and up).

Sampling (cost stays bounded whatever the video's length): with n frames and at most
`max_frames` (m) checked, every frame is checked when n <= m. Otherwise the stride is
k = ceil(n / (m - 2)), the offset r is drawn uniformly from [0, k) by `random.Random(seed)`,
and the frames checked are 0, n - 1 and r, r + k, r + 2k, ... < n: at most m frames. The
random offset means a leak that repeats every k frames is not always skipped; the seed
makes a run reproducible.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tasks.datapath import stego
from tasks.datapath.decode import iter_frames_at, probe
from tasks.datapath.keys import Key
from tasks.judges import SFaceJudge, YuNetDetector

# A face box is hidden when one ROI contains its centre and at least this much of its area.
MIN_COVERED_FRACTION = 0.5
# Smaller face boxes are not faces the pipeline promises to hide (its default min_face_size).
MIN_FACE_SIDE = 20
# Smaller ROIs carry too few pixels for SFace to tell identities apart.
MIN_IDENTITY_SIDE = 32
# Frames decoded at a time: bounds memory for large frames.
READ_CHUNK = 8


class BatchDetector(Protocol):
    def detect(self, frames: np.ndarray) -> list[np.ndarray]: ...


@dataclass
class ReleaseVerdict:
    """What the release check saw; frame indices are 0-based and sorted."""

    checked_frames: list[int]
    face_outside_frames: list[int]
    identity_match_frames: list[int]
    seconds: float

    @property
    def needs_review(self) -> bool:
        return bool(self.face_outside_frames or self.identity_match_frames)

    @property
    def review_frames(self) -> list[int]:
        return sorted(set(self.face_outside_frames) | set(self.identity_match_frames))

    @property
    def reason(self) -> str:
        """Empty when the stream passed; else one clause per kind of problem, with its frames."""
        clauses = []
        if self.face_outside_frames:
            clauses.append(f"face outside ROIs at frames {_frame_list(self.face_outside_frames)}")
        if self.identity_match_frames:
            clauses.append(f"identity still recognisable at frames {_frame_list(self.identity_match_frames)}")
        return "; ".join(clauses)


def _frame_list(frames: Sequence[int]) -> str:
    return ",".join(str(f) for f in frames)


def sample_frames(frame_count: int, max_frames: int = 48, seed: int = 0) -> list[int]:
    """The frames the check decodes (the rule is in the module docstring)."""
    if max_frames < 3:
        raise ValueError(f"max_frames must be >= 3 (first, last and one more), got {max_frames}")
    if frame_count <= max_frames:
        return list(range(frame_count))
    stride = math.ceil(frame_count / (max_frames - 2))
    offset = random.Random(seed).randrange(stride)
    return sorted({0, frame_count - 1, *range(offset, frame_count, stride)})


def is_covered(box: np.ndarray, rois: Sequence[stego.RoiRecord]) -> bool:
    """Whether a face box x1, y1, x2, y2 is hidden by one of the ROIs (rule in the module docstring)."""
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
    for r in rois:
        if not (r.x <= cx < r.x + r.w and r.y <= cy < r.y + r.h):
            continue
        inter_w = max(0.0, min(x2, r.x + r.w) - max(x1, r.x))
        inter_h = max(0.0, min(y2, r.y + r.h) - max(y1, r.y))
        if area == 0 or inter_w * inter_h >= MIN_COVERED_FRACTION * area:
            return True
    return False


def _faces(boxes: np.ndarray) -> np.ndarray:
    """Boxes big enough to be faces the pipeline must hide."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 5)
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return boxes[sides >= MIN_FACE_SIDE]


RoisOf = Callable[[int, np.ndarray], Sequence[stego.RoiRecord]]  # (frame index, public frame) → trusted ROIs


def payload_rois(key: Key) -> RoisOf:
    """The ROIs an authentic in-pixel payload names; none when the payload cannot be trusted."""
    def rois_of(frame_index: int, frame: np.ndarray) -> Sequence[stego.RoiRecord]:
        try:
            return stego.extract(frame, key, expected_frame_index=frame_index).rois
        except stego.PayloadError:
            return ()
    return rois_of


def listed_rois(rois_by_frame: Mapping[int, Sequence[stego.RoiRecord]]) -> RoisOf:
    """The ROIs a verified list gives (the sealed data's); frames it lacks have none."""
    return lambda frame_index, frame: rois_by_frame.get(frame_index, ())


def check_public_stream(
    public_path: str | Path,
    source_path: str | Path,
    rois_of: RoisOf,
    detector: BatchDetector,
    judge: SFaceJudge | None = None,
    yunet: YuNetDetector | None = None,
    frames: Sequence[int] | None = None,
) -> ReleaseVerdict:
    """Scan frames of a written public stream for visible faces and recognisable identities.

    frames: the frames to check, `sample_frames(frame_count, 48, seed)` as a rule (given, so
    a caller can fetch just their ROIs); every frame when None. detector: our MTCNN
    (`FaceDetector`); judge / yunet: the independent SFace and YuNet, created here when
    not given (a worker passes its own to load them once).
    """
    start = time.perf_counter()
    yunet = yunet or (judge.detector if judge is not None else YuNetDetector())
    judge = judge or SFaceJudge(detector=yunet)
    checked = list(frames) if frames is not None else list(range(probe(public_path).frame_count))
    outside: list[int] = []
    matches: list[int] = []
    for (indices, public), (_, source) in zip(iter_frames_at(public_path, checked, READ_CHUNK),
                                              iter_frames_at(source_path, checked, READ_CHUNK)):
        ours = detector.detect(public)
        for frame_index, pub, src, mtcnn_boxes in zip(indices, public, source, ours):
            rois = rois_of(frame_index, pub)
            boxes = np.concatenate([_faces(mtcnn_boxes), _faces(yunet.detect(pub))])
            if any(not is_covered(box, rois) for box in boxes):
                outside.append(frame_index)
            for r in rois:
                if min(r.w, r.h) < MIN_IDENTITY_SIDE:
                    continue
                region = (slice(r.y, r.y + r.h), slice(r.x, r.x + r.w))
                if judge.same_person(judge.embed(pub[region]), judge.embed(src[region])):
                    matches.append(frame_index)
                    break
    return ReleaseVerdict(checked, outside, matches, time.perf_counter() - start)
