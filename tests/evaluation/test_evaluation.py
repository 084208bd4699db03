"""The Sec. IV evaluation on a tiny real set: the held-out frames of two short cut clips.

The tiny clips (conftest: wolfgang 24 frames, carphone 16) give 6 + 4 held-out faces, enough
for genuine and impostor pairs in every environment; the bundled U-Net pair runs for real.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from catalogs import CatalogStore
from tasks.datapath.deidentify import DEFAULT_WEIGHTS, load_face_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import DataKey
from tasks.evaluation.baselines import BASELINES
from tasks.evaluation.evaluate import (
    OURS,
    Environment,
    Judges,
    collect_faces,
    cross_environment,
    evaluate_methods,
    truth_box,
)
from tasks.judges import DlibJudge, GenderJudge, SFaceJudge, YuNetDetector

ROI_SCALE = 1.3


@pytest.fixture(scope="module")
def one_thread():
    """One torch / OpenCV thread, as the flow runs: on 2 shared cores the default pools spin."""
    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    yield
    torch.set_num_threads(before[0])
    cv2.setNumThreads(before[1])


@pytest.fixture(scope="module")
def evaluated(clips, one_thread):
    rng = np.random.default_rng(7)
    key, wrong_key = DataKey(rng.bytes(32)), DataKey(rng.bytes(32))
    detector = FaceDetector(batch_size=8)
    pair = load_face_pair("uunet", None)
    faces = collect_faces([clips["wolfgang"], clips["carphone"]], 1, detector, pair, key, wrong_key, ROI_SCALE)
    judges = Judges(detector, SFaceJudge(detector=YuNetDetector()), GenderJudge(), DlibJudge())
    return faces, evaluate_methods(faces, BASELINES, judges, ROI_SCALE)


def test_held_out_faces_are_the_last_quarter_of_each_clip(evaluated):
    faces, _ = evaluated
    assert faces.subject_names == ["wolfgang", "carphone"]
    assert set(faces.frames[faces.subjects == 0]) <= set(range(18, 24))
    assert set(faces.frames[faces.subjects == 1]) <= set(range(12, 16))
    assert faces.x.shape[1:] == (64, 64, 3) and faces.x.dtype == np.uint8
    assert faces.a.shape == faces.r.shape == faces.a_seq1.shape == faces.x.shape
    # Sequence 1 is another keyed noise, so another virtual face of the same frames.
    assert not np.array_equal(faces.a_seq0, faces.a_seq1)


def test_deterministic_inference_leaves_no_residual_between_two_runs(evaluated):
    faces, results = evaluated
    assert faces.residual_max == 0.0
    assert results[OURS].metrics["reversibility_residual_max"].value == 0.0


@pytest.mark.parametrize("method", [OURS, *BASELINES])
def test_every_method_goes_through_the_same_finite_measures(evaluated, method):
    _, results = evaluated
    metrics = results[method].metrics
    for name in ("x_a_d_prime", "x_a_auc", "detection_rate_ratio", "ap_ratio", "gender_agreement",
                 "same_person_x_a", "mtcnn_conf_a", "yunet_detection_rate_a"):
        assert math.isfinite(metrics[name].value), name
    assert 0.0 <= metrics["x_a_auc"].value <= 1.0
    assert metrics["x_a_d_prime"].sd is not None and metrics["x_a_d_prime"].sd >= 0.0
    assert 0.0 <= metrics["gender_agreement"].value <= 1.0


def test_real_faces_separate_and_ours_has_the_extra_measures(evaluated):
    _, results = evaluated
    reference = results["original"].metrics
    # Two different people on real crops: SFace must tell them apart almost perfectly.
    assert reference["x_x_auc"].value > 0.9 and reference["x_x_d_prime"].value > 2
    assert reference["mtcnn_detection_rate_x"].value > 0.8
    assert reference["yunet_detection_rate_x"].value > 0.8  # the second detector agrees on real faces
    ours = results[OURS].metrics
    for name in ("temporal_d_prime", "temporal_auc", "temporal_ks_p", "diversity_cos_mean", "psnr_x_r", "ssim_x_r"):
        assert math.isfinite(ours[name].value), name
    assert ours["same_person_x_r_wrong"].value <= ours["same_person_x_r"].value
    for name in ("dlib_same_person_x_a", "dlib_same_person_x_r", "dlib_same_person_x_r_wrong"):
        assert 0.0 <= ours[name].value <= 1.0, name  # the second recogniser reports too
    for baseline in BASELINES:
        assert "psnr_x_r" not in results[baseline].metrics  # irreversible: nothing to restore


class _Identity(torch.nn.Module):
    def forward(self, faces, noise):
        return faces


class _Grey(torch.nn.Module):
    def forward(self, faces, noise):
        return torch.full_like(faces, 0.5)


def test_public_face_measures_see_what_an_encoder_hands_the_public(evaluated):
    from tasks.evaluation.evaluate import public_face_measures

    faces, _ = evaluated
    judges = Judges(FaceDetector(batch_size=8), SFaceJudge(detector=YuNetDetector()), GenderJudge(), DlibJudge())
    key = DataKey(bytes(32))
    # An encoder that hands x back: every face found again, always the person, and no key changes it.
    same = public_face_measures(faces, _Identity(), torch.device("cpu"), key, judges, ROI_SCALE, blend=False)
    assert same["faces"].value == len(faces.x)
    assert same["mtcnn_found_a"].value == same["yunet_found_a"].value == 1.0
    assert same["same_person_x_a"].value == same["dlib_same_person_x_a"].value == 1.0
    assert same["diversity_same_rate"].value == 1.0
    # A grey square replaces the face entirely (no blend): nothing left to find or recognise.
    grey = public_face_measures(faces, _Grey(), torch.device("cpu"), key, judges, ROI_SCALE, blend=False)
    assert grey["mtcnn_found_a"].value == grey["yunet_found_a"].value == 0.0
    assert grey["same_person_x_a"].value == 0.0


def test_environments_split_pairs_by_subject():
    e = np.eye(3, dtype=np.float32)[[0, 0, 1, 1]]  # two subjects, two frames each
    subjects = np.array([0, 0, 1, 1])
    same = cross_environment(e, e, subjects)
    assert same.genuine.tolist() == [1.0, 1.0] and len(same.impostor) == 4  # unordered pairs once
    cross = cross_environment(e, e.copy(), subjects)
    assert len(cross.genuine) == 4 and len(cross.impostor) == 8  # both orders, never a face with itself
    assert isinstance(same, Environment)


def test_truth_box_is_the_face_square_inside_the_framed_crop():
    x1, y1, x2, y2 = truth_box(1.3)
    assert x1 == y1 and x2 == y2 and (x1 + x2) / 2 == 32 + 64
    assert x2 - x1 == pytest.approx(128 / 1.3)


def test_evaluate_flow_writes_report_summary_and_metrics(prefect_harness, clips, one_thread, tmp_path):
    from flows.evaluate import README_END, README_START, evaluate
    from tests.evaluation.test_labelled_faces import labelled_catalog

    corpus = labelled_catalog(clips, FaceDetector(batch_size=8), tmp_path / "corpus")
    # A variant file for the per-s table: the bundled weights relabelled as trained with s_gender = +1.
    # Only the plumbing is under test here (rows, labels, catalog); the numbers are the bundled pair's.
    blob = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
    blob["meta"]["config"]["control"] = "-1,1,0"
    torch.save(blob, tmp_path / "keep-gender.pt")
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{README_START}\nold table\n{README_END}\nafter\n")
    out = tmp_path / "eval"
    result = evaluate(clips_dir=str(clips["wolfgang"].parent), out=str(out), stride=2,
                      clips=[str(clips["wolfgang"]), str(clips["carphone"])], corpus=str(corpus),
                      max_sequences=4, frames_per_sequence=2, variants=[str(tmp_path / "keep-gender.pt")],
                      codec_clip=str(clips["carphone"]), codec_frames=8, codec_settings=["ffv1", "x264-crf23"],
                      readme=str(readme), sealed_qualities=["high"])  # exact: test_anonymize_reconstruct
    report = (out / "report.html").read_text()
    assert "blur" in report and "superpixel" in report and "x264-crf23" in report and "keep-gender" in report
    for png in ("decision_environments_footage.png", "roc_footage.png", "decision_environments_faces.png",
                "codec_sweep.png"):
        assert (out / png).stat().st_size > 1000 and png in report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_id"] == result["run_id"]
    assert set(summary["datasets"]) == {"footage", "faces"}
    faces = summary["datasets"]["faces"]
    assert set(faces["results"]) == {"original", OURS, *BASELINES}
    assert faces["gallery"]["faces_selected"] == 8 and faces["faces"]["total"] == faces["gallery"]["faces_found"]
    assert set(faces["controls"]) == {"uunet", "keep-gender"}
    assert faces["controls"]["keep-gender"]["s"] == "id -1, gender 1, age_group 0"
    # The public face per mode, on both datasets: the sealed default's U_e is not --seal none's.
    for key in ("footage", "faces"):
        public = summary["datasets"][key]["public"]
        assert set(public) == {"high", "none"}
        assert public["high"]["faces"]["value"] == public["none"]["faces"]["value"] == summary["datasets"][key][
            "faces"]["total"]
    assert "The public face per mode" in report
    assert [row["setting"] for row in summary["codec"]] == ["ffv1", "x264-crf23"]
    assert summary["codec"][0]["payload_recovery"] == 1.0
    (high,) = summary["sealed"]  # the sealed path through the real modules, beside the learned one
    assert high["quality"] == "high" and high["faces"] > 0 and high["exact_fraction"] < 1.0
    assert high["psnr_db"] >= 42 and high["sface_same"] == 1.0 and high["judged"] > 0 and high["chunks_failed"] == 0
    # The same ROIs as released: the blended public face is not the person the restored one is.
    assert high["public_sface_same"] < high["sface_same"] and high["public_dlib_same"] < high["dlib_same"]
    # One contact sheet per clip for the first mode, shown in the report: three tiles per row.
    sheets = [Path(p) for p in high["contact_sheets"]]
    assert [p.name for p in sheets] == [f"contact-{clips[c].stem}.png" for c in ("wolfgang", "carphone")]
    for sheet in sheets:
        assert sheet.parent == out / "sheets" and f"sheets/{sheet.name}" in report
        with Image.open(sheet) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.height >= 160
    assert high["mtcnn_source_faces"] > 0 and high["yunet_source_faces"] > 0
    metrics = CatalogStore(out / "catalogs").read("metrics")
    assert set(metrics["dataset"]) >= {"footage", "faces", "codec:ffv1"}
    assert set(metrics["method"]) >= {OURS, *BASELINES, f"{OURS}:keep-gender"}
    assert (metrics["run_id"] == result["run_id"]).all()
    assert {"x_a_d_prime", "dlib_x_a_d_prime", "reversibility_residual_max", "psnr_roi_oracle",
            "pipeline_face_found_rate"} <= set(metrics["metric"])
    bootstrapped = metrics[metrics["metric"] == "x_a_d_prime"]
    assert (bootstrapped["low"] <= bootstrapped["value"]).all()
    assert (bootstrapped["value"] <= bootstrapped["high"]).all()
    # The README block is the headline, between the markers; the rest of the README is untouched.
    text = readme.read_text()
    assert text.startswith("# title\n") and text.endswith(f"{README_END}\nafter\n") and "old table" not in text
    assert (out / "headline.md").read_text() in text and "| measure | x | ours | blur | superpixel |" in text
    assert "**Reversal from the sealed originals**" in text and "| sealed (high) | h264 |" in text


def test_sequence_environment_pairs_other_sequences_of_one_subject():
    from tasks.evaluation.evaluate import sequence_environment

    e = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 3]]
    subjects = np.array([0, 0, 0, 1, 1])
    sequences = np.array([5, 5, 6, 7, 7])
    env = sequence_environment(e, subjects, sequences)
    assert len(env.genuine) == 2  # (0, 2) and (1, 2): same subject, other sequence; never (0, 1)
    assert len(env.impostor) == 6  # 3 faces of subject 0 × 2 of subject 1
    assert sequence_environment(e, subjects, np.array([5, 5, 5, 7, 7])) is None  # one sequence each
    assert sequence_environment(e, subjects, None) is None


def test_readme_has_one_headline_block_for_make_eval_readme():
    from flows.evaluate import README_END, README_START

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert text.count(README_START) == 1 and text.count(README_END) == 1
    assert text.index(README_START) < text.index(README_END)


def test_false_accept_rate_counts_different_people_pairs_once():
    from tasks.evaluation.evaluate import false_accept_rate

    same = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 1, 1]], dtype=bool)
    subjects = np.array([0, 0, 1, 2])
    # Different-subject pairs: (0,2) yes, (0,3) no, (1,2) no, (1,3) no, (2,3) yes → 2 of 5.
    assert false_accept_rate(same, subjects, seed=0).value == pytest.approx(0.4, abs=0.05)
    assert false_accept_rate(same, np.zeros(4, dtype=int), seed=0) is None


def test_sealed_rows_fill_every_column_and_show_the_flicker_of_public_and_source():
    from flows.evaluate import SEALED_HEADER, sealed_rows
    from tasks.evaluation.sealed_reversal import SealedReversal

    row = SealedReversal(quality="high", public_format="h264", clips=3, faces=166, psnr_db=42.35,
                         exact_fraction=0.0, judged=83, sface_same=1.0, dlib_same=1.0, chunks_failed=0,
                         public_sface_same=0.0, public_dlib_same=0.024, attack_judged=80, attack_random_sface=0.0125,
                         attack_random_dlib=0.05, attack_zero_sface=0.0, attack_zero_dlib=0.1,
                         public_flicker=3.456, source_flicker=2.1)
    (cells,) = sealed_rows([row], None)
    assert len(cells) == len(SEALED_HEADER)
    assert cells[SEALED_HEADER.index("ROI change per frame, public / source")] == "3.46 / 2.10"
    assert cells[SEALED_HEADER.index("keyless U_d, random key: SFace / dlib ↓")] == "1.2% / 5.0% (80)"
    assert cells[SEALED_HEADER.index("keyless U_d, zero noise: SFace / dlib ↓")] == "0.0% / 10.0%"
    row.mtcnn_source_faces, row.mtcnn_public_found, row.yunet_source_faces, row.yunet_public_found = 40, 0.875, 41, 1.0
    (cells,) = sealed_rows([row], None)
    assert cells[SEALED_HEADER.index("public face found again: MTCNN / YuNet ↑")] == "87.5% (40) / 100.0% (41)"
    # No consecutive frames measured: a dash, not "nan".
    row.public_flicker = row.source_flicker = math.nan
    (cells,) = sealed_rows([row], None)
    assert cells[SEALED_HEADER.index("ROI change per frame, public / source")] == "— / —"


def test_a_source_face_counts_for_realism_only_inside_a_roi_and_is_refound_at_iou_one_half():
    from tasks.evaluation.sealed_reversal import _count_refound

    rois = [(0, 0, 100, 100)]
    source = np.array([[10, 10, 50, 50, 0.9],      # centre (30, 30): in the ROI
                       [200, 200, 240, 240, 0.9]])  # centre outside every ROI: not counted
    counts = dict.fromkeys(["m_source", "m_public"], 0)
    # Shifted by 10 px in x: intersection 30x40 = 1200, union 1600 + 1600 - 1200 = 2000, IoU 0.6.
    _count_refound(source, np.array([[20, 10, 60, 50, 0.8]]), rois, counts, "m")
    assert counts == {"m_source": 1, "m_public": 1}
    # Shifted by 20 px: intersection 20x40 = 800, union 2400, IoU 1/3: not found again.
    _count_refound(source, np.array([[30, 10, 70, 50, 0.8]]), rois, counts, "m")
    assert counts == {"m_source": 2, "m_public": 1}
    _count_refound(source, np.zeros((0, 5)), rois, counts, "m")
    assert counts == {"m_source": 3, "m_public": 1}


class _PasteNothing:
    """A swapper whose U_d changes nothing: the attack then hands back the frame it was given."""

    def restore(self, frames, rois, noise_for):
        assert all(noise_for(r.seq_id).shape == (64, 64) for frame_rois in rois for r in frame_rois)
        return sum(len(r) for r in rois)


class _PasteGrey(_PasteNothing):
    def restore(self, frames, rois, noise_for):
        for frame, frame_rois in zip(frames, rois):
            for r in frame_rois:
                frame[r.y:r.y + r.h, r.x:r.x + r.w] = 128
        return super().restore(frames, rois, noise_for)


def test_keyless_attack_counts_each_detected_face_under_both_noises(clips, one_thread):
    from tasks.datapath.decode import read_frames
    from tasks.datapath.keys import DataKey
    from tasks.evaluation.sealed_reversal import _keyless_attack

    (frame,) = read_frames(clips["wolfgang"], [5])
    detector, sface, dlib = FaceDetector(batch_size=8), SFaceJudge(detector=YuNetDetector()), DlibJudge()
    # Attacking the source itself with a U_d that changes nothing: every face is its own person.
    hits = {"random_sface": 0, "random_dlib": 0, "zero_sface": 0, "zero_dlib": 0}
    (boxes,) = detector.detect(frame[None])
    found = _keyless_attack(frame, frame, boxes, _PasteNothing(), sface, dlib, DataKey.generate().noise,
                            ROI_SCALE, hits)
    assert found == 1  # one woman in the clip
    assert hits == {"random_sface": 1, "random_dlib": 1, "zero_sface": 1, "zero_dlib": 1}
    # A U_d that paints the ROI grey gives nobody back, and the source frame is left as it was.
    hits = dict.fromkeys(hits, 0)
    before = frame.copy()
    assert _keyless_attack(frame, frame, boxes, _PasteGrey(), sface, dlib, DataKey.generate().noise,
                           ROI_SCALE, hits) == 1
    assert hits["random_sface"] == hits["zero_sface"] == 0 and np.array_equal(frame, before)
