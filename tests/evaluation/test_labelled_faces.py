"""A labelled faces catalog split through the real public and private modules.

The catalog is made like a real labelled dataset from the tiny clips: the face track of
each clip is one subject, cut into two sequences (first and second half), with gender
"annotated" as a dataset would: the carphone speaker (a man) as male, and the woman of
the Wolfgang clip as male too, on purpose, so that label agreement cannot be perfect.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from catalogs import CatalogStore
from tasks.datapath.decode import probe, read_frames
from tasks.datapath.deidentify import FaceSwapper, load_face_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import DataKey
from tasks.datapath.video_loop import PipelineSettings
from tasks.evaluation.evaluate import Judges, compare_controls, control_label, evaluate_methods
from tasks.evaluation.held_out import CONTEXT_GREY, in_context
from tasks.evaluation.labelled_faces import gallery_id, run_split, select_split, write_gallery
from tasks.judges import GenderJudge, SFaceJudge, YuNetDetector
from tasks.training.corpus import faces_from_footage, load_face_images

ROI_SCALE = 1.3


def labelled_catalog(clips, detector, root: Path) -> Path:
    """root/catalogs/faces: 2 subjects × 2 sequences, split test, annotated gender."""
    rows = []
    for name, gender in (("wolfgang", 1.0), ("carphone", 1.0)):
        track = faces_from_footage([clips[name]], root / "stacks", detector, min_track_frames=4, run_id="r1")
        track = sorted(track, key=lambda r: r["frame_index"])
        half = len(track) // 2
        for i, row in enumerate(track):
            rows.append({**row, "dataset": "tiny", "subject_id": name, "sequence_id": f"{name}-{i >= half:d}",
                         "gender": gender, "label_source": "annotation", "split": "test"})
    CatalogStore(root / "catalogs").write_part("faces", "r1", "tiny", rows)
    return root


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector(batch_size=8)


@pytest.fixture(scope="module")
def corpus(clips, detector, tmp_path_factory) -> Path:
    return labelled_catalog(clips, detector, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def split_run(corpus, detector, tmp_path_factory):
    rows = select_split(CatalogStore(corpus / "catalogs").read("faces"), "test", 10, 3)
    rng = np.random.default_rng(11)
    key, wrong = DataKey(rng.bytes(32)), DataKey(rng.bytes(32))
    swapper = FaceSwapper(load_face_pair("uunet", None))
    faces, run = run_split(rows, tmp_path_factory.mktemp("split"), key=key, wrong_key=wrong, detector=detector,
                           swapper=swapper,
                           settings=PipelineSettings(batch_size=8, public_format="x264rgb", seal="none"),
                           judge=SFaceJudge())
    return rows, faces, run


def test_select_split_caps_sequences_and_frames_and_keeps_order():
    faces = pd.DataFrame({
        "dataset": "d", "split": ["test"] * 10 + ["train"] * 2,
        "sequence_id": ["a"] * 6 + ["b"] * 3 + ["c"] + ["t"] * 2,
        "frame_index": [5, 0, 4, 1, 3, 2, 9, 7, 8, 0, 0, 1]})
    chosen = select_split(faces, "test", max_sequences=10, frames_per_sequence=3)
    assert chosen["sequence_id"].tolist() == ["a"] * 3 + ["b"] * 3 + ["c"]
    assert chosen["frame_index"].tolist()[:3] == [0, 2, 5]  # evenly spaced, first and last kept
    assert chosen["frame_index"].tolist()[3:6] == [7, 8, 9]
    two = select_split(faces, "test", max_sequences=2, frames_per_sequence=8, seed=1)
    assert two["sequence_id"].nunique() == 2 and len(two) == len(select_split(faces, "test", 2, 8, seed=1))
    with pytest.raises(ValueError, match="no 'val' rows"):
        select_split(faces, "val", 5, 5)


def test_gallery_id_names_the_faces_not_the_bytes():
    rows = pd.DataFrame({"dataset": "d", "sequence_id": ["a", "b"], "frame_index": [0, 0],
                         "image_path": ["f.npy", "f.npy"], "array_index": [0, 1]})
    assert gallery_id(rows) == gallery_id(rows.copy()) and len(gallery_id(rows)) == 64
    assert gallery_id(rows) != gallery_id(rows.iloc[::-1]) != gallery_id(rows.assign(array_index=[0, 2]))
    assert gallery_id(rows) == gallery_id(rows.assign(image_path=["/elsewhere/f.npy"] * 2))  # a moved catalog


def test_gallery_clip_holds_each_face_then_a_gap_the_tracker_cannot_bridge(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    frame_of = write_gallery(images, np.array(["a", "a", "b", "c", "c"]), tmp_path / "g.mkv", gap=3)
    assert frame_of.tolist() == [0, 1, 5, 9, 10]
    assert probe(tmp_path / "g.mkv").frame_count == 5 + 3 * 3
    back = read_frames(tmp_path / "g.mkv", [0, 2, 10])
    assert np.array_equal(back[0], in_context(images[:1])[0])  # lossless
    assert (back[1] == CONTEXT_GREY).all()
    assert np.array_equal(back[2], in_context(images[4:5])[0])


def test_split_runs_through_both_modules_and_reads_faces_back(split_run):
    rows, faces, run = split_run
    assert run.faces_selected == len(rows) == 12  # 2 subjects × 2 sequences × 3 frames
    assert run.faces_found >= 10 and len(faces.x) == run.faces_found
    assert run.sequences_tracked == 4  # one track per catalog sequence: the gaps were not bridged
    assert run.frames_with_payload == run.frames
    assert faces.subject_names == ["carphone", "wolfgang"]
    assert set(faces.subjects.tolist()) == {0, 1}
    assert set(faces.gender_labels.tolist()) == {1.0}
    assert faces.residual_max == 0.0  # the private module restores identically twice

    def err(a, b):
        return np.abs(a.astype(float) - b.astype(float)).mean()

    # r is the public face restored: closer to x than the public face or the wrong key's result.
    assert err(faces.r, faces.x) < err(faces.a, faces.x)
    assert err(faces.r, faces.x) < err(faces.r_wrong, faces.x)
    assert not np.array_equal(faces.a_seq0, faces.a_seq1)
    assert len(set(faces.sequences.tolist())) == 4  # the faces carry the pipeline's own tracks


def test_split_faces_go_through_every_measure_and_controls_compare_pairs(split_run, detector):
    _, faces, _ = split_run
    # Without dlib (0.2 s a face here): its rows on a split are the evaluate flow test's.
    judges = Judges(detector, SFaceJudge(detector=YuNetDetector()), GenderJudge())
    results = evaluate_methods(faces, {}, judges, ROI_SCALE)
    ref, ours = results["original"].metrics, results["ours"].metrics
    for name in ("x_x_d_prime", "gender_label_agreement"):
        assert math.isfinite(ref[name].value), name
    for name in ("x_a_auc", "temporal_d_prime", "gender_label_agreement", "psnr_x_r",
                 "diversity_seq_d_prime", "diversity_seq_same_rate"):
        assert math.isfinite(ours[name].value), name
    # The judge calls the Wolfgang woman female (model card: p_male <= 0.08), against the
    # deliberately wrong label, and the carphone man male.
    assert 0.2 < ref["gender_label_agreement"].value < 0.8

    bundled = load_face_pair("uunet", None)
    table = compare_controls(faces, {"bundled": bundled, "perm": load_face_pair("keyed-permutation", None)},
                             judges, ROI_SCALE)
    assert table["bundled"]["s"] == control_label(bundled) == "id -1, gender 0, age_group 0"
    assert table["perm"]["s"] == "n/a"
    for row in table.values():
        assert 0.0 <= row["gender_agreement"].value <= 1.0
        assert 0.0 <= row["gender_label_agreement"].value <= 1.0
        assert 0.0 <= row["detection_rate_a"].value <= 1.0
    assert table["perm"]["detection_rate_a"].value == 0.0  # a scrambled crop is no face
    # The same pair on the same faces and noise is the same a: its row reproduces itself.
    again = compare_controls(faces, {"bundled": bundled}, judges, ROI_SCALE)
    assert again["bundled"]["gender_agreement"].value == table["bundled"]["gender_agreement"].value


def test_a_split_of_single_image_subjects_has_no_identity_environment(split_run, detector):
    _, faces, _ = split_run
    one_each = np.sort(np.unique(faces.subjects, return_index=True)[1])  # first face of each subject
    picked = {k: getattr(faces, k)[one_each] for k in ("subjects", "frames", "x", "a", "r", "r_wrong", "a_seq0",
                                                       "a_seq1", "gender_labels", "sequences")}
    single = dataclasses.replace(faces, **picked)
    judges = Judges(detector, SFaceJudge(detector=YuNetDetector()), GenderJudge())
    results = evaluate_methods(single, {}, judges, ROI_SCALE)
    assert "x_a_d_prime" not in results["ours"].metrics and "temporal_d_prime" not in results["ours"].metrics
    assert results["ours"].environments == {}
    assert math.isfinite(results["ours"].metrics["same_person_x_a"].value)  # the per-face measures remain


def test_labelled_catalog_fixture_is_a_real_catalog(corpus):
    faces = CatalogStore(corpus / "catalogs").read("faces")
    assert set(faces["sequence_id"]) == {"wolfgang-0", "wolfgang-1", "carphone-0", "carphone-1"}
    assert load_face_images(faces.head(2)).shape == (2, 64, 64, 3)
