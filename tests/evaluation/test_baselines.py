"""The irreversible baselines: shapes, what they keep (mean colour) and what they destroy (detail)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.datapath.decode import read_frames
from tasks.evaluation.baselines import BASELINES, blur_faces, superpixel_faces
from tasks.judges import YuNetDetector

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.fixture(scope="module")
def real_faces() -> np.ndarray:
    """64×64 head crops of frame 0 of two bundled clips, found by YuNet (independent of our MTCNN)."""
    crops = []
    for name in ("carphone_pristine.mp4", "WolfgangLanger_Pexels.mp4"):
        frame = read_frames(SAMPLES / name, [0])[0]
        x1, y1, x2, y2, _ = YuNetDetector().detect(frame)[0]
        side = int(max(x2 - x1, y2 - y1))
        cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
        top, left = max(0, cy - side // 2), max(0, cx - side // 2)
        crop = frame[top : top + side, left : left + side]
        crops.append(cv2.resize(crop, (64, 64), interpolation=cv2.INTER_AREA))
    return np.stack(crops)


def test_registry_names_both_baselines():
    assert BASELINES == {"blur": blur_faces, "superpixel": superpixel_faces}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_shape_and_dtype_are_kept(name, real_faces):
    out = BASELINES[name](real_faces)
    assert out.shape == real_faces.shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_rejects_anything_but_uint8_rgb_batches(name):
    with pytest.raises(ValueError):
        BASELINES[name](np.zeros((64, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError):
        BASELINES[name](np.zeros((1, 64, 64, 3), dtype=np.float32))


def test_blur_keeps_a_constant_image_exactly():
    faces = np.full((2, 64, 64, 3), (200, 31, 77), dtype=np.uint8)
    assert np.array_equal(blur_faces(faces, factor=8), faces)


def test_blur_removes_detail_finer_than_the_factor():
    # A one-pixel checkerboard averages to flat grey in every 8×8 block.
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    faces = np.repeat(checker[None, :, :, None], 3, axis=3)
    out = blur_faces(faces, factor=8).astype(int)
    assert np.abs(out - 127).max() <= 1


def test_superpixels_have_about_n_segments_colours(real_faces):
    out = superpixel_faces(real_faces, n_segments=32)
    for face in out:
        colours = np.unique(face.reshape(-1, 3), axis=0)
        # SLIC aims at n_segments; on a 64×64 grid it may place a few more.
        assert 4 <= len(colours) <= 40, len(colours)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_change_a_real_face_but_keep_its_mean_colour(name, real_faces):
    out = BASELINES[name](real_faces)
    for face, anon in zip(real_faces.astype(float), out.astype(float)):
        assert np.abs(anon - face).mean() > 3, "the face crop must actually change"
        mean_shift = np.abs(anon.mean(axis=(0, 1)) - face.mean(axis=(0, 1)))
        assert mean_shift.max() < 3, mean_shift
