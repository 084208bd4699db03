"""Face detection stage: MTCNN with the weights bundled in the `mtcnn` package.

The `mtcnn` package is installed without TensorFlow, so it cannot be
imported; only its weight files are used, found through its import spec.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import joblib
import numpy as np
import torch

from models.mtcnn import MTCNN, area_pyramid, pairwise_overlap


def mtcnn_weights_dir() -> Path:
    """Folder holding `pnet.lz4`, `rnet.lz4` and `onet.lz4` of the `mtcnn` package."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `mtcnn` package is not installed (pip install mtcnn==1.0.0)")
    return Path(spec.submodule_search_locations[0]) / "assets" / "weights"


def opencv_area_pyramid(frames: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """`models.mtcnn.area_pyramid` on CPU through OpenCV's INTER_AREA on float frames: 3x faster
    here (11 against 37 ms for a 640x360 frame's nine levels) and within 0.01 of 255 of
    TensorFlow's ResizeArea (float cell borders both; OpenCV's in double).

    Returns (N, 3, h, w) views of channels-last arrays, the layout P-Net runs fastest on.
    """
    images = frames.numpy().astype(np.float32)
    levels = []
    for h, w in sizes:
        resized = np.stack([cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA) for image in images])
        levels.append(torch.from_numpy(resized).permute(0, 3, 1, 2))
    return levels


def load_mtcnn(device: str | torch.device = "cpu", **detector_kwargs) -> MTCNN:
    """An MTCNN in eval mode on `device`, loaded with the package's weights; on CPU its pyramid
    is built by OpenCV (`opencv_area_pyramid`), on a GPU by torch.

    The .lz4 files are joblib pickles: load only the installed package's own.
    """
    folder = mtcnn_weights_dir()
    device = torch.device(device)
    detector_kwargs.setdefault("pyramid", opencv_area_pyramid if device.type == "cpu" else area_pyramid)
    model = MTCNN(**detector_kwargs)
    model.load_keras_arrays(*(joblib.load(folder / f"{name}.lz4") for name in ("pnet", "rnet", "onet")))
    return model.eval().to(device)


class FaceDetector:
    """Detects faces in numpy frame batches, a sub-batch at a time."""

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
                 batch_size: int = 16) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = load_mtcnn(self.device, min_face_size=min_face_size, thresholds=thresholds)

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        """Per frame a float32 (K, 5) array x1, y1, x2, y2, score, best first.

        frames: uint8 RGB (N, H, W, 3). x2 - x1 and y2 - y1 are the width and
        height the reference MTCNN reports; corners lie inside the frame.
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W, 3) frames, got {frames.dtype} {frames.shape}")
        results: list[np.ndarray] = []
        for start in range(0, len(frames), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(frames[start:start + self.batch_size]))
            for boxes in self.model.detect(batch.to(self.device)):
                results.append(boxes.cpu().numpy().astype(np.float32, copy=False))
        return results


def boxes_agree(a: np.ndarray, b: np.ndarray, min_iou: float = 0.5, max_shift: float = 0.0) -> bool:
    """Whether two frames' face boxes pair up one to one, each pair overlapping by IoU >= `min_iou`
    or, with `max_shift` > 0, a face that moved steadily: its centre at most `max_shift` of the
    larger side away and its side changed by at most `MAX_SIDE_CHANGE`.

    Greedy on the best overlaps first, then the nearest; (K, 5) arrays as `FaceDetector.detect`
    gives (the score is ignored).
    """
    a, b = (np.asarray(boxes, dtype=np.float64).reshape(-1, 5)[:, :4] for boxes in (a, b))
    if len(a) != len(b):
        return False
    if len(a) == 0:
        return True
    # Boxes of no area overlap nothing (0 / 0 is NaN there).
    overlap = pairwise_overlap(torch.from_numpy(a), torch.from_numpy(b), "union").nan_to_num(0.0).numpy()
    side_a = np.maximum(a[:, 2] - a[:, 0], a[:, 3] - a[:, 1])[:, None]
    side_b = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])[None, :]
    larger = np.maximum(np.maximum(side_a, side_b), 1.0)
    centre_a, centre_b = (a[:, :2] + a[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2
    shift = np.hypot(*(centre_a[:, None, :] - centre_b[None, :, :]).transpose(2, 0, 1)) / larger
    steady = (shift <= max_shift) & (larger <= (1 + MAX_SIDE_CHANGE) * np.maximum(np.minimum(side_a, side_b), 1.0))
    agree = (overlap >= min_iou) | steady
    # Overlap ranks first (a real overlap always wins), then closeness.
    rank = np.where(agree, overlap + (1 - np.minimum(shift, 1.0)) * 1e-3, -1.0)
    for _ in range(len(a)):
        i, j = np.unravel_index(np.argmax(rank), rank.shape)
        if rank[i, j] < 0:
            return False
        rank[i, :], rank[:, j] = -1.0, -1.0
    return True


# A face that moved steadily between two detected frames may grow or shrink by this much
# (it walks towards the camera); more, and the frames between are detected.
MAX_SIDE_CHANGE = 0.25


class DetectionSchedule:
    """Full detection on every `every`-th frame, and on the frames between two of those when they disagree.

    Per batch the detector runs on frames every-1, 2*every-1, ... and on the batch's last frame
    (so an interval never spans two batches: the previous batch's last frame, already detected,
    opens the first one). Where the two detected frames that close an interval agree (the same
    faces, each pair of boxes at IoU >= `min_iou` or, a face moving steadily, its centre at most
    `max_shift` of its side away: `boxes_agree`), the frames between get no detections and the
    tracker fills them by linear interpolation between the two (it links boxes up to 0.6 of a
    side apart), which `max_gap` >= every - 1 guarantees. Where they disagree (a face appeared,
    left, was missed, moved fast or changed size) every frame between is detected as well, so
    a face that enters between two detected frames is found from its first frame, not from
    the next detected one. What this
    can miss: a face that enters and leaves entirely between two detected frames (under
    `every` frames, a tenth of a second at the default); the release check is the backstop.
    Before the first frame of a video there are no faces, so a face present from the start
    has its first interval detected in full.
    """

    def __init__(self, detector: FaceDetector, every: int = 1, min_iou: float = 0.5, max_shift: float = 0.5) -> None:
        if every < 1:
            raise ValueError(f"detect every must be >= 1 frame, got {every}")
        self.detector, self.every, self.min_iou, self.max_shift = detector, every, min_iou, max_shift
        self._last = np.zeros((0, 5), dtype=np.float32)  # the last detected frame's boxes
        self.frames_detected = 0  # counted over the video: how much detection the schedule saved
        self.frames_seen = 0

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        """Per frame of the batch a float32 (K, 5) array as `FaceDetector.detect`; empty on a skipped frame."""
        n = len(frames)
        self.frames_seen += n
        if n == 0:
            return []
        if self.every == 1:
            self.frames_detected += n
            return self.detector.detect(frames)
        anchors = sorted({*range(self.every - 1, n, self.every), n - 1})
        found = dict(zip(anchors, self.detector.detect(frames[anchors])))
        between: list[int] = []
        previous_index, previous = -1, self._last
        for index in anchors:
            if not boxes_agree(previous, found[index], self.min_iou, self.max_shift):
                between.extend(range(previous_index + 1, index))
            previous_index, previous = index, found[index]
        if between:
            found.update(zip(between, self.detector.detect(frames[between])))
        self.frames_detected += len(anchors) + len(between)
        self._last = found[n - 1]
        empty = np.zeros((0, 5), dtype=np.float32)
        return [found.get(i, empty) for i in range(n)]
