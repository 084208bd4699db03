"""The public → private path on real footage, without Ray or Prefect.

The plumbing test uses the exactly invertible keyed permutation as (U_e, U_d), so any
misalignment in crop / paste / payload / encode / noise shows up as a pixel error that
no training could hide.
"""
from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from catalogs import CatalogStore
from models.registry import build_pair
from tasks.datapath import stego
from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import probe, read_frames
from tasks.datapath.deidentify import FaceSwapper, load_face_pair, save_face_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import Key, keyed_noise
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.video_loop import PipelineSettings

# Two boxes per frame: with roi_scale 1.0 the first head ROI is exactly 64×64, the second 90×90.
BOX_64 = (100.0, 60.0, 164.0, 124.0)
BOX_90 = (400.0, 150.0, 490.0, 240.0)


class FixedBoxDetector:
    """Test double for MTCNN: the same boxes in every frame, so ROI sizes are under the test's control."""

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        boxes = np.array([[*BOX_64, 0.99], [*BOX_90, 0.98]], dtype=np.float32)
        return [boxes.copy() for _ in frames]


@pytest.fixture(scope="module")
def key() -> Key:
    return Key(secrets.token_bytes(32))


@pytest.fixture(scope="module")
def permutation_run(clips, key, tmp_path_factory):
    out = tmp_path_factory.mktemp("plumbing")
    settings = PipelineSettings(model="keyed-permutation", roi_scale=1.0, batch_size=8)
    swapper = FaceSwapper(load_face_pair("keyed-permutation", None))
    video_id = "c0ffee" * 10 + "abcd"
    catalog = CatalogStore(out / "catalogs")
    record = anonymize_video(clips["wolfgang"], out / "public.mkv", key=key, video_id=video_id,
                             detector=FixedBoxDetector(), swapper=swapper, settings=settings,
                             run_id="run1", catalog=catalog, progress=False)
    restored = reconstruct_video(out / "public.mkv", out / "restored.mkv", key=key, swapper=swapper,
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
        payload = stego.extract(pub, key, expected_frame_index=i)
        carriers = stego.carrier_mask(*pub.shape[:2], key, payload)
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
    payload = stego.extract(run["public"][5], key, expected_frame_index=5)
    assert payload.video_id == run["video_id"] and payload.key_id == key.key_id
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
        # The payload's LSB changes inside the ROI travel through U_d as ±1 at as many pixels.
        assert diff.max() <= 1
        assert (diff > 0).sum() <= 64, "more changed pixels than payload bits could explain"


def test_larger_rois_are_restored_up_to_the_resize_round_trip(key, permutation_run):
    run = permutation_run
    s90, (x, y, w, h) = _roi_slices(BOX_90)
    encoder, decoder = build_pair("keyed-permutation")
    payload = stego.extract(run["public"][0], key, expected_frame_index=0)
    noise = torch.from_numpy(keyed_noise(key, run["video_id"], payload.rois[1].seq_id))[None, None]

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
    assert restored.frames == n and restored.frames_with_payload == n and restored.frames_payload_invalid == 0
    assert restored.rois_restored == 2 * n
    assert restored.video_id == permutation_run["video_id"]
    assert restored.psnr_roi is not None and restored.psnr_roi > 10


def test_a_wrong_key_restores_nothing(permutation_run, tmp_path):
    settings = PipelineSettings(model="keyed-permutation", batch_size=8)
    swapper = FaceSwapper(load_face_pair("keyed-permutation", None))
    record = reconstruct_video(permutation_run["out"] / "public.mkv", tmp_path / "wrong.mkv",
                               key=Key(secrets.token_bytes(32)), swapper=swapper, settings=settings,
                               progress=False)
    assert record.frames_with_payload == 0 and record.rois_restored == 0
    assert record.frames_payload_invalid == record.frames > 0
    wrong = read_frames(tmp_path / "wrong.mkv", [0])[0]
    assert np.array_equal(wrong, permutation_run["public"][0]), "frames without a valid payload stay as they are"


def test_unet_weights_file_loads_and_anonymizes_a_real_clip(clips, key, tmp_path):
    torch.manual_seed(0)
    encoder, decoder = build_pair("uunet", {"widths": [8, 16, 32, 64]})
    weights = save_face_pair(tmp_path / "tiny.pt", "uunet", encoder, decoder, {"widths": [8, 16, 32, 64]})
    swapper = FaceSwapper(load_face_pair("uunet", weights))
    settings = PipelineSettings(model="uunet", weights=str(weights), batch_size=8)
    record = anonymize_video(clips["carphone"], tmp_path / "pub.mkv", key=key, video_id="ab" * 32,
                             detector=FaceDetector(batch_size=8), swapper=swapper, settings=settings,
                             run_id="r", progress=False)
    assert record.frame_count == 16 and record.faces >= 12, "the carphone face is found in most frames"
    src, pub = read_frames(clips["carphone"], [3])[0], read_frames(tmp_path / "pub.mkv", [3])[0]
    payload = stego.extract(pub, key, expected_frame_index=3)
    (r,) = payload.rois
    assert np.abs(pub[r.y:r.y + r.h, r.x:r.x + r.w].astype(int) - src[r.y:r.y + r.h, r.x:r.x + r.w]).mean() > 5


def test_odd_sized_footage_round_trips(clips, key, tmp_path):
    import subprocess

    import imageio_ffmpeg

    odd = tmp_path / "odd.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(clips["carphone"]),
                    "-vf", "scale=175:143", "-c:v", "libx264rgb", "-qp", "0", str(odd)], check=True)
    swapper = FaceSwapper(load_face_pair("keyed-permutation", None))
    settings = PipelineSettings(batch_size=8)
    record = anonymize_video(odd, tmp_path / "pub.mkv", key=key, video_id="0d" * 32,
                             detector=FaceDetector(batch_size=8), swapper=swapper, settings=settings,
                             run_id="r", progress=False)
    restored = reconstruct_video(tmp_path / "pub.mkv", tmp_path / "rec.mkv", key=key, swapper=swapper,
                                 settings=settings, source=odd, progress=False)
    info = probe(tmp_path / "rec.mkv")
    assert (info.width, info.height, info.frame_count) == (175, 143, 16)
    assert record.faces > 0 and restored.rois_restored == record.faces


def test_the_bundled_weights_anonymize_and_restore_a_real_clip(clips, key, tmp_path):
    """The default model: the trained U-Nets shipped in models/weights/ (see MODEL_CARD.md)."""
    settings = PipelineSettings(batch_size=8)
    assert settings.model == "uunet"
    swapper = FaceSwapper(load_face_pair(settings.model, None))
    record = anonymize_video(clips["wolfgang"], tmp_path / "pub.mkv", key=key, video_id="be" * 32,
                             detector=FaceDetector(batch_size=8), swapper=swapper, settings=settings,
                             run_id="r", progress=False)
    restored = reconstruct_video(tmp_path / "pub.mkv", tmp_path / "rec.mkv", key=key, swapper=swapper,
                                 settings=settings, source=clips["wolfgang"], progress=False)
    wrong = reconstruct_video(tmp_path / "pub.mkv", tmp_path / "wrong.mkv", key=Key(secrets.token_bytes(32)),
                              swapper=swapper, settings=settings, source=clips["wolfgang"], progress=False)
    assert record.faces == record.frame_count == 24
    assert restored.rois_restored == record.faces and wrong.rois_restored == 0
    # The public face differs from the source far more than the restored one does.
    src = read_frames(clips["wolfgang"], [10])[0].astype(int)
    (r,) = stego.extract(read_frames(tmp_path / "pub.mkv", [10])[0], key, expected_frame_index=10).rois
    roi = (slice(r.y, r.y + r.h), slice(r.x, r.x + r.w))
    public = read_frames(tmp_path / "pub.mkv", [10])[0].astype(int)
    rebuilt = read_frames(tmp_path / "rec.mkv", [10])[0].astype(int)
    assert np.abs(rebuilt[roi] - src[roi]).mean() < 0.8 * np.abs(public[roi] - src[roi]).mean()
    public_psnr = 10 * np.log10(255.0**2 / ((public[roi] - src[roi]) ** 2).mean())
    assert restored.psnr_roi > public_psnr + 2, (restored.psnr_roi, public_psnr)
