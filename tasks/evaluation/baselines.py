"""The classic de-identification baselines of the paper's comparison: blurring and superpixels.

They take the same input as our face pair (uint8 RGB (N, 64, 64, 3) head crops) and return
the same output, so they go through the same metrics (SFace match rate, PSNR, gender
preservation) side by side with U_e.

Both are IRREVERSIBLE by design: they average pixels together and throw the detail away,
so no key and no decoder can bring the original face back. That is the point of
comparing against them: they buy privacy by destroying the evidence, which is exactly
what the reversible U_e / U_d pair is meant to avoid.
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from skimage.segmentation import slic

FaceBaseline = Callable[[np.ndarray], np.ndarray]


def _check_faces(faces: np.ndarray) -> None:
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[3] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) RGB faces, got {faces.dtype} {faces.shape}")


def blur_faces(faces: np.ndarray, factor: int = 8) -> np.ndarray:
    """Pixelation-style blur: shrink each face by `factor` (area averaging), enlarge back (bilinear).

    Area averaging is the right shrink: every output pixel is the mean of a factor×factor
    block, so nothing aliases and a flat region keeps exactly its colour.
    """
    _check_faces(faces)
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    height, width = faces.shape[1:3]
    small_size = (max(1, round(width / factor)), max(1, round(height / factor)))  # cv2 wants (w, h)
    out = np.empty_like(faces)
    for i, face in enumerate(faces):
        small = cv2.resize(face, small_size, interpolation=cv2.INTER_AREA)
        out[i] = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def superpixel_faces(faces: np.ndarray, n_segments: int = 32, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixels, each filled with its mean colour: shape and skin tone stay, detail goes."""
    _check_faces(faces)
    if n_segments < 1:
        raise ValueError(f"n_segments must be >= 1, got {n_segments}")
    out = np.empty_like(faces)
    for i, face in enumerate(faces):
        labels = slic(face, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
        flat = face.reshape(-1, 3).astype(np.float64)
        ids = labels.reshape(-1)
        counts = np.bincount(ids)
        # Mean colour per segment, one bincount per channel (no Python loop over segments).
        means = np.stack([np.bincount(ids, weights=flat[:, c], minlength=len(counts)) for c in range(3)], axis=1)
        means /= np.maximum(counts, 1)[:, None]
        out[i] = np.clip(np.rint(means[labels]), 0, 255).astype(np.uint8)
    return out


BASELINES: dict[str, FaceBaseline] = {
    "blur": blur_faces,
    "superpixel": superpixel_faces,
}
