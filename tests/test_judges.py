"""The independent judges on real faces: head crops of the bundled clips made by our own pipeline."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tasks.datapath.decode import probe, read_frames
from tasks.datapath.deidentify import crop_faces
from tasks.datapath.detect import FaceDetector
from tasks.datapath.track import Roi, head_roi
from tasks.judges import SFACE_COSINE_THRESHOLD, GenderJudge, SFaceJudge, YuNetDetector

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
ASTRONAUT = ROOT / "tests" / "data" / "astronaut.png"
# What MTCNN (the `mtcnn` package and our port) reports for astronaut.png, as x, y, w, h.
MTCNN_ASTRONAUT_XYWH = np.array([182, 64, 83, 107])


@pytest.fixture(scope="module")
def detector():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a busy 2-core runner (see test_detect.py)
    yield FaceDetector()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sface() -> SFaceJudge:
    return SFaceJudge()


def head_crops(detector: FaceDetector, clip: str, frames: list[int]) -> np.ndarray:
    """The pipeline's 64x64 head crops (best MTCNN face per frame) as uint8 RGB (n, 64, 64, 3)."""
    info = probe(SAMPLES / clip)
    images = read_frames(SAMPLES / clip, frames)
    crops = []
    for index, frame, boxes in zip(frames, images, detector.detect(images)):
        assert len(boxes), f"no face in frame {index} of {clip}"
        x, y, w, h = head_roi(boxes[0], info.width, info.height)
        face = crop_faces(frame, [Roi(index, 0, x, y, w, h, float(boxes[0, 4]), False)], torch.device("cpu"))
        crops.append(face[0].permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy())
    return np.stack(crops)


@pytest.fixture(scope="module")
def wolfgang(detector) -> np.ndarray:
    # 24 frames apart at 23.976 fps: about one second, a different expression and pose.
    return head_crops(detector, "WolfgangLanger_Pexels.mp4", [240, 264])


@pytest.fixture(scope="module")
def single_face(detector) -> np.ndarray:
    return head_crops(detector, "single_face.mp4", [36])


def test_same_woman_one_second_apart_is_the_same_person(sface, wolfgang):
    assert wolfgang.shape == (2, 64, 64, 3)
    first, second = sface.embed(wolfgang[0]), sface.embed(wolfgang[1])
    # Real 64x64 faces must take the landmark-aligned path, SFace's trained input.
    assert first.aligned and second.aligned
    assert sface.same_person(first, second)
    assert sface.similarity(first, second) > SFACE_COSINE_THRESHOLD + 0.2  # not a near miss


def test_different_people_are_not_the_same_person(sface, wolfgang, single_face):
    woman = sface.embed(wolfgang[0])
    man = sface.embed(single_face[0])
    assert man.aligned
    assert not sface.same_person(woman, man)
    assert sface.similarity(woman, man) < SFACE_COSINE_THRESHOLD


def test_dlib_second_opinion_agrees_on_who_is_who(wolfgang, single_face):
    from tasks.judges import DlibJudge

    dlib_judge = DlibJudge()
    woman_1, woman_2 = dlib_judge.embed(wolfgang[0]), dlib_judge.embed(wolfgang[1])
    man = dlib_judge.embed(single_face[0])
    assert woman_1.shape == (128,)
    assert dlib_judge.same_person(woman_1, woman_2)
    assert not dlib_judge.same_person(woman_1, man) and not dlib_judge.same_person(woman_2, man)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not dlib_judge.same_person(woman_1, dlib_judge.embed(noise))


def test_embedding_is_a_unit_vector_and_self_similar(sface, single_face):
    embedding = sface.embed(single_face[0])
    assert embedding.vector.shape == (128,) and embedding.vector.dtype == np.float32
    assert np.linalg.norm(embedding.vector) == pytest.approx(1.0, abs=1e-5)
    assert sface.similarity(embedding, embedding.vector) == pytest.approx(1.0, abs=1e-5)


def test_a_crop_without_a_face_falls_back_to_the_plain_resize(sface, single_face):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    embedding = sface.embed(noise)
    assert not embedding.aligned
    assert np.isfinite(embedding.vector).all()
    assert np.linalg.norm(embedding.vector) == pytest.approx(1.0, abs=1e-5)
    assert not sface.same_person(embedding, sface.embed(single_face[0]))


def test_embed_rejects_non_uint8_rgb(sface):
    with pytest.raises(ValueError):
        sface.embed(np.zeros((64, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        sface.embed(np.zeros((64, 64), dtype=np.uint8))


def test_yunet_finds_the_astronaut_where_mtcnn_does():
    image = np.array(Image.open(ASTRONAUT).convert("RGB"))
    boxes = YuNetDetector().detect(image)
    assert boxes.shape == (1, 5) and boxes.dtype == np.float32
    x1, y1, x2, y2, score = boxes[0]
    assert np.abs(np.array([x1, y1, x2 - x1, y2 - y1]) - MTCNN_ASTRONAUT_XYWH).max() <= 20
    assert score >= 0.6


def test_yunet_finds_nothing_in_a_flat_image():
    boxes = YuNetDetector().detect(np.full((200, 300, 3), 128, dtype=np.uint8))
    assert boxes.shape == (0, 5)


def test_gender_judge_probabilities(wolfgang, single_face):
    judge = GenderJudge()
    p = judge.p_male(np.concatenate([wolfgang, single_face]))
    assert p.shape == (3,) and p.dtype == np.float32
    assert ((p >= 0) & (p <= 1)).all()
    # Robust on these clips: the woman scored <= 0.08 and the man >= 0.98 on every
    # crop of their last quarters, so a 0.5 cut has a wide margin.
    assert (p[:2] < 0.5).all() and p[2] > 0.5
    assert judge.p_male(np.zeros((0, 64, 64, 3), dtype=np.uint8)).shape == (0,)


def test_model_card_on_the_exact_stand_in(tmp_path):
    """The card's plumbing end to end on a few held-out carphone frames with the keyed permutation.

    The permutation is exactly invertible, so r must equal x bit for bit and SFace must call
    them the same person, while the scrambled a and the wrong-key r_wrong must not match x.
    """
    import json

    from bench.model_card import main
    from tasks.evaluation.held_out import held_out_frames

    assert held_out_frames(120, 10) == [90, 100, 110]
    assert held_out_frames(472, 1)[0] == 354 and held_out_frames(472, 1)[-1] == 471
    out = tmp_path / "card.json"
    threads = torch.get_num_threads(), cv2.getNumThreads()
    try:
        result = main(["--model", "keyed-permutation", "--clips", str(SAMPLES / "carphone_pristine.mp4"),
                       "--stride", "10", "--seed", "3", "--json", str(out)])
    finally:  # main sets both libraries' thread counts for the whole process
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])
    assert json.loads(out.read_text()) == result
    card = result["results"]["all"]
    assert card["faces"] == 3 and card["exact_faces"] == 3
    assert card["psnr_db_mean"] is None and card["psnr_db_pooled"] is None  # infinite: strict JSON null
    assert card["same_x_r"]["hits"] == 3
    assert card["same_x_a"]["hits"] == 0 and card["same_x_r_wrong"]["hits"] == 0
    # dlib agrees on the exact stand-in: r is x (distance 0), the scrambles are nobody.
    assert card["dlib_same_x_r"]["hits"] == 3
    assert card["dlib_same_x_a"]["hits"] == 0 and card["dlib_same_x_r_wrong"]["hits"] == 0
    assert card["mtcnn_x"]["hits"] == 3 and card["yunet_x"]["hits"] == 3
    assert card["mtcnn_a"]["hits"] == 0 and card["yunet_a"]["hits"] == 0
    assert result["sampling"]["frames"] == {"carphone_pristine": [90, 100, 110]}
