"""The release check on real footage: a clean public stream passes, a leaked face is caught."""
from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from catalogs import CatalogStore
from tasks.datapath import stego
from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import probe, read_frames
from tasks.datapath.deidentify import FaceSwapper, load_face_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.encode import VideoWriter
from tasks.datapath.keys import DataKey, Key, generate_key_pair, parse_public_key
from tasks.datapath.release_check import check_public_stream, is_covered, payload_rois, sample_frames
from tasks.datapath.video_loop import PipelineSettings
from tasks.judges import SFaceJudge

LEAKED = 5  # this frame's face is pasted back from the source: identity visible
UNLISTED = 17  # this frame's payload lists no ROI: its (anonymized) face is outside every ROI


def test_short_videos_are_checked_in_full():
    assert sample_frames(24, max_frames=48) == list(range(24))
    assert sample_frames(48, max_frames=48) == list(range(48))


@pytest.mark.parametrize("n", [49, 100, 472, 10_000])
def test_long_videos_are_sampled_with_first_and_last_frame_and_a_seeded_offset(n):
    frames = sample_frames(n, max_frames=48, seed=3)
    assert frames[0] == 0 and frames[-1] == n - 1
    assert len(frames) <= 48 and frames == sorted(set(frames))
    assert frames == sample_frames(n, max_frames=48, seed=3)
    stride = -(-n // 46)
    inner = [f for f in frames if f not in (0, n - 1)] or frames
    assert all(b - a == stride for a, b in zip(inner, inner[1:]))
    offsets = {sample_frames(n, max_frames=48, seed=s)[1] % stride for s in range(20)}
    assert len(offsets) > 1, "the offset must move with the seed"


def test_a_face_is_covered_only_when_an_roi_holds_its_centre_and_most_of_it():
    roi = stego.RoiRecord(100, 100, 130, 130, 0)
    assert is_covered(np.array([115, 115, 215, 215, 0.9]), [roi])  # the face box inside its x1.3 ROI
    assert is_covered(np.array([200, 200, 210, 210, 0.9]), [roi])  # a tiny box inside: hidden
    assert not is_covered(np.array([300, 100, 400, 200, 0.9]), [roi])  # elsewhere
    assert not is_covered(np.array([160, 160, 360, 360, 0.9]), [roi])  # centre inside, mostly out
    assert not is_covered(np.array([115, 115, 215, 215, 0.9]), [])


@pytest.fixture(scope="module")
def judge() -> SFaceJudge:
    return SFaceJudge()


@pytest.fixture(scope="module")
def anonymized(clips, judge, tmp_path_factory):
    """The Wolfgang clip through the default (bundled U-Net) public module, release check included."""
    out = tmp_path_factory.mktemp("release")
    # A fixed key: the virtual faces depend on the keyed noise, and a test must not pass or
    # fail with the draw of a random key.
    data_key = DataKey(hashlib.sha256(b"release-check-test-key").digest())
    detector = FaceDetector(batch_size=8)
    # Lossless, so the tampering below can re-sign in-pixel payloads.
    record = anonymize_video(clips["wolfgang"], out / "public.mkv",
                             recipients=[parse_public_key(generate_key_pair()[1])], video_id="da" * 32,
                             detector=detector, swapper=FaceSwapper(load_face_pair("uunet", None)),
                             settings=PipelineSettings(batch_size=8, public_format="x264rgb"), run_id="r",
                             judge=judge, progress=False, data_key=data_key)
    return dict(out=out, key=data_key.payload_key(), detector=detector, record=record)


def test_a_normally_anonymized_clip_passes(anonymized):
    record = anonymized["record"]
    assert record.faces == record.frame_count == record.frames_checked == 24
    assert not record.needs_review and record.review_frames == [] and record.review_reason is None
    assert record.seconds["release_check"] > 0


def _tamper(public: Path, source: Path, dest: Path, key: Key) -> None:
    """Rewrite the public stream: LEAKED's ROI shows the source face under a valid payload, and
    UNLISTED shows the source face while its payload lists no ROI (a face the tracker missed)."""
    info = probe(public)
    frames = read_frames(public, range(info.frame_count))
    original = read_frames(source, [LEAKED])[0]
    leaked = stego.extract(frames[LEAKED], key, expected_frame_index=LEAKED)
    envelope = stego.read_envelope(frames[LEAKED])[0]  # before the paste overwrites carrier bits
    for r in leaked.rois:
        frames[LEAKED][r.y : r.y + r.h, r.x : r.x + r.w] = original[r.y : r.y + r.h, r.x : r.x + r.w]
    frames[LEAKED] = stego.embed(frames[LEAKED], leaked, key, envelope)  # still an authentic payload
    unlisted = stego.extract(frames[UNLISTED], key, expected_frame_index=UNLISTED)
    real = read_frames(source, [UNLISTED])[0]
    for r in unlisted.rois:
        frames[UNLISTED][r.y : r.y + r.h, r.x : r.x + r.w] = real[r.y : r.y + r.h, r.x : r.x + r.w]
    frames[UNLISTED] = stego.embed(frames[UNLISTED], stego.FramePayload(
        UNLISTED, unlisted.video_id, key.key_id, ()), key, envelope)
    with VideoWriter(dest, info.width, info.height, info.fps_rational) as writer:
        writer.write(frames)


def test_a_leaked_face_and_an_unlisted_face_are_flagged_at_their_frames(anonymized, clips, judge):
    out, key = anonymized["out"], anonymized["key"]
    _tamper(out / "public.mkv", clips["wolfgang"], out / "tampered.mkv", key)
    verdict = check_public_stream(out / "tampered.mkv", clips["wolfgang"], payload_rois(key), anonymized["detector"],
                                  judge=judge, frames=sample_frames(24, 48))
    assert verdict.checked_frames == list(range(24))
    assert verdict.identity_match_frames == [LEAKED]
    assert verdict.face_outside_frames == [UNLISTED]
    assert verdict.needs_review and verdict.seconds > 0
    assert verdict.reason == (f"face outside ROIs at frames {UNLISTED}; "
                              f"identity still recognisable at frames {LEAKED}")


def test_the_videos_row_carries_the_review_and_the_catalog_keeps_it(tmp_path):
    from flows.anonymize import _video_row

    source = tmp_path / "cam.mp4"
    source.write_bytes(b"x")
    record = dict(width=640, height=360, frame_count=24, fps=24.0, fps_rational="24/1", audio_streams=0,
                  faces=24, sequences=1, frames_with_faces=24, frames_detected=9, output_path="out.mkv", public_bytes=10,
                  sealed_bytes=4, seal_psnr_db=42.3, seal_min_psnr_db=41.9,
                  seconds={"total": 2.0}, needs_review=True, review_frames=[5, 17],
                  review_reason="identity still recognisable at frames 5,17")
    row = _video_row("r1", source, "ab", PipelineSettings(), "0" * 16,
                     datetime.now(timezone.utc), "needs_review", record)
    store = CatalogStore(tmp_path / "catalogs")
    store.write_part("videos", "r1", "ab", [row])
    (back,) = store.read("videos").to_dict("records")
    assert (back["status"], back["review_frames"], back["review_reason"]) == (
        "needs_review", "5,17", "identity still recognisable at frames 5,17")
    assert (back["public_format"], back["seal"], back["recipients"], back["sealed_bytes"]) == (
        "h264", "high", "0" * 16, 4)
    assert (back["seal_psnr_db"], back["seal_min_psnr_db"], back["frames_detected"]) == (42.3, 41.9, 9)


def test_the_check_shared_out_among_workers_checks_the_same_frames_as_one(anonymized, clips, judge):
    from tasks.datapath.anonymize import VideoRecord, check_release, check_release_shared

    out, record = anonymized["out"], anonymized["record"]
    data_key = DataKey(hashlib.sha256(b"release-check-test-key").digest())
    settings = PipelineSettings(batch_size=8, public_format="x264rgb")
    shares: list[list[int]] = []
    lock = threading.Lock()  # one detector and judge here; each worker has its own

    def call(method, public, source, video_id, key, frames):  # three workers, in this process
        assert method == "check_frames"
        with lock:
            shares.append(frames)
            return check_release(public, source, video_id, key, frames, settings.public_format,
                                 anonymized["detector"], judge)

    written = VideoRecord(record.video_id, record.source_path, record.output_path, frame_count=record.frame_count,
                          seconds={"total": 1.0})
    assert written.needs_review is None  # unchecked: the flow refuses to call this done
    check_release_shared(call, 3, out / "public.mkv", clips["wolfgang"], written, data_key, settings)
    assert sorted(shares) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]
    assert (written.frames_checked, written.needs_review, written.review_frames) == (24, False, [])
    # The longest of the three shares, not their sum (they run side by side on the workers).
    assert 0 < written.seconds["total"] - 1.0 < written.seconds["release_check"]


def test_flagged_frames_of_every_share_reach_the_record():
    from tasks.datapath.anonymize import VideoRecord, check_release_shared
    from tasks.datapath.release_check import ReleaseVerdict

    video_id = "ab" * 32
    sample = sample_frames(60, 48, seed=int(video_id[:15], 16))
    outside, identity = {sample[1], sample[-1]}, {sample[len(sample) // 2 + 1]}  # in the first and the last share

    def call(method, public, source, video_id, key, frames):
        return ReleaseVerdict(frames, [f for f in frames if f in outside], [f for f in frames if f in identity], 0.1)

    record = VideoRecord(video_id, "s.mp4", "p.mkv", frame_count=60)
    check_release_shared(call, 2, "p.mkv", "s.mp4", record, DataKey(b"k" * 32), PipelineSettings())
    assert record.frames_checked == len(sample) and record.needs_review
    # Each share took 0.1 s of a worker: 0.2 s of checking, 0.1 s of the video's time.
    assert record.seconds == pytest.approx({"release_check": 0.2, "total": 0.1})
    assert record.review_frames == sorted(outside | identity)
    assert record.review_reason == (f"face outside ROIs at frames {sample[1]},{sample[-1]}; "
                                    f"identity still recognisable at frames {sample[len(sample) // 2 + 1]}")
