"""Face corpus: DCGAN faces, tracks from footage, pseudo-labels, export to training tensors."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from catalogs import CatalogStore
from catalogs.store import rows_to_table
from models.dcgan import DCGANGenerator
from tasks.datapath.detect import FaceDetector
from tasks.training.adapters import AGE_GROUPS, face_row
from tasks.training.corpus import (LABEL_SOURCE_PSEUDO, TENSORS_FORMAT, add_pseudo_labels, build_default_corpus,
                                   export_training_tensors, faces_from_footage, gan_weights_path, generate_gan_faces,
                                   load_dcgan, load_face_images, pseudo_label)


def write_video(path: Path, frames: np.ndarray) -> Path:
    """A lossless RGB clip, so crops of it can be compared with raw pixels."""
    import imageio_ffmpeg

    n, height, width, _ = frames.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", "25", "-i", "-", "-c:v", "libx264rgb", "-qp", "0", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True)
    return path


class FixedBoxDetector:
    """One face box in every frame: track length and frame numbers under the test's control."""

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        return [np.array([[40.0, 30.0, 90.0, 90.0, 0.99]], dtype=np.float32) for _ in frames]


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector("cpu", min_face_size=40)  # his face is ~50 px: fewer pyramid levels, faster


@pytest.fixture(scope="module")
def gan(tmp_path_factory) -> tuple[list[dict], np.ndarray]:
    out = tmp_path_factory.mktemp("gan")
    rows = generate_gan_faces(12, seed=3, out_dir=out, run_id="r1")
    return rows, np.load(rows[0]["image_path"])


@pytest.fixture(scope="module")
def carphone_rows(clips, detector, tmp_path_factory) -> list[dict]:
    return faces_from_footage([clips["carphone"]], tmp_path_factory.mktemp("footage"), detector, run_id="r1")


# --------------------------------------------------------------------------- DCGAN

def test_dcgan_loads_strictly_and_makes_images() -> None:
    released = torch.load(gan_weights_path(), map_location="cpu", weights_only=True)["netG_state_dict"]
    assert set(DCGANGenerator().state_dict()) == set(released)  # no tensor skipped or left random
    model = load_dcgan()
    assert torch.equal(model.main[0].weight, released["main.0.weight"])
    with torch.inference_mode():
        out = model(torch.randn(4, 100, generator=torch.Generator().manual_seed(0)))
        fresh = DCGANGenerator().eval()(torch.zeros(1, 100, 1, 1))
    assert out.shape == (4, 3, 64, 64) and fresh.shape == (1, 3, 64, 64)
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert out.std() > 0.2  # an image, not a flat field
    assert (out[0] - out[1]).abs().mean() > 0.05  # different latents, different faces
    with pytest.raises(ValueError):
        model(torch.randn(2, 99))


def test_generate_gan_faces_is_seeded(gan, tmp_path: Path) -> None:
    rows, stack = gan
    rows_to_table("faces", rows)
    assert stack.shape == (12, 64, 64, 3) and stack.dtype == np.uint8
    assert [r["array_index"] for r in rows] == list(range(12))
    assert len({r["subject_id"] for r in rows}) == 12  # one subject per face
    again = generate_gan_faces(12, seed=3, out_dir=tmp_path)
    assert np.array_equal(np.load(again[0]["image_path"]), stack)  # a seed is a corpus
    other = generate_gan_faces(2, seed=4, out_dir=tmp_path)
    assert not np.array_equal(np.load(other[0]["image_path"]), stack[:2])
    assert np.array_equal(load_face_images(rows[3:5]), stack[3:5])


def test_pseudo_label_gan_faces(gan) -> None:
    _, stack = gan
    labels = pseudo_label(stack)
    assert labels["gender"].shape == (12,) and labels["gender"].dtype == np.float32
    assert ((labels["gender"] >= 0) & (labels["gender"] <= 1)).all()
    assert ((labels["age"] >= 0.25) & (labels["age"] <= 80)).all()
    assert set(labels["age_group"]) <= set(AGE_GROUPS)
    assert labels["gender"].std() > 0.05  # the faces differ, so must the predictions
    with pytest.raises(ValueError):
        pseudo_label(stack.astype(np.float32))


# --------------------------------------------------------------------------- footage

def test_faces_from_footage_one_subject(carphone_rows) -> None:
    rows = carphone_rows
    rows_to_table("faces", rows)
    assert len({r["subject_id"] for r in rows}) == 1  # the man on the phone, one track
    assert len(rows) >= 8
    frames = [r["frame_index"] for r in rows]
    assert frames == sorted(set(frames)) and max(frames) <= 15
    assert rows[0]["subject_id"].startswith("carphone#")
    stack = np.load(rows[0]["image_path"])
    assert stack.shape == (len(rows), 64, 64, 3) and stack.dtype == np.uint8
    assert stack.std() > 10  # real pixels
    # Preprocessing sanity on a real face: the models call him male.
    labels = pseudo_label(stack)
    assert labels["gender"].mean() > 0.5


def test_faces_from_footage_holdout_cap_and_min_length(clips, tmp_path: Path) -> None:
    video = clips["carphone"]  # 16 frames
    head = faces_from_footage([video], tmp_path, FixedBoxDetector(), keep_fraction=0.75)
    assert [r["frame_index"] for r in head] == list(range(12))  # last quarter never read
    capped = faces_from_footage([video], tmp_path / "c", FixedBoxDetector(), max_frames_per_sequence=5)
    frames = [r["frame_index"] for r in capped]
    assert len(frames) == 5 and frames[0] == 0 and frames[-1] >= 12  # spread over the track
    assert faces_from_footage([video], tmp_path / "m", FixedBoxDetector(), min_track_frames=17) == []


# --------------------------------------------------------------------------- export

def test_export_round_trip(gan, carphone_rows, tmp_path: Path) -> None:
    gan_rows, stack = gan
    frames = np.random.default_rng(1).integers(0, 256, (6, 100, 120, 3), dtype=np.uint8)
    video = write_video(tmp_path / "clip.mkv", frames)
    picture = tmp_path / "still.png"
    Image.fromarray(frames[0]).save(picture)
    extra = [
        # P-DESTRE style: a frame of a video plus a 64×64 box, so the crop is raw pixels.
        face_row(dataset="pdestre", subject_id="7", sequence_id="v/7", frame_index=4, image_path=video,
                 run_id="r1", box=(30, 20, 64, 64), gender=0.0, age_group="senior", label_source="annotation"),
        face_row(dataset="pdestre", subject_id="7", sequence_id="v/7", frame_index=2, image_path=video,
                 run_id="r1", box=(30, 20, 64, 64), gender=0.0, age_group="senior", label_source="annotation"),
        # A box crossing the right edge is clipped, then resized like the pipeline does.
        face_row(dataset="stills", subject_id="7", sequence_id="s", frame_index=0, image_path=picture,
                 run_id="r1", box=(100, 10, 40, 40), label_source="annotation"),
    ]
    rows = add_pseudo_labels([dict(r) for r in gan_rows[:6]] + [dict(r) for r in carphone_rows] + extra)
    assert all(r["label_source"] == LABEL_SOURCE_PSEUDO for r in rows[:-3])
    assert rows[-1]["gender"] is None  # annotated rows are never overwritten
    df = pd.DataFrame(rows)
    path = export_training_tensors(df, tmp_path / "faces.pt")
    blob = torch.load(path, weights_only=True)

    n = len(rows)
    assert blob["format"] == TENSORS_FORMAT
    assert blob["images"].dtype == torch.uint8 and blob["images"].shape == (n, 3, 64, 64)
    for key in ("subject", "sequence", "frame"):
        assert blob[key].dtype == torch.int64 and blob[key].shape == (n,)
    assert blob["labels"].dtype == torch.float32 and blob["labels"].shape == (n, 3)
    assert blob["split"].dtype == torch.int8 and blob["label_names"] == ["id", "gender", "age_group"]

    hwc = blob["images"].permute(0, 2, 3, 1).numpy()
    assert np.array_equal(hwc[:6], stack[:6])
    assert np.array_equal(hwc[n - 3], frames[4, 20:84, 30:94])
    assert np.array_equal(hwc[n - 2], frames[2, 20:84, 30:94])
    assert np.array_equal(blob["frame"].numpy(), df["frame_index"].to_numpy())
    # Subjects: 6 GAN faces, 1 track, and pdestre/7 ≠ stills/7 (the dataset is part of the key).
    assert blob["subject"].unique().numel() == 6 + 1 + 2
    assert blob["subject"][n - 3] == blob["subject"][n - 2] != blob["subject"][n - 1]
    assert blob["sequence"].unique().numel() == 6 + 1 + 2
    labels = blob["labels"].numpy()
    assert np.array_equal(labels[:, 0], blob["subject"].numpy().astype(np.float32))
    assert labels[n - 3, 1] == 0.0 and labels[n - 3, 2] == AGE_GROUPS.index("senior")
    assert np.isnan(labels[n - 1, 1:]).all()
    assert set(np.unique(labels[:-1, 1])) <= {0.0, 1.0}
    # Split is per subject, and matches the catalog rows.
    names = ["train", "val", "test"]
    assert [names[s] for s in blob["split"].tolist()] == df["split"].tolist()
    for s in blob["subject"].unique():
        assert blob["split"][blob["subject"] == s].unique().numel() == 1

    df.loc[df.index[0], "split"] = "test" if df.loc[df.index[0], "split"] != "test" else "train"
    df.loc[df.index[1], "subject_id"] = df.loc[df.index[0], "subject_id"]
    df.loc[df.index[1], "split"] = "val" if df.loc[df.index[0], "split"] != "val" else "train"
    with pytest.raises(ValueError, match="more than one split"):
        export_training_tensors(df, tmp_path / "leak.pt")


# --------------------------------------------------------------------------- default corpus

def test_build_default_corpus_tiny(clips, tmp_path: Path) -> None:
    # The real detector is exercised above; a fixed box keeps this test about the corpus.
    faces = build_default_corpus(tmp_path, n_gan=16, seed=0, footage=[clips["carphone"]],
                                 detector=FixedBoxDetector())
    again = CatalogStore(tmp_path / "catalogs").read("faces")
    assert len(again) == len(faces) > 16
    assert (faces["dataset"] == "dcgan").sum() == 16
    footage = faces[faces["dataset"] == "footage"]
    assert footage["frame_index"].tolist() == list(range(12))  # last 25% of 16 frames held out
    assert (faces["label_source"] == LABEL_SOURCE_PSEUDO).all()
    assert faces["gender"].between(0, 1).all() and faces["age_group"].isin(AGE_GROUPS).all()
    holdout = json.loads((tmp_path / "holdout.json").read_text())
    assert holdout["clips"][0]["first_held_out_frame"] == 12 and holdout["clips"][0]["frame_count"] == 16
    blob = torch.load(export_training_tensors(faces, tmp_path / "t.pt"), weights_only=True)
    assert blob["images"].shape == (len(faces), 3, 64, 64)
