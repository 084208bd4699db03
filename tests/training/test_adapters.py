"""Dataset adapters on tiny fixtures laid out exactly like the real releases."""
from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalogs import CatalogStore
from catalogs.store import rows_to_table
from tasks.datapath.track import head_roi
from tasks.training.adapters import (PDESTRE_COLUMNS, age_group, assign_split, read_mars, read_pdestre,
                                     read_track_folder, read_youtube_faces, subjects_by_split)


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    """A lossless RGB clip (frames uint8 (n, H, W, 3)) through the bundled ffmpeg."""
    import imageio_ffmpeg

    n, height, width, _ = frames.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-c:v", "libx264rgb", "-qp", "0", str(path)]
    subprocess.run(cmd, input=frames.tobytes(), check=True)
    return path


def assert_valid_rows(rows: list[dict]) -> None:
    """Rows satisfy the faces schema, and each subject sits in exactly one split."""
    rows_to_table("faces", rows)
    splits: dict[str, set[str]] = {}
    for row in rows:
        splits.setdefault(f"{row['dataset']}/{row['subject_id']}", set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values())


# --------------------------------------------------------------------------- split and labels

def test_assign_split_is_stable_and_respects_fractions() -> None:
    keys = [f"mars/{i:04d}" for i in range(4000)]
    splits = [assign_split(k) for k in keys]
    assert splits == [assign_split(k) for k in keys]  # deterministic (no per-process salt)
    counts = Counter(splits)
    assert 0.07 < counts["val"] / len(keys) < 0.13
    assert 0.07 < counts["test"] / len(keys) < 0.13
    assert set(assign_split(k, 0.0, 0.0) for k in keys) == {"train"}
    assert set(assign_split(k, 0.0, 1.0) for k in keys) == {"test"}
    with pytest.raises(ValueError):
        assign_split("x", 0.6, 0.6)


def test_age_groups_boundaries() -> None:
    assert [age_group(a) for a in (0, 12.9, 13, 29.9, 30, 55, 55.1, 90)] == \
        ["child", "child", "young", "young", "adult", "adult", "senior", "senior"]
    with pytest.raises(ValueError):
        age_group(float("nan"))


# --------------------------------------------------------------------------- MARS

def test_read_mars(tmp_path: Path) -> None:
    root = tmp_path / "MARS"
    for frame in (1, 2, 3):
        write_image(root / "bbox_train/0001" / f"0001C1T0001F{frame:03d}.jpg", 16, 32, frame)
    write_image(root / "bbox_train/0001/0001C2T0002F001.jpg", 16, 32)
    write_image(root / "bbox_train/0000/0000C1T0001F001.jpg", 16, 32)  # distractor
    write_image(root / "bbox_test/00-1/00-1C3T0001F001.jpg", 16, 32)  # junk
    write_image(root / "bbox_test/0002/0002C6T0004F010.jpg", 16, 32)
    (root / "bbox_test/0002/Thumbs.db").write_bytes(b"not an image")

    rows = read_mars(root, run_id="r1")
    assert_valid_rows(rows)
    assert {r["subject_id"] for r in rows} == {"0001", "0002"}  # 0000 and 00-1 skipped
    assert Counter(r["sequence_id"] for r in rows) == {"0001C1T0001": 3, "0001C2T0002": 1, "0002C6T0004": 1}
    first = [r for r in rows if r["sequence_id"] == "0001C1T0001"]
    assert [r["frame_index"] for r in first] == [0, 1, 2]  # F001 → 0
    assert first[0]["image_path"].endswith("0001C1T0001F001.jpg")
    assert (first[0]["box_x"], first[0]["box_y"], first[0]["box_w"], first[0]["box_h"]) == (0, 0, 16, 16)
    assert all(r["dataset"] == "mars" and r["run_id"] == "r1" and r["label_source"] is None for r in rows)
    with pytest.raises(FileNotFoundError):
        read_mars(tmp_path / "empty")


# --------------------------------------------------------------------------- P-DESTRE

def pdestre_line(frame: int, pid: int, box: tuple[int, int, int, int], **codes: int) -> str:
    values = {name: 0 for name in PDESTRE_COLUMNS}
    values.update(frame=frame, id=pid, x=box[0], y=box[1], w=box[2], h=box[3], **codes)
    return ",".join(str(values[name]) for name in PDESTRE_COLUMNS)


def test_read_pdestre(tmp_path: Path) -> None:
    root = tmp_path / "P-DESTRE"
    (root / "videos").mkdir(parents=True)
    (root / "annotation").mkdir()
    frames = np.random.default_rng(0).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8)
    write_video(root / "videos/08-11-2019-1-1.MP4", frames)
    lines = [
        pdestre_line(1, 7, (10, 4, 12, 30), gender=1, age=4, ethnicity=2, hairstyle=3),
        pdestre_line(2, 7, (11, 5, 12, 30), gender=1, age=4, ethnicity=2, hairstyle=3),
        pdestre_line(2, 9, (40, 2, 20, 16), gender=0, age=0, ethnicity=9, hairstyle=9),  # wider than tall
        pdestre_line(3, -1, (0, 0, 10, 10)),  # unidentified: skipped
        "",
    ]
    (root / "annotation/08-11-2019-1-1.txt").write_text("\n".join(lines))
    (root / "annotation/README.txt").write_text("no video has this stem")

    rows = read_pdestre(root, run_id="r1")
    assert_valid_rows(rows)
    assert len(rows) == 3
    a, b, c = rows
    assert (a["subject_id"], a["sequence_id"], a["frame_index"]) == ("7", "08-11-2019-1-1/7", 0)
    assert b["frame_index"] == 1  # P-DESTRE counts frames from 1
    assert a["image_path"].endswith("08-11-2019-1-1.MP4")
    assert (a["box_x"], a["box_y"], a["box_w"], a["box_h"]) == (10, 4, 12, 12)  # top square of the body
    assert (c["box_x"], c["box_y"], c["box_w"], c["box_h"]) == (42, 2, 16, 16)  # centred when wide
    assert (a["gender"], a["age_group"], a["ethnicity"], a["hairstyle"]) == (0.0, "adult", "asian", "long")
    assert a["label_source"] == "annotation"
    assert (c["gender"], c["age_group"], c["ethnicity"], c["hairstyle"]) == (1.0, "child", None, None)


# --------------------------------------------------------------------------- YouTube Faces

def test_read_youtube_faces(tmp_path: Path) -> None:
    db = tmp_path / "YouTubeFaces/frame_images_DB"
    for frame in (12, 9, 10):
        write_image(db / "Aaron_Eckhart/0" / f"0.{frame}.jpg", 80, 60, frame)
    write_image(db / "Aaron_Eckhart/1/1.5.jpg", 80, 60)
    write_image(db / "Zoe_Ball/3/3.618.jpg", 80, 60)
    (db / "Aaron_Eckhart.labeled_faces.txt").write_text(
        "Aaron_Eckhart\\0\\0.9.jpg,0,40,30,20,20,0.0,1\n"
        "Aaron_Eckhart\\0\\0.10.jpg,0,70,30,20,20,0.0,1\n")

    rows = read_youtube_faces(tmp_path / "YouTubeFaces", run_id="r1")
    assert rows == read_youtube_faces(db, run_id="r1")  # either folder works
    assert_valid_rows(rows)
    assert [(r["sequence_id"], r["frame_index"]) for r in rows] == [
        ("Aaron_Eckhart/0", 9), ("Aaron_Eckhart/0", 10), ("Aaron_Eckhart/0", 12),
        ("Aaron_Eckhart/1", 5), ("Zoe_Ball/3", 618)]
    box = lambda r: (r["box_x"], r["box_y"], r["box_w"], r["box_h"])  # noqa: E731
    # The pipeline's head ROI of the labelled face box (centre 40,30; 20×20): 26×26 around it.
    assert box(rows[0]) == head_roi(np.array([30.0, 20.0, 50.0, 40.0]), 80, 60, 1.3) == (27, 17, 26, 26)
    assert box(rows[1]) == (57, 17, 23, 26)  # clipped at the right edge, as in the pipeline
    assert box(rows[2]) == (None, None, None, None)  # unlabelled frame: whole image
    assert {r["subject_id"] for r in rows} == {"Aaron_Eckhart", "Zoe_Ball"}


# --------------------------------------------------------------------------- generic folders

def test_read_track_folder_with_labels(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    for i in (1, 2, 10):
        write_image(root / "alice/cam1_morning" / f"f{i}.png", 24, 24, i)
    write_image(root / "alice/cam2/a.jpg", 24, 24)
    write_image(root / "bob/s1/x.jpg", 24, 24)
    (root / "bob/s1/notes.txt").write_text("ignored")
    (root / "labels.csv").write_text("subject_id,gender,age_group,ethnicity\nalice,female,41,\ncarol,m,adult,\n")

    rows = read_track_folder(root, dataset="my_archive", run_id="r1")
    assert_valid_rows(rows)
    alice = [r for r in rows if r["subject_id"] == "alice"]
    assert [Path(r["image_path"]).name for r in alice] == ["f1.png", "f2.png", "f10.png", "a.jpg"]
    assert [r["frame_index"] for r in alice] == [0, 1, 2, 0]
    assert {r["sequence_id"] for r in alice} == {"alice/cam1_morning", "alice/cam2"}
    assert all((r["gender"], r["age_group"], r["ethnicity"], r["label_source"]) == (0.0, "adult", None, "annotation")
               for r in alice)
    (bob,) = [r for r in rows if r["subject_id"] == "bob"]
    assert (bob["gender"], bob["age_group"], bob["label_source"]) == (None, None, None)
    assert bob["dataset"] == "my_archive" and bob["box_x"] is None

    (root / "labels.csv").write_text("subject_id,gender\nalice,2.5\n")
    with pytest.raises(ValueError, match="labels.csv:2"):
        read_track_folder(root)


def test_rows_from_every_adapter_share_one_table(tmp_path: Path) -> None:
    """Adapters write into the same catalog table and read back typed by its schema."""
    root = tmp_path / "archive"
    for s in range(30):
        write_image(root / f"person{s:02d}/seq/0.png", 8, 8, s)
    rows = read_track_folder(root, run_id="r1")
    store = CatalogStore(tmp_path / "catalogs")
    store.write_part("faces", "r1", "archive", rows)
    df = store.read("faces")
    assert len(df) == 30 and str(df["frame_index"].dtype) == "Int32"
    by_split = subjects_by_split(rows)
    assert sum(len(v) for v in by_split.values()) == 30
    assert not (by_split["train"] & by_split["test"])
