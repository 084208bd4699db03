import numpy as np
import pytest

from tasks.datapath.track import FaceTracker, head_roi


def _det(x, y, s=40, p=0.99):
    return np.array([[x, y, x + s, y + s, p]], dtype=np.float32)


NONE = np.zeros((0, 5), dtype=np.float32)


def _run(tracker, detections):
    released = []
    for i, d in enumerate(detections):
        tracker.update(i, d)
        released += tracker.pop_ready()
    return released + tracker.finish()


def test_gap_inside_a_track_is_filled_by_interpolation():
    dets = [_det(100 + 2 * i, 50) for i in range(5)] + [NONE] * 3 + [_det(116, 50)]
    frames = _run(FaceTracker(640, 360, max_gap=4), dets)
    assert [f for f, _ in frames] == list(range(9)), "every frame released once, in order"
    assert all(len(rois) == 1 for _, rois in frames)
    assert {r.seq_id for _, rois in frames for r in rois} == {0}
    gap = [rois[0] for f, rois in frames if f in (5, 6, 7)]
    assert all(r.interpolated and r.score is None for r in gap)
    # Linear interpolation between x=108 (frame 4) and x=116 (frame 8): centres move 2 px a frame.
    xs = [r.x for r in gap]
    assert xs == sorted(xs) and xs[0] < xs[-1]


def test_gap_longer_than_max_gap_starts_a_new_sequence():
    dets = [_det(100, 50)] * 3 + [NONE] * 6 + [_det(100, 50)] * 2
    frames = _run(FaceTracker(640, 360, max_gap=4), dets)
    assert [len(rois) for _, rois in frames] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    assert [rois[0].seq_id for _, rois in frames if rois] == [0, 0, 0, 1, 1]


def test_two_faces_keep_their_own_sequences():
    dets = [np.concatenate([_det(50 + i, 50), _det(400 - i, 60)]) for i in range(10)]
    frames = _run(FaceTracker(640, 360), dets)
    left = {r.seq_id for _, rois in frames for r in rois if r.x < 200}
    right = {r.seq_id for _, rois in frames for r in rois if r.x > 200}
    assert len(left) == 1 and len(right) == 1 and left != right


def test_release_waits_for_the_gap_window_and_memory_stays_bounded():
    tracker = FaceTracker(640, 360, max_gap=5)
    for i in range(100):
        tracker.update(i, _det(100, 100))
        ready = tracker.pop_ready()
        if i >= 6:
            assert [f for f, _ in ready] == [i - 6]
    track = tracker._active[0]
    assert len(track.boxes) <= 7, "released boxes are forgotten"
    tracker.finish()
    (seq,) = tracker.sequences
    assert (seq.first_frame, seq.last_frame, seq.n_frames, seq.n_detected) == (0, 99, 100, 100)
    assert seq.mean_score == pytest.approx(0.99, abs=1e-6)


def test_out_of_order_frames_are_refused():
    tracker = FaceTracker(64, 64)
    tracker.update(0, NONE)
    with pytest.raises(ValueError):
        tracker.update(2, NONE)


def test_head_roi_is_square_enlarged_and_clipped():
    x, y, w, h = head_roi(np.array([100.0, 100.0, 140.0, 150.0]), 640, 360, scale=1.2)
    assert w == h and w >= 60 and abs((x + w / 2) - 120) <= 1 and abs((y + h / 2) - 125) <= 1
    x, y, w, h = head_roi(np.array([-10.0, 330.0, 30.0, 370.0]), 640, 360)
    assert x == 0 and y + h == 360 and w < 52 and h < 52
