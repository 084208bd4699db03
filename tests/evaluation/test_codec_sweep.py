"""Reversal under re-encoding, on a real clip anonymized by the real public module.

The keyed permutation is the face pair and the head ROI is exactly 64×64 (no resize): the
lossless round trip is exact but for payload bits, so every further PSNR loss measured
here is the codec's doing, not the model's.
"""
from __future__ import annotations

import math
import secrets

import numpy as np
import pytest

from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import probe
from tasks.datapath.deidentify import FaceSwapper, load_face_pair
from tasks.datapath.keys import DataKey, generate_key_pair, parse_private_key
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.video_loop import PipelineSettings
from tasks.evaluation.codec_sweep import CODEC_SETTINGS, SweepRow, format_table, reencode, sweep

TESTED = ("ffv1", "x264-crf0", "x264-crf28")
# The carphone speaker's head in the first 16 frames (YuNet: x 64-112, y 35-98), as a 64×64 box.
HEAD_BOX = (56.0, 34.0, 120.0, 98.0)


class FixedHeadDetector:
    """Test double for MTCNN: the same 64×64 head box in every frame, so U_d sees no resize."""

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        return [np.array([[*HEAD_BOX, 0.99]], dtype=np.float32) for _ in frames]


@pytest.fixture(scope="module")
def swept(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("codec-sweep")
    key = DataKey(secrets.token_bytes(32))
    authority = parse_private_key(generate_key_pair()[0])
    # The sweep measures the learned path's robustness: lossless public file, nothing sealed.
    settings = PipelineSettings(model="keyed-permutation", batch_size=8, roi_scale=1.0, public_format="x264rgb",
                                seal="none")
    swapper = FaceSwapper(load_face_pair("keyed-permutation", None))
    record = anonymize_video(clips["carphone"], out / "public.mkv", recipients=[authority.public],
                             video_id="5e" * 32, detector=FixedHeadDetector(), swapper=swapper, settings=settings,
                             run_id="r", progress=False, data_key=key)
    lossless = reconstruct_video(out / "public.mkv", out / "restored.mkv", private_key=authority, swapper=swapper,
                                 settings=settings, source=clips["carphone"], progress=False)
    rows = sweep(out / "public.mkv", clips["carphone"], key, swapper,
                 settings={name: CODEC_SETTINGS[name] for name in TESTED}, sample_every=4)
    return dict(out=out, record=record, lossless=lossless, rows={r.setting: r for r in rows}, order=rows)


def test_the_default_settings_cover_the_crf_ladder_and_the_lossless_reference():
    assert set(CODEC_SETTINGS) == {"x264-crf0", "x264-crf12", "x264-crf18", "x264-crf23", "x264-crf28", "ffv1"}
    for name, args in CODEC_SETTINGS.items():
        if name.startswith("x264"):
            assert args[args.index("-pix_fmt") + 1] == "yuv420p"
            assert args[args.index("-crf") + 1] == name.removeprefix("x264-crf")


def test_every_requested_setting_gets_a_row_in_order(swept):
    assert [r.setting for r in swept["order"]] == list(TESTED)
    n = swept["record"].frame_count
    assert swept["record"].faces > 0
    for row in swept["order"]:
        assert isinstance(row, SweepRow) and row.frames == n and row.seconds > 0
    table = format_table(swept["order"])
    assert all(name in table for name in TESTED)


def test_ffv1_keeps_every_payload_and_the_lossless_psnr(swept):
    row, lossless = swept["rows"]["ffv1"], swept["lossless"]
    assert row.payload_recovery == 1.0
    assert lossless.frames_with_payload == lossless.frames
    assert row.psnr_roi_payload == pytest.approx(lossless.psnr_roi, abs=1e-9)
    assert row.psnr_roi_oracle == pytest.approx(lossless.psnr_roi, abs=1e-9)
    assert lossless.psnr_roi > 50, "the 64×64 permutation round trip is exact but for payload LSBs"
    assert row.same_person_rate > 0.5


@pytest.mark.parametrize("setting", ["x264-crf0", "x264-crf28"])
def test_yuv420_wipes_the_payload_but_oracle_rois_still_measure_the_faces(swept, setting):
    row = swept["rows"][setting]
    assert row.payload_recovery <= 0.1, "LSB payloads are not expected to survive RGB → YUV 4:2:0"
    if row.payload_recovery == 0:
        assert math.isnan(row.psnr_roi_payload)
    assert math.isfinite(row.psnr_roi_oracle)
    # The scrambled face is all high frequencies: a lossy codec damages what U_d inverts.
    assert row.psnr_roi_oracle < swept["rows"]["ffv1"].psnr_roi_oracle - 3


def test_lossier_settings_restore_worse(swept):
    rows = swept["rows"]
    assert rows["x264-crf28"].psnr_roi_oracle < rows["x264-crf0"].psnr_roi_oracle
    # Frame-resolution SSIM of the restored faces follows the same order, and is lossless-best.
    assert rows["x264-crf28"].ssim_roi < rows["x264-crf0"].ssim_roi <= rows["ffv1"].ssim_roi <= 1.0


def test_reencode_keeps_the_frame_count(swept, tmp_path):
    out = reencode(swept["out"] / "public.mkv", tmp_path / "x.mkv", CODEC_SETTINGS["x264-crf23"])
    assert probe(out).frame_count == swept["record"].frame_count
    assert not list(tmp_path.glob(".*partial*")), "no temporary file is left behind"


def test_reencode_failure_leaves_nothing(swept, tmp_path):
    with pytest.raises(RuntimeError, match="re-encode"):
        reencode(swept["out"] / "public.mkv", tmp_path / "bad.mkv", ["-c:v", "no-such-codec"])
    assert list(tmp_path.iterdir()) == []
