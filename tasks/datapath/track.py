"""Track: link per-frame face boxes into sequences and turn them into head ROIs.

Streaming by design: frames arrive in decode order, and a frame is released only once no
live track can still reach back into it to fill a detector gap, i.e. `max_gap + 1` frames
later. Memory is therefore bounded by the gap length, not by the video length.

A sequence keeps one virtual identity downstream (its id seeds the keyed noise), so the
association errs on the side of continuing a track rather than starting a new one.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

# The soft face-shaped region of a head ROI that the public face replaces: an ellipse over the
# face box's part of the ROI (the ROI is that box x1.3; MTCNN boxes are taller than wide), at
# full weight inside, falling to zero along a smoothstep ring, so no step shows at its border
# and outside it the frame stays the source.
_REGION_AXES = (0.36, 0.43)  # semi-axes as fractions of the ROI's width and height
_REGION_RING = 0.18  # width of the falloff, as a fraction of the ellipse's radius


@dataclass(frozen=True)
class Roi:
    """A head region in one frame, in absolute integer pixels (x, y top-left; w, h size)."""

    frame_index: int
    seq_id: int
    x: int
    y: int
    w: int
    h: int
    score: float | None  # detector confidence; None where the box was interpolated
    interpolated: bool


@dataclass
class _Track:
    seq_id: int
    boxes: dict[int, np.ndarray] = field(default_factory=dict)  # frame → x1,y1,x2,y2 (float)
    scores: dict[int, float] = field(default_factory=dict)
    last_frame: int = -1


def iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _center_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Centre distance relative to the larger box side: survives fast motion where IoU drops to 0."""
    ca = ((a[0] + a[2]) / 2, (a[1] + a[3]) / 2)
    cb = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    side = max(a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1], 1.0)
    return float(np.hypot(ca[0] - cb[0], ca[1] - cb[1]) / side)


def head_roi(box: np.ndarray, width: int, height: int, scale: float = 1.3) -> tuple[int, int, int, int]:
    """Face box (x1, y1, x2, y2) → square head ROI (x, y, w, h) enlarged by `scale`, clipped to the frame.

    MTCNN boxes cover brows to chin; the U-Nets replace the whole head region, so the
    square is enlarged to take in hair line and jaw. Clipping at the border may make it
    non-square; the crop is resized to 64×64 either way.
    """
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(box[2] - box[0], box[3] - box[1]) * scale
    x1 = int(np.floor(cx - side / 2))
    y1 = int(np.floor(cy - side / 2))
    x2 = int(np.ceil(cx + side / 2))
    y2 = int(np.ceil(cy + side / 2))
    x1, y1 = max(0, x1), max(0, y1)
    x2, y2 = min(width, x2), min(height, y2)
    return x1, y1, max(1, x2 - x1), max(1, y2 - y1)


@functools.lru_cache(maxsize=32)
def face_region(w: int, h: int) -> np.ndarray:
    """(h, w) float32 weights in [0, 1] of the public face over the source, for a w x h ROI (read-only)."""
    # A column and a row, summed by broadcasting: a tracked face changes size nearly every
    # frame, so the cache misses often, and two full (h, w) grids cost twice the time.
    u = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) / (_REGION_AXES[0] * w)
    v = (np.arange(h, dtype=np.float32) + 0.5 - h / 2) / (_REGION_AXES[1] * h)
    t = np.clip((1 + _REGION_RING - np.sqrt(np.add.outer(v * v, u * u))) / _REGION_RING, 0, 1)
    weights = (t * t * (3 - 2 * t)).astype(np.float32)  # smoothstep: no kink where the ring starts or ends
    weights.flags.writeable = False
    return weights


@dataclass
class SequenceStats:
    seq_id: int
    first_frame: int = -1
    last_frame: int = -1
    n_frames: int = 0
    n_detected: int = 0
    score_sum: float = 0.0

    def absorb(self, frame_index: int, score: float | None) -> None:
        self.first_frame = frame_index if self.first_frame < 0 else min(self.first_frame, frame_index)
        self.last_frame = max(self.last_frame, frame_index)
        self.n_frames += 1
        if score is not None:
            self.n_detected += 1
            self.score_sum += score

    @property
    def n_interpolated(self) -> int:
        return self.n_frames - self.n_detected

    @property
    def mean_score(self) -> float:
        return self.score_sum / self.n_detected if self.n_detected else float("nan")


class FaceTracker:
    """IoU tracker with linear gap filling, fed frame by frame, releasing finished frames.

    Usage: `update(i, detections)` for every frame in order (detections (K, 5): x1, y1, x2,
    y2, score, possibly empty), then `pop_ready()` for the frames whose ROIs are final,
    and `finish()` at the end of the video for the rest.
    """

    def __init__(
        self,
        width: int,
        height: int,
        iou_threshold: float = 0.3,
        max_center_distance: float = 0.6,
        max_gap: int = 8,
        roi_scale: float = 1.3,
    ) -> None:
        self.width, self.height = width, height
        self.iou_threshold = iou_threshold
        self.max_center_distance = max_center_distance
        self.max_gap = max_gap
        self.roi_scale = roi_scale
        self._active: list[_Track] = []
        self._finished: list[_Track] = []
        self._next_seq = 0
        self._next_release = 0
        self._last_frame = -1
        self._seq_stats: dict[int, SequenceStats] = {}

    def update(self, frame_index: int, detections: np.ndarray) -> None:
        if frame_index != self._last_frame + 1:
            raise ValueError(f"frames must arrive in order: got {frame_index} after {self._last_frame}")
        self._last_frame = frame_index
        self._retire_stale(frame_index)
        dets = np.asarray(detections, dtype=np.float64).reshape(-1, 5)
        unmatched = set(range(len(dets)))
        for track, det_i in self._match(dets):
            self._extend(track, frame_index, dets[det_i])
            unmatched.discard(det_i)
        for det_i in sorted(unmatched, key=lambda i: -dets[i, 4]):
            track = _Track(seq_id=self._next_seq)
            self._next_seq += 1
            self._extend(track, frame_index, dets[det_i])
            self._active.append(track)

    def _match(self, dets: np.ndarray) -> list[tuple[_Track, int]]:
        """Greedy matching: best IoU pairs first, then nearest centres for what IoU missed."""
        pairs = []
        for ti, track in enumerate(self._active):
            last = track.boxes[track.last_frame]
            for di in range(len(dets)):
                overlap = iou(last, dets[di, :4])
                dist = _center_distance(last, dets[di, :4])
                if overlap >= self.iou_threshold or dist <= self.max_center_distance:
                    # Sort key: IoU first, then closeness, so a real overlap always wins.
                    pairs.append((-overlap, dist, ti, di))
        pairs.sort()
        used_t, used_d, out = set(), set(), []
        for _, _, ti, di in pairs:
            if ti in used_t or di in used_d:
                continue
            used_t.add(ti)
            used_d.add(di)
            out.append((self._active[ti], di))
        return out

    def _extend(self, track: _Track, frame_index: int, det: np.ndarray) -> None:
        box = det[:4].copy()
        if track.last_frame >= 0 and frame_index - track.last_frame > 1:
            # Fill the detector gap so no frame inside a track keeps the original face.
            prev, f0 = track.boxes[track.last_frame], track.last_frame
            span = frame_index - f0
            for f in range(f0 + 1, frame_index):
                t = (f - f0) / span
                track.boxes[f] = (1 - t) * prev + t * box
        track.boxes[frame_index] = box
        track.scores[frame_index] = float(det[4])
        track.last_frame = frame_index

    def _retire_stale(self, frame_index: int) -> None:
        keep = []
        for track in self._active:
            (keep if frame_index - track.last_frame <= self.max_gap + 1 else self._finished).append(track)
        self._active = keep

    def _rois_for(self, frame_index: int) -> list[Roi]:
        rois = []
        for track in self._finished + self._active:
            box = track.boxes.get(frame_index)
            if box is None:
                continue
            x, y, w, h = head_roi(box, self.width, self.height, self.roi_scale)
            score = track.scores.get(frame_index)
            rois.append(Roi(frame_index, track.seq_id, x, y, w, h, score, score is None))
        return sorted(rois, key=lambda r: r.seq_id)

    def _release(self, upto: int) -> list[tuple[int, list[Roi]]]:
        out = []
        for f in range(self._next_release, upto + 1):
            out.append((f, self._rois_for(f)))
        self._next_release = max(self._next_release, upto + 1)
        self._forget_before(self._next_release)
        return out

    def _forget_before(self, frame_index: int) -> None:
        """Drop released boxes so memory stays bounded; keep per-sequence stats in `sequences`."""
        for track in self._finished + self._active:
            for f in [f for f in track.boxes if f < frame_index and f != track.last_frame]:
                self._stats(track).absorb(f, track.scores.get(f))
                del track.boxes[f]
                track.scores.pop(f, None)
        done = [t for t in self._finished if t.last_frame < frame_index]
        for track in done:
            self._stats(track).absorb(track.last_frame, track.scores.get(track.last_frame))
            self._finished.remove(track)

    def pop_ready(self) -> list[tuple[int, list[Roi]]]:
        """Frames that no live track can still fill, with their ROIs, in order."""
        return self._release(self._last_frame - self.max_gap - 1)

    def finish(self) -> list[tuple[int, list[Roi]]]:
        self._finished.extend(self._active)
        self._active = []
        return self._release(self._last_frame)

    def _stats(self, track: _Track) -> SequenceStats:
        return self._seq_stats.setdefault(track.seq_id, SequenceStats(track.seq_id))

    @property
    def sequences(self) -> list[SequenceStats]:
        """Per-sequence statistics of the frames released so far (all of them after `finish`)."""
        return sorted(self._seq_stats.values(), key=lambda s: s.seq_id)
