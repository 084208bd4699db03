"""Held-out real faces: the frames the training corpus leaves out, through the pipeline's own crop.

Shared by the model card (`bench/model_card.py`) and the evaluation flow
(`tasks/evaluation/evaluate.py`), so both measure exactly the same faces: the last
HELD_OUT_FRACTION of each clip, best MTCNN face per frame, head_roi + crop_faces to
64x64, one video id (the content hash) and one sequence per clip.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from catalogs.store import file_content_hash
from tasks.datapath.decode import probe, read_frames
from tasks.datapath.deidentify import FacePair, crop_faces
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import DataKey
from tasks.datapath.track import Roi, head_roi
from tasks.training.corpus import HOLDOUT_FRACTION

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
# The corpus's own constant: evaluation must start exactly where training stops.
HELD_OUT_FRACTION = HOLDOUT_FRACTION
SEQ_ID = 0
CONTEXT_UPSAMPLE = 2  # 64 → 128 before detection
CONTEXT_BORDER = 32   # grey pixels on each side → 192x192
CONTEXT_GREY = 128



@dataclass
class ClipFaces:
    """The held-out faces of one clip and what the pair makes of them."""

    clip: str
    frames: list[int]
    x: np.ndarray        # uint8 (n, 64, 64, 3)
    a: np.ndarray
    r: np.ndarray
    r_wrong: np.ndarray


def held_out_frames(frame_count: int, stride: int) -> list[int]:
    """Every `stride`-th frame of the last HELD_OUT_FRACTION of a clip."""
    first = math.ceil(frame_count * (1.0 - HELD_OUT_FRACTION))
    return list(range(first, frame_count, stride))


def to_uint8(faces: torch.Tensor) -> np.ndarray:
    """(n, 3, h, w) in [0, 1] → uint8 (n, h, w, 3), rounded as paste_faces writes pixels."""
    return faces.mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(faces: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(faces).to(device).permute(0, 3, 1, 2).float().div(255.0)


def video_noise(key: DataKey, video_id: str, seq_id: int) -> np.ndarray:
    """Sequence `seq_id`'s noise in video `video_id` when one key stands for a run's per-video data keys.

    The pipeline draws a fresh data key per video; a measurement over several clips keeps
    one seeded key and derives each clip's from it, so a rerun draws the same noise.
    """
    return DataKey(key.derive(f"video/{video_id}")).noise(seq_id)


@torch.inference_mode()
def run_clip(path: Path, stride: int, detector: FaceDetector, pair: FacePair, key: DataKey,
             wrong_key: DataKey, roi_scale: float) -> ClipFaces:
    info = probe(path)
    frames = held_out_frames(info.frame_count, stride)
    images = read_frames(path, frames)
    kept, crops = [], []
    for index, image, boxes in zip(frames, images, detector.detect(images)):
        if not len(boxes):
            continue  # a hand over the face, a turned head: nothing to de-identify
        # One person per bundled clip: the best box is that person; others would be false alarms.
        x, y, w, h = head_roi(boxes[0], info.width, info.height, roi_scale)
        crops.append(crop_faces(image, [Roi(index, SEQ_ID, x, y, w, h, float(boxes[0, 4]), False)], pair.device))
        kept.append(index)
    if not crops:
        empty = np.zeros((0, 64, 64, 3), dtype=np.uint8)
        return ClipFaces(path.name, [], empty, empty, empty, empty)
    x = torch.cat(crops)
    video_id = file_content_hash(path)

    def noise(k: DataKey) -> torch.Tensor:
        return torch.from_numpy(video_noise(k, video_id, SEQ_ID)).to(pair.device).expand(len(x), 1, -1, -1)

    # The public stream holds a as 8-bit pixels (lossless codec): U_d only ever sees those.
    a = to_uint8(pair.encoder(x, noise(key)))
    a_in = from_uint8(a, pair.device)
    r = to_uint8(pair.decoder(a_in, noise(key)))
    r_wrong = to_uint8(pair.decoder(a_in, noise(wrong_key)))
    return ClipFaces(path.name, kept, to_uint8(x), a, r, r_wrong)


def in_context(faces: np.ndarray) -> np.ndarray:
    """64x64 faces → upsampled and framed in grey, (n, 192, 192, 3) uint8, for the detectors."""
    big = torch.nn.functional.interpolate(from_uint8(faces, torch.device("cpu")), scale_factor=CONTEXT_UPSAMPLE,
                                          mode="bicubic", align_corners=False)
    big = to_uint8(big)
    pad = CONTEXT_BORDER
    return np.pad(big, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=CONTEXT_GREY)
