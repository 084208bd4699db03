"""The public → private path on real footage, without Ray or Prefect.

The learned-path plumbing test uses the exactly invertible keyed permutation as (U_e, U_d)
on a lossless public file with nothing sealed, so any misalignment in crop / paste /
payload / encode / noise shows up as a pixel error that no training could hide. The
sealed path is then checked in the release format and against every way a file can lose
or change its sealed data.
"""
from __future__ import annotations

import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from catalogs import CatalogStore
from models.registry import build_pair
from tasks.datapath import stego
from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import probe, read_frames
from tasks.datapath.deidentify import FaceSwapper, load_face_pair, load_pipeline_pair, save_face_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import (
    DataKey,
    NotARecipientError,
    envelope_to_bytes,
    generate_key_pair,
    parse_private_key,
    wrap_data_key,
)
from tasks.datapath.reconstruct import NothingToRestore, reconstruct_video
from tasks.datapath.video_loop import PipelineSettings

# Two boxes per frame: with roi_scale 1.0 the first head ROI is exactly 64×64, the second 90×90.
BOX_64 = (100.0, 60.0, 164.0, 124.0)
BOX_90 = (400.0, 150.0, 490.0, 240.0)


class FixedBoxDetector:
    """Test double for MTCNN: the same boxes in every frame, so ROI sizes are under the test's control."""

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        boxes = np.array([[*BOX_64, 0.99], [*BOX_90, 0.98]], dtype=np.float32)
        return [boxes.copy() for _ in frames]


AUTHORITY = parse_private_key(generate_key_pair()[0])
STRANGER = parse_private_key(generate_key_pair()[0])
PERMUTATION = FaceSwapper(load_face_pair("keyed-permutation", None))


@pytest.fixture(scope="module")
def key() -> DataKey:
    """The plumbing video's data key, fixed so the tests can recompute payload and noise."""
    return DataKey(b"plumbing test data key......1234")


# release_check_frames=4 below: these tests are about the data path; the release check has its
# own (test_release_check.py), and on every frame of a keyed-permutation clip it took most of their time.
@pytest.fixture(scope="module")
def permutation_run(clips, key, tmp_path_factory):
    out = tmp_path_factory.mktemp("plumbing")
    settings = PipelineSettings(release_check_frames=4,
                                model="keyed-permutation", roi_scale=1.0, batch_size=8, public_format="x264rgb",
                                seal="none")
    swapper = PERMUTATION
    video_id = "c0ffee" * 10 + "abcd"
    catalog = CatalogStore(out / "catalogs")
    record = anonymize_video(clips["wolfgang"], out / "public.mkv", recipients=[AUTHORITY.public],
                             video_id=video_id, detector=FixedBoxDetector(), swapper=swapper, settings=settings,
                             run_id="run1", catalog=catalog, progress=False, data_key=key)
    restored = reconstruct_video(out / "public.mkv", out / "restored.mkv", private_key=AUTHORITY, swapper=swapper,
                                 settings=settings, source=clips["wolfgang"], progress=False)
    n = record.frame_count
    return dict(out=out, record=record, restored=restored, catalog=catalog, video_id=video_id,
                source=read_frames(clips["wolfgang"], range(n)),
                public=read_frames(out / "public.mkv", range(n)),
                rebuilt=read_frames(out / "restored.mkv", range(n)))


def _roi_slices(box, frame_w=640, frame_h=360):
    from tasks.datapath.track import head_roi

    x, y, w, h = head_roi(np.array(box), frame_w, frame_h, scale=1.0)
    return (slice(y, y + h), slice(x, x + w)), (x, y, w, h)


def test_public_stream_keeps_frames_fps_size_and_audio(clips, permutation_run):
    src, pub = probe(clips["wolfgang"]), probe(permutation_run["out"] / "public.mkv")
    assert (pub.frame_count, pub.width, pub.height, pub.fps_rational) == (
        src.frame_count, src.width, src.height, src.fps_rational)
    assert src.audio_streams == 1 and pub.audio_streams == 1
    rec = probe(permutation_run["out"] / "restored.mkv")
    assert rec.frame_count == src.frame_count and rec.audio_streams == 1


def test_outside_the_rois_the_public_stream_is_the_source_but_for_payload_bits(key, permutation_run):
    run = permutation_run
    (s64, _), (s90, _) = _roi_slices(BOX_64), _roi_slices(BOX_90)
    for i, (src, pub) in enumerate(zip(run["source"], run["public"])):
        payload = stego.extract(pub, key.payload_key(), expected_frame_index=i)
        carriers = stego.carrier_mask(*pub.shape[:2], payload, stego.read_envelope(pub)[0])
        outside = np.ones(pub.shape, dtype=bool)
        outside[s64] = False
        outside[s90] = False
        diff = pub.astype(int) - src.astype(int)
        assert not diff[outside & ~carriers].any(), f"frame {i}: pixels changed outside ROIs and carriers"
        assert np.abs(diff[outside & carriers]).max() <= 1
        assert (diff[s64] != 0).mean() > 0.5, "the ROI content was replaced"


def test_payload_carries_the_rois_and_sequence_ids(key, permutation_run):
    run = permutation_run
    (_, roi64), (_, roi90) = _roi_slices(BOX_64), _roi_slices(BOX_90)
    payload = stego.extract(run["public"][5], key.payload_key(), expected_frame_index=5)
    assert payload.video_id == run["video_id"] and payload.key_id == key.payload_key().key_id
    assert [(r.x, r.y, r.w, r.h) for r in payload.rois] == [roi64, roi90]
    assert len({r.seq_id for r in payload.rois}) == 2
    rois = run["catalog"].read("rois")
    assert len(rois) == 2 * run["record"].frame_count
    assert set(run["catalog"].read("sequences")["n_frames"]) == {run["record"].frame_count}


def test_64px_rois_are_restored_exactly_but_for_payload_bits(permutation_run):
    run = permutation_run
    s64, (x, y, w, h) = _roi_slices(BOX_64)
    assert (w, h) == (64, 64)
    for src, rebuilt in zip(run["source"], run["rebuilt"]):
        diff = np.abs(rebuilt[s64].astype(int) - src[s64].astype(int))
        # The payload's LSB changes inside the ROI travel through U_d as ±1 at as many pixels
        # (the payload, envelope included, is ~2.5 kbit spread over 691 200 slots).
        assert diff.max() <= 1
        assert (diff > 0).sum() <= 64, "more changed pixels than payload bits could explain"


def test_larger_rois_are_restored_up_to_the_resize_round_trip(key, permutation_run):
    run = permutation_run
    s90, (x, y, w, h) = _roi_slices(BOX_90)
    encoder, decoder = build_pair("keyed-permutation")
    payload = stego.extract(run["public"][0], key.payload_key(), expected_frame_index=0)
    noise = torch.from_numpy(key.noise(payload.rois[1].seq_id))[None, None]

    def resize(t, size):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)

    def to_uint8(t):
        return t[0].mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy().astype(int)

    x_crop = torch.from_numpy(run["source"][0][s90]).permute(2, 0, 1)[None].float() / 255
    a = encoder(resize(x_crop, (64, 64)), noise)
    a_pasted = torch.from_numpy(to_uint8(resize(a, (h, w))).astype(np.uint8)).permute(2, 0, 1)[None].float() / 255
    expected = to_uint8(resize(decoder(resize(a_pasted, (64, 64)), noise), (h, w)))
    got = run["rebuilt"][0][s90].astype(int)
    # Payload LSBs inside the ROI spread through the resizes: allow a few levels, nowhere more.
    assert np.abs(got - expected).max() <= 3
    assert np.abs(got - expected).mean() < 0.1


def test_restore_record_reports_payloads_and_psnr(permutation_run):
    restored = permutation_run["restored"]
    n = permutation_run["record"].frame_count
    assert restored.restore_path == "learned" and restored.seal == "none"
    assert restored.frames == n and restored.frames_with_payload == n and restored.frames_payload_invalid == 0
    assert restored.rois_restored == 2 * n
    assert restored.video_id == permutation_run["video_id"]
    assert restored.psnr_roi is not None and restored.psnr_roi > 10


def test_a_key_that_is_no_recipient_restores_nothing_and_writes_nothing(permutation_run, tmp_path):
    settings = PipelineSettings(release_check_frames=4, model="keyed-permutation", batch_size=8)
    with pytest.raises(NotARecipientError) as error:
        reconstruct_video(permutation_run["out"] / "public.mkv", tmp_path / "wrong.mkv", private_key=STRANGER,
                          swapper=PERMUTATION, settings=settings, progress=False)
    assert AUTHORITY.fingerprint in str(error.value) and STRANGER.fingerprint in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_forged_frame_is_left_as_it_is_and_counted(permutation_run, key, tmp_path):
    settings = PipelineSettings(release_check_frames=4,
                                model="keyed-permutation", batch_size=8, public_format="x264rgb")
    frames = permutation_run["public"].copy()
    # Re-sign frame 3's payload under another key: authentic-looking, but not this video's.
    envelope, payload = stego.read_envelope(frames[3])
    other = DataKey(b"o" * 32).payload_key()
    frames[3] = stego.embed(frames[3], stego.FramePayload(3, payload.video_id, other.key_id, payload.rois), other,
                            envelope)
    forged = tmp_path / "forged.mkv"
    from tasks.datapath.encode import VideoWriter

    with VideoWriter(forged, frames.shape[2], frames.shape[1], "25/1") as writer:
        writer.write(frames)
    record = reconstruct_video(forged, tmp_path / "rec.mkv", private_key=AUTHORITY, swapper=PERMUTATION,
                               settings=settings, progress=False)
    assert record.frames_payload_invalid == 1 and record.frames_with_payload == len(frames) - 1
    assert np.array_equal(read_frames(tmp_path / "rec.mkv", [3])[0], frames[3])


def test_frames_spliced_in_from_another_video_are_counted_not_fatal(permutation_run, tmp_path):
    """Another video's frames at 0 and 5, its envelope open to the same authority: the worst case,
    since frame 0's envelope alone would unwrap the other video's key."""
    settings = PipelineSettings(release_check_frames=4,
                                model="keyed-permutation", batch_size=8, public_format="x264rgb")
    frames = permutation_run["public"].copy()
    other_id, other_key = "feed" * 16, DataKey(b"x" * 32)
    other_envelope = envelope_to_bytes(wrap_data_key(other_key, [AUTHORITY.public], other_id))
    spliced_rois = 0
    for f in (0, 5):
        _, payload = stego.read_envelope(frames[f])
        spliced_rois += len(payload.rois)
        frames[f] = stego.embed(frames[f], stego.FramePayload(f, other_id, other_key.payload_key().key_id,
                                                              payload.rois), other_key.payload_key(), other_envelope)
    spliced = tmp_path / "spliced.mkv"
    from tasks.datapath.encode import VideoWriter

    with VideoWriter(spliced, frames.shape[2], frames.shape[1], "25/1") as writer:
        writer.write(frames)
    record = reconstruct_video(spliced, tmp_path / "rec.mkv", private_key=AUTHORITY, swapper=PERMUTATION,
                               settings=settings, progress=False)
    assert record.video_id == permutation_run["video_id"]
    assert record.frames_payload_invalid == 2 and record.frames_with_payload == len(frames) - 2
    assert spliced_rois > 0 and record.rois_restored == permutation_run["restored"].rois_restored - spliced_rois
    assert np.array_equal(read_frames(tmp_path / "rec.mkv", [0, 5]), frames[[0, 5]])
    assert np.array_equal(read_frames(tmp_path / "rec.mkv", [1])[0], permutation_run["rebuilt"][1])


def test_unet_weights_file_loads_and_anonymizes_a_real_clip(clips, key, tmp_path):
    torch.manual_seed(0)
    encoder, decoder = build_pair("uunet", {"widths": [8, 16, 32, 64]})
    weights = save_face_pair(tmp_path / "tiny.pt", "uunet", encoder, decoder, {"widths": [8, 16, 32, 64]})
    swapper = FaceSwapper(load_face_pair("uunet", weights))
    settings = PipelineSettings(release_check_frames=4, model="uunet", weights=str(weights), batch_size=8)
    settings = PipelineSettings(**{**settings.__dict__, "public_format": "x264rgb"})
    record = anonymize_video(clips["carphone"], tmp_path / "pub.mkv", recipients=[AUTHORITY.public],
                             video_id="ab" * 32, detector=FaceDetector(batch_size=8), swapper=swapper,
                             settings=settings, run_id="r", progress=False, data_key=key)
    assert record.frame_count == 16 and record.faces >= 12, "the carphone face is found in most frames"
    src, pub = read_frames(clips["carphone"], [3])[0], read_frames(tmp_path / "pub.mkv", [3])[0]
    payload = stego.extract(pub, key.payload_key(), expected_frame_index=3)
    (r,) = payload.rois
    assert np.abs(pub[r.y:r.y + r.h, r.x:r.x + r.w].astype(int) - src[r.y:r.y + r.h, r.x:r.x + r.w]).mean() > 5


def test_odd_sized_footage_round_trips(clips, key, tmp_path):
    import subprocess

    import imageio_ffmpeg

    odd = tmp_path / "odd.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(clips["carphone"]),
                    "-vf", "scale=175:143", "-c:v", "libx264rgb", "-qp", "0", str(odd)], check=True)
    settings = PipelineSettings(release_check_frames=4,
                                batch_size=8, seal="exact")  # h264: an odd size keeps full chroma
    record = anonymize_video(odd, tmp_path / "pub.mkv", recipients=[AUTHORITY.public], video_id="0d" * 32,
                             detector=FaceDetector(batch_size=8), swapper=PERMUTATION, settings=settings,
                             run_id="r", progress=False)
    restored = reconstruct_video(tmp_path / "pub.mkv", tmp_path / "rec.mkv", private_key=AUTHORITY,
                                 swapper=PERMUTATION, settings=settings, source=odd, progress=False)
    assert (probe(tmp_path / "pub.mkv").width, probe(tmp_path / "pub.mkv").height) == (175, 143)
    info = probe(tmp_path / "rec.mkv")
    assert (info.width, info.height, info.frame_count) == (175, 143, 16)
    assert record.faces > 0 and restored.rois_restored == record.faces and restored.psnr_roi == float("inf")


def test_the_bundled_weights_anonymize_and_restore_a_real_clip(clips, key, tmp_path):
    """The default model (the trained U-Nets of models/weights/, see MODEL_CARD.md), on its learned path."""
    settings = PipelineSettings(release_check_frames=4, batch_size=8, public_format="x264rgb", seal="none")
    assert settings.model == "uunet"
    swapper = FaceSwapper(load_face_pair(settings.model, None))
    record = anonymize_video(clips["wolfgang"], tmp_path / "pub.mkv", recipients=[AUTHORITY.public],
                             video_id="be" * 32, detector=FaceDetector(batch_size=8), swapper=swapper,
                             settings=settings, run_id="r", progress=False, data_key=key)
    restored = reconstruct_video(tmp_path / "pub.mkv", tmp_path / "rec.mkv", private_key=AUTHORITY, swapper=swapper,
                                 settings=settings, source=clips["wolfgang"], progress=False)
    assert record.faces == record.frame_count == 24
    assert restored.rois_restored == record.faces and restored.restore_path == "learned"
    # The public face differs from the source far more than the restored one does.
    src = read_frames(clips["wolfgang"], [10])[0].astype(int)
    (r,) = stego.extract(read_frames(tmp_path / "pub.mkv", [10])[0], key.payload_key(), expected_frame_index=10).rois
    roi = (slice(r.y, r.y + r.h), slice(r.x, r.x + r.w))
    public = read_frames(tmp_path / "pub.mkv", [10])[0].astype(int)
    rebuilt = read_frames(tmp_path / "rec.mkv", [10])[0].astype(int)
    assert np.abs(rebuilt[roi] - src[roi]).mean() < 0.8 * np.abs(public[roi] - src[roi]).mean()


def _ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def release_run(clips, tmp_path_factory):
    """The defaults: h264 public file, originals sealed `high`, two authorities; the bundled weights
    as the data path picks them (the public-only U_e, the joint U_d)."""
    out = tmp_path_factory.mktemp("release")
    settings = PipelineSettings(batch_size=8)
    assert (settings.public_format, settings.seal) == ("h264", "high")
    swapper = FaceSwapper(load_pipeline_pair(settings.model, None, settings.seal))
    second = parse_private_key(generate_key_pair()[0])
    record = anonymize_video(clips["wolfgang"], out / "pub.mkv", recipients=[AUTHORITY.public, second.public],
                             video_id="5e" * 32, detector=FaceDetector(batch_size=8), swapper=swapper,
                             settings=settings, run_id="r", progress=False)
    restored = reconstruct_video(out / "pub.mkv", out / "rec.mkv", private_key=second, swapper=swapper,
                                 settings=settings, source=clips["wolfgang"], progress=False)
    return dict(out=out, record=record, restored=restored, settings=settings, swapper=swapper)


def test_the_release_format_restores_the_sealed_faces_within_42_db(clips, release_run):
    record, restored = release_run["record"], release_run["restored"]
    assert record.faces == 24 and record.sealed_bytes > 0
    assert record.public_bytes < 2 * clips["wolfgang"].stat().st_size + 2 * record.sealed_bytes
    assert restored.restore_path == "sealed" and restored.seal == "high"
    assert restored.rois_restored == record.faces and restored.chunks_failed == 0 < restored.chunks_total
    assert restored.psnr_roi >= 42.0  # measured on the lossless working copy as written
    assert restored.frames_payload_invalid == 0  # a lossy file has no payload, and that is no fault
    public = release_run["out"] / "pub.mkv"
    report = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(public)],
                            capture_output=True, text=True).stderr
    assert "h264" in report and "yuv420p" in report and "Attachment" in report and "Audio" in report


def test_each_authority_reverses_alone(clips, release_run, tmp_path):
    alone = reconstruct_video(release_run["out"] / "pub.mkv", tmp_path / "a.mkv", private_key=AUTHORITY,
                              swapper=release_run["swapper"], settings=release_run["settings"], progress=False)
    assert alone.rois_restored == release_run["record"].faces
    assert np.array_equal(read_frames(tmp_path / "a.mkv", [5]), read_frames(release_run["out"] / "rec.mkv", [5]))


def test_a_remux_keeps_the_sealed_data(release_run, tmp_path):
    _ffmpeg("-i", str(release_run["out"] / "pub.mkv"), "-map", "0", "-c", "copy", str(tmp_path / "remux.mkv"))
    again = reconstruct_video(tmp_path / "remux.mkv", tmp_path / "rec.mkv", private_key=AUTHORITY,
                              swapper=release_run["swapper"], settings=release_run["settings"], progress=False)
    assert again.restore_path == "sealed" and again.rois_restored == release_run["record"].faces
    assert np.array_equal(read_frames(tmp_path / "rec.mkv", [7]), read_frames(release_run["out"] / "rec.mkv", [7]))


def test_a_lossy_file_stripped_of_its_sealed_data_has_nothing_to_restore(release_run, tmp_path):
    _ffmpeg("-i", str(release_run["out"] / "pub.mkv"), "-map", "0", "-map", "-0:t", "-c", "copy",
            str(tmp_path / "stripped.mkv"))
    with pytest.raises(NothingToRestore, match="attachment was stripped"):
        reconstruct_video(tmp_path / "stripped.mkv", tmp_path / "rec.mkv", private_key=AUTHORITY,
                          swapper=release_run["swapper"], settings=release_run["settings"], progress=False)
    assert not (tmp_path / "rec.mkv").exists()


def test_exact_sealing_restores_every_roi_pixel_and_a_stripped_lossless_file_falls_back(clips, key, tmp_path):
    settings = PipelineSettings(release_check_frames=4,
                                model="keyed-permutation", roi_scale=1.0, batch_size=8, public_format="ffv1",
                                seal="exact")
    record = anonymize_video(clips["wolfgang"], tmp_path / "pub.mkv", recipients=[AUTHORITY.public],
                             video_id="e1" * 32, detector=FixedBoxDetector(), swapper=PERMUTATION,
                             settings=settings, run_id="r", progress=False, data_key=key)
    exact = reconstruct_video(tmp_path / "pub.mkv", tmp_path / "rec.mkv", private_key=AUTHORITY,
                              swapper=PERMUTATION, settings=settings, source=clips["wolfgang"], progress=False)
    assert exact.restore_path == "sealed" and exact.psnr_roi == float("inf")
    assert exact.rois_restored == record.faces == 2 * record.frame_count
    # Without its attachment, the lossless file still carries ROIs and the wrapped key in its pixels.
    _ffmpeg("-i", str(tmp_path / "pub.mkv"), "-map", "0", "-map", "-0:t", "-c", "copy", str(tmp_path / "bare.mkv"))
    learned = reconstruct_video(tmp_path / "bare.mkv", tmp_path / "rec2.mkv", private_key=AUTHORITY,
                                swapper=PERMUTATION, settings=settings, source=clips["wolfgang"], progress=False)
    assert learned.restore_path == "learned" and learned.rois_restored == record.faces
    assert learned.frames_with_payload == record.frame_count and learned.seal is None


def test_with_sealed_originals_the_public_face_covers_only_the_face_region(clips, key, tmp_path):
    """Sealed: the public face is blended over the face region and the rest of the box stays the source."""
    from tasks.datapath.track import face_region

    settings = PipelineSettings(release_check_frames=4,
                                model="keyed-permutation", roi_scale=1.0, batch_size=8, public_format="x264rgb",
                                seal="exact")
    anonymize_video(clips["wolfgang"], tmp_path / "pub.mkv", recipients=[AUTHORITY.public], video_id="e2" * 32,
                    detector=FixedBoxDetector(), swapper=PERMUTATION, settings=settings, run_id="r",
                    progress=False, data_key=key)
    restored = reconstruct_video(tmp_path / "pub.mkv", tmp_path / "rec.mkv", private_key=AUTHORITY,
                                 swapper=PERMUTATION, settings=settings, source=clips["wolfgang"], progress=False)
    assert restored.restore_path == "sealed" and restored.psnr_roi == float("inf")
    (s90, (_, _, w, h)) = _roi_slices(BOX_90)
    weights = face_region(w, h)
    source, public = read_frames(clips["wolfgang"], range(4)), read_frames(tmp_path / "pub.mkv", range(4))
    for src, pub in zip(source, public):
        diff = np.abs(pub[s90].astype(int) - src[s90].astype(int)).max(axis=2)
        assert diff[weights == 0].max() <= 1  # the source, but for the payload's LSBs
        assert (diff[weights == 1] > 1).mean() > 0.5  # the face itself is replaced
