from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from PIL import Image

from models.mtcnn import area_pyramid, grouped_nms
from tasks.datapath.detect import FaceDetector

ROOT = Path(__file__).resolve().parents[2]
ASTRONAUT = ROOT / "tests" / "data" / "astronaut.png"
WOLFGANG = ROOT / "samples" / "WolfgangLanger_Pexels.mp4"

# What the `mtcnn` 1.0.0 package (TensorFlow) reports for astronaut.png.
REFERENCE_BOX_XYWH = (182, 64, 83, 107)
REFERENCE_LANDMARKS = [(204, 100), (245, 102), (224, 126), (202, 139), (244, 140)]


@pytest.fixture(scope="module")
def detector():
    # Two OpenMP threads on a busy 2-core runner made this file 5-20x slower
    # (each parallel region waits for the descheduled thread); one is steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield FaceDetector(batch_size=16)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.array(Image.open(ASTRONAUT).convert("RGB"))


def _xywh(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box[:4]
    return np.array([x1, y1, x2 - x1, y2 - y1])


def test_astronaut_matches_the_reference_package(detector, astronaut):
    (faces,) = detector.detect(astronaut[None])
    assert faces.shape == (1, 5) and faces.dtype == np.float32
    assert np.abs(_xywh(faces[0]) - REFERENCE_BOX_XYWH).max() <= 3
    assert tuple(np.round(_xywh(faces[0])).astype(int)) == REFERENCE_BOX_XYWH  # 0.1 px margin
    assert faces[0, 4] >= 0.99

    boxes, landmarks = detector.model.detect(torch.from_numpy(astronaut)[None], return_landmarks=True)
    assert np.abs(landmarks[0][0].numpy() - np.array(REFERENCE_LANDMARKS)).max() <= 1


def test_face_found_in_nearly_every_frame_of_the_clip(detector):
    frames = decord.VideoReader(str(WOLFGANG)).get_batch(list(range(0, 472, 4))).asnumpy()
    assert len(frames) == 118
    results = detector.detect(frames)
    found = [len(faces) > 0 for faces in results]
    assert np.mean(found) >= 0.95
    # One woman in the clip: confident detections are never several per frame.
    assert max(int((faces[:, 4] > 0.95).sum()) for faces in results) == 1


def test_batched_detection_equals_frame_by_frame(detector):
    frames = decord.VideoReader(str(WOLFGANG)).get_batch([0, 90, 200, 310, 400, 471]).asnumpy()
    batched = detector.detect(frames)
    single = [detector.detect(frame[None])[0] for frame in frames]
    assert sum(len(b) for b in batched) >= 5
    for b, s in zip(batched, single):
        assert b.shape == s.shape
        np.testing.assert_allclose(b, s, atol=1e-3)


def test_black_frame_has_no_face(detector):
    (faces,) = detector.detect(np.zeros((1, 360, 640, 3), np.uint8))
    assert faces.shape == (0, 5)


def test_odd_sized_frame(detector, astronaut):
    # Astronaut at a quarter size, cut to 101 x 77: the face is ~21 x 27 px.
    small = np.array(Image.fromarray(astronaut).resize((128, 128), Image.BILINEAR))
    frame = np.ascontiguousarray(small[5:82, 20:121])
    assert frame.shape == (77, 101, 3)
    (faces,) = detector.detect(frame[None])
    assert len(faces) == 1
    expected = np.array(REFERENCE_BOX_XYWH) / 4 - [20, 5, 0, 0]
    assert np.abs(_xywh(faces[0]) - expected).max() <= 3
    assert (faces[:, [0, 2]] <= 100).all() and (faces[:, [1, 3]] <= 76).all()


def _tensorflow_resize_area(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TensorFlow's ResizeArea kernel written as plain loops (float32)."""
    in_h, in_w, _ = image.shape
    step_y, step_x = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)

    def taps(o, step, n):
        start, end = np.float32(o) * step, np.float32(o + 1) * step
        for i in range(int(np.floor(start)), int(np.ceil(end))):
            covered = min(i + 1, end) - max(i, start)
            yield min(i, n - 1), np.float32(covered)

    out = np.zeros((out_h, out_w, 3), np.float32)
    for y in range(out_h):
        for x in range(out_w):
            for iy, wy in taps(y, step_y, in_h):
                for ix, wx in taps(x, step_x, in_w):
                    out[y, x] += image[iy, ix] * wy * wx
    return out / (step_y * step_x)


@pytest.mark.parametrize("size", [(26, 37), (12, 13), (29, 41)])
def test_pyramid_resize_is_tensorflow_area(size):
    # torch's own "area" mode rounds cell borders and moves boxes by pixels.
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    (level,) = area_pyramid(torch.from_numpy(image)[None], [size])
    expected = _tensorflow_resize_area(image.astype(np.float32), *size)
    np.testing.assert_allclose(level[0].permute(1, 2, 0).numpy(), expected, atol=1e-3)


def test_nms_drops_boxes_overlapping_any_better_box_even_a_dropped_one():
    # A overlaps B, B overlaps C, A and C are apart. Greedy NMS would keep C;
    # the reference compares C with every better box, so C goes too.
    boxes = torch.tensor([[0, 0, 10, 10], [2, 0, 12, 10], [4, 0, 14, 10],
                          [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.5])
    groups = torch.tensor([0, 0, 0, 1])  # the last box is alone in its group
    kept = grouped_nms(boxes, scores, groups, threshold=0.5).tolist()
    assert kept == [0, 3]
