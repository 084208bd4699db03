from pathlib import Path

import decord
import numpy as np
import pytest
import torch
from PIL import Image

from models.mtcnn import area_pyramid, grouped_nms
from tasks.datapath.detect import DetectionSchedule, FaceDetector, boxes_agree, opencv_area_pyramid

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


@pytest.mark.parametrize("size", [(26, 37), (12, 13), (29, 41)])
def test_the_opencv_pyramid_the_cpu_detector_uses_is_tensorflow_area_too(size):
    image = np.random.default_rng(1).integers(0, 256, (2, 37, 53, 3), dtype=np.uint8)
    (level,) = opencv_area_pyramid(torch.from_numpy(image), [size])
    assert level.shape == (2, 3, *size)
    for frame, resized in zip(image, level):
        expected = _tensorflow_resize_area(frame.astype(np.float32), *size)
        np.testing.assert_allclose(resized.permute(1, 2, 0).numpy(), expected, atol=1e-2)


def test_nms_drops_boxes_overlapping_any_better_box_even_a_dropped_one():
    # A overlaps B, B overlaps C, A and C are apart. Greedy NMS would keep C;
    # the reference compares C with every better box, so C goes too.
    boxes = torch.tensor([[0, 0, 10, 10], [2, 0, 12, 10], [4, 0, 14, 10],
                          [0, 0, 10, 10]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.5])
    groups = torch.tensor([0, 0, 0, 1])  # the last box is alone in its group
    kept = grouped_nms(boxes, scores, groups, threshold=0.5).tolist()
    assert kept == [0, 3]


def _box(x, y, side, score=0.99):
    return [x, y, x + side, y + side, score]


def test_boxes_agree_pairs_faces_one_to_one_by_iou():
    a = np.array([_box(0, 0, 100), _box(300, 0, 50)], np.float32)
    assert boxes_agree(a, a[::-1])  # order does not matter
    assert boxes_agree(a, a + [10, 0, 10, 0, 0])  # IoU 90/110 = 0.82
    assert not boxes_agree(a, a + [40, 0, 40, 0, 0])  # IoU 60/140 = 0.43 for the big one
    assert not boxes_agree(a, a[:1])  # a face left
    assert not boxes_agree(np.zeros((0, 5)), a[:1])  # a face came
    assert boxes_agree(np.zeros((0, 5)), np.zeros((0, 5)))
    # Two boxes near one: the second has no partner of its own.
    assert not boxes_agree(np.array([_box(0, 0, 100), _box(5, 0, 100)]), np.array([_box(0, 0, 100), _box(300, 0, 50)]))


class _ScriptedDetector:
    """Boxes by frame content: a frame whose pixel [0, 0, 0] is v > 0 holds one face at x = v."""

    def __init__(self):
        self.calls: list[int] = []

    def detect(self, frames):
        out = []
        for frame in frames:
            value = int(frame[0, 0, 0])
            self.calls.append(int(frame[0, 0, 1]))  # the frame's index, written by the test
            out.append(np.array([_box(value, 20, 40)], np.float32) if value else np.zeros((0, 5), np.float32))
        return out


def _frames(face_x: list[int], first: int = 0) -> np.ndarray:
    frames = np.zeros((len(face_x), 4, 4, 3), np.uint8)
    frames[:, 0, 0, 0] = face_x
    frames[:, 0, 0, 1] = np.arange(first, first + len(face_x))
    return frames


def test_a_face_moving_steadily_agrees_within_max_shift_of_its_side():
    a = np.array([_box(0, 0, 100), _box(300, 0, 50)], np.float32)
    moved = a + [[40, 0, 40, 0, 0], [10, 0, 10, 0, 0]]  # the big face 40 px right (IoU 0.43, centre 0.4
    # of its side away), the small one 10 px (IoU 0.67)
    assert not boxes_agree(a, moved)  # by IoU alone: disagree
    assert boxes_agree(a, moved, max_shift=0.5)
    assert not boxes_agree(a, moved, max_shift=0.3)
    assert not boxes_agree(a, a + [40, 0, 40, 0, 0], max_shift=0.5)  # the small face: 0.8 of its side
    grown = np.array([[0, 0, 130, 130, 0.9]], np.float32)  # 100 -> 130 px: more than MAX_SIDE_CHANGE
    assert not boxes_agree(a[:1], grown, min_iou=0.9, max_shift=0.5)
    assert boxes_agree(a[:1], np.array([[0, 0, 120, 120, 0.9]], np.float32), min_iou=0.9, max_shift=0.5)
    # Two faces each 3 sides from where they were: new faces, not the same ones moving.
    assert not boxes_agree(np.array([_box(0, 0, 50), _box(300, 0, 50)]),
                           np.array([_box(150, 0, 50), _box(450, 0, 50)]), max_shift=0.5)


def test_schedule_detects_every_nth_frame_while_the_faces_agree():
    scripted = _ScriptedDetector()
    schedule = DetectionSchedule(scripted, every=4)
    # No face in the first batch, then a steady face from frame 8 on.
    schedule.detect(_frames([0] * 8))
    assert scripted.calls == [3, 7]
    found = schedule.detect(_frames([50] * 8, first=8))
    # 8..10 lie between frame 7 (no face) and 11 (a face): detected in full; 12..14 agree, skipped.
    assert scripted.calls == [3, 7, 11, 15, 8, 9, 10]
    assert [len(f) for f in found] == [1, 1, 1, 1, 0, 0, 0, 1]
    assert schedule.frames_detected == 7 and schedule.frames_seen == 16


def test_schedule_detects_the_frames_between_two_that_disagree_across_a_batch_border():
    scripted = _ScriptedDetector()
    schedule = DetectionSchedule(scripted, every=4)
    schedule.detect(_frames([50] * 6))  # a face from the first frame: 0..2 are detected too
    assert scripted.calls == [3, 5, 0, 1, 2]
    scripted.calls.clear()
    # The face jumps by 30 px (IoU 10/70) at frame 8: frames 6 and 7 (after the batch's last detected
    # frame, 5) are detected as well. A batch shorter than `every` is detected at its last frame.
    found = schedule.detect(_frames([50, 50, 80], first=6))
    assert scripted.calls == [8, 6, 7]
    assert [f[0, 0] for f in found] == [50, 50, 80]


def test_every_one_is_plain_detection():
    scripted = _ScriptedDetector()
    schedule = DetectionSchedule(scripted, every=1)
    schedule.detect(_frames([0, 50, 50]))
    assert scripted.calls == [0, 1, 2]
    with pytest.raises(ValueError):
        DetectionSchedule(scripted, every=0)


def test_a_detect_stride_the_tracker_cannot_bridge_is_refused():
    from tasks.datapath.video_loop import PipelineSettings

    assert PipelineSettings(max_gap=3, detect_every=4).detect_every == 4
    with pytest.raises(ValueError, match="detect_every"):
        PipelineSettings(max_gap=2, detect_every=4)


def test_a_face_entering_between_two_detected_frames_is_hidden_from_its_first_frame(detector):
    from tasks.datapath.track import FaceTracker

    # Real footage: five frames without anyone (the face blacked out), then the woman from frame 5,
    # between the detected frames 3 and 7 of a stride of 4.
    frames = decord.VideoReader(str(WOLFGANG)).get_batch(list(range(100, 116))).asnumpy()
    frames[:5] = 0
    schedule = DetectionSchedule(detector, every=4)
    tracker = FaceTracker(frames.shape[2], frames.shape[1], max_gap=8)
    for i, faces in enumerate(schedule.detect(frames)):
        tracker.update(i, faces)
    rois = dict(tracker.finish())
    assert [bool(rois[f]) for f in range(5)] == [False] * 5
    assert all(rois[f] for f in range(5, 16))
    # Detected: the anchors 3, 7, 11, 15 and, between 3 and 7, the frames 4, 5, 6; where 7, 11
    # and 15 agree, the frames between are bridged by the tracker.
    assert schedule.frames_detected == 7
    assert all(rois[f][0].interpolated for f in (8, 9, 10, 12, 13, 14))
