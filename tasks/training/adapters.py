"""Dataset adapters: each face source on disk → rows of the `faces` catalog table.

Every adapter walks one published layout and returns plain row dicts (the `faces`
schema in catalogs/schemas.py). No pixels are read beyond one header per sequence
(for the image size); cropping happens once, in `tasks.training.corpus.load_face_images`.

Conventions shared by all adapters:
- The box columns hold the **head ROI to crop**, in absolute integer pixels, exactly as
  the pipeline's `rois` table does; null means the whole image. Where a source gives a
  face box, the ROI comes from `tasks.datapath.track.head_roi` with the pipeline's scale, so
  training crops are framed like the crops the pipeline will feed the U-Nets.
- The split is drawn per subject from a hash of "dataset/subject_id"
  (`assign_split`), so a held-out identity never shows up in training, on any machine,
  in any run, whatever order files are listed in.
- Paths are stored absolute: the catalog is read by later stages from other folders.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from catalogs import new_run_id
from tasks.datapath.track import head_roi

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
AGE_GROUPS = ("child", "young", "adult", "senior")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v"})
LABEL_SOURCE_ANNOTATION = "annotation"
DEFAULT_ROI_SCALE = 1.3  # the pipeline's default (tasks.datapath.video_loop.PipelineSettings.roi_scale)

Box = tuple[int, int, int, int]  # x, y, w, h


# --------------------------------------------------------------------------- shared helpers

def assign_split(subject_key: str, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """"train" | "val" | "test" for a subject, from a stable hash of its key.

    SHA-256 rather than `hash()`: Python salts `hash` per process, and the split must
    be the same in every run, or yesterday's test subject becomes today's training one.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction > 1:
        raise ValueError(f"bad fractions: val {val_fraction}, test {test_fraction}")
    digest = hashlib.sha256(subject_key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def age_group(age_years: float) -> str:
    """Coarse age group: child < 13 ≤ young < 30 ≤ adult ≤ 55 < senior."""
    if not math.isfinite(age_years) or age_years < 0:
        raise ValueError(f"not an age: {age_years!r}")
    if age_years < 13:
        return "child"
    if age_years < 30:
        return "young"
    if age_years <= 55:
        return "adult"
    return "senior"


def face_row(
    *,
    dataset: str,
    subject_id: str,
    sequence_id: str,
    frame_index: int,
    image_path: str | Path,
    run_id: str,
    array_index: int | None = None,
    box: Box | None = None,
    gender: float | None = None,
    age_group: str | None = None,
    ethnicity: str | None = None,
    hairstyle: str | None = None,
    label_source: str | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """One `faces` row; the split defaults to the subject's hashed split."""
    x, y, w, h = box if box is not None else (None, None, None, None)
    if box is not None and (w < 1 or h < 1):
        raise ValueError(f"{image_path}: empty box {box}")
    return {
        "dataset": dataset,
        "subject_id": subject_id,
        "sequence_id": sequence_id,
        "frame_index": int(frame_index),
        "image_path": str(Path(image_path).resolve()),
        "array_index": None if array_index is None else int(array_index),
        "box_x": x, "box_y": y, "box_w": w, "box_h": h,
        "gender": None if gender is None else float(gender),
        "age_group": age_group,
        "ethnicity": ethnicity,
        "hairstyle": hairstyle,
        "label_source": label_source,
        "split": split or assign_split(f"{dataset}/{subject_id}"),
        "run_id": run_id,
    }


def _natural_key(name: str) -> list[Any]:
    """"f2" before "f10": file names number frames without zero padding."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only."""
    with Image.open(path) as image:
        return image.size


def _top_square(x: int, y: int, w: int, h: int) -> Box:
    """Head ROI of a whole-body box: the square at its top, as wide as the box.

    Pedestrian crops (MARS, P-DESTRE) have no face box. The head is at the top, centred;
    the top square (side = box width, or the height if the box is wider than tall) is
    sure to contain it, with the shoulders: at 64×64 the face then covers roughly the top
    third of the crop, smaller than in a pipeline crop (head ROI = 1.3 × face box). A
    tighter guess would cut heads off whenever the person leans or the box is loose.
    """
    side = min(w, h)
    return x + (w - side) // 2, y, side, side


# --------------------------------------------------------------------------- MARS

# bbox_train/0001/0001C1T0001F001.jpg: person 0001, camera 1, tracklet 0001, frame 001.
_MARS_NAME = re.compile(r"^(?P<pid>-?[\d-]+)C(?P<cam>\d+)T(?P<tracklet>\d+)F(?P<frame>\d+)\.jpe?g$", re.I)


def _mars_junk(pid: str) -> bool:
    """MARS's non-identities: "0000" are distractors, "00-1" junk boxes (bbox_test only)."""
    return "-" in pid or int(pid) == 0


def read_mars(root: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """MARS video re-id: `bbox_train|bbox_test/<pid>/<pid>C<cam>T<tracklet>F<frame>.jpg`.

    - Subject = person id; sequence = one tracklet (pid, camera, tracklet); frame_index =
      the F number − 1 (MARS numbers frames in a tracklet from 1).
    - Distractors (pid 0000) and junk boxes (pid 00-1 / -1) are skipped: they are not
      identities, and feeding them as subjects would teach the matcher wrong pairs.
    - Crops are whole bodies: the ROI is the top square of the image (see `_top_square`).
    - The split is our per-subject hash, not MARS's train/test folders (its 625/636
      identity split is disjoint too, but one rule for every source keeps the held-out
      fraction uniform).
    """
    root = Path(root)
    run_id = run_id or new_run_id()
    parts = [root / name for name in ("bbox_train", "bbox_test") if (root / name).is_dir()]
    if not parts:
        raise FileNotFoundError(f"{root}: no bbox_train/ or bbox_test/ folder (MARS layout)")
    rows: list[dict[str, Any]] = []
    skipped = 0
    for part in parts:
        for person in sorted(os.scandir(part), key=lambda e: e.name):
            if not person.is_dir():
                continue
            tracklets: dict[tuple[str, str, str], list[tuple[int, Path]]] = defaultdict(list)
            for entry in os.scandir(person.path):
                match = _MARS_NAME.match(entry.name)
                if match is None:
                    continue
                if _mars_junk(match["pid"]):
                    skipped += 1
                    continue
                key = (match["pid"], match["cam"], match["tracklet"])
                tracklets[key].append((int(match["frame"]), Path(entry.path)))
            for (pid, cam, tracklet), frames in sorted(tracklets.items()):
                frames.sort()
                width, height = _image_size(frames[0][1])  # MARS resizes every crop alike
                box = _top_square(0, 0, width, height)
                sequence = f"{pid}C{cam}T{tracklet}"
                rows.extend(
                    face_row(dataset="mars", subject_id=pid, sequence_id=sequence,
                             frame_index=frame - 1, image_path=path, run_id=run_id, box=box)
                    for frame, path in frames)
    if skipped:
        log.info("MARS: skipped %d distractor/junk images (pid 0000 and 00-1)", skipped)
    return rows


# --------------------------------------------------------------------------- P-DESTRE

# Column order of one P-DESTRE annotation line (comma separated, one line per person per
# frame). Confirmed from a third-party loader: frame, ID, then the body box as left, top,
# width, height, then gender. The rest follows the order the dataset page lists the soft
# labels in, NOT confirmed against a real file: correct it here if the release differs.
PDESTRE_COLUMNS: tuple[str, ...] = (
    "frame", "id", "x", "y", "w", "h",
    "gender", "age", "height", "body_volume", "ethnicity", "hair_color", "hairstyle",
    "beard", "moustache", "glasses", "head_accessories", "upper_clothing",
    "lower_clothing", "feet", "accessories", "action",
)
# Frames in the annotation files count from 1 (the same loader reads frames 1..max);
# our frame_index is the 0-based frame of the video. Unconfirmed, like the codes below.
PDESTRE_FIRST_FRAME = 1
# Label codes, as recalled from the P-DESTRE paper's attribute table (unconfirmed).
# A code missing from a map (including each attribute's "unknown") gives a null label.
PDESTRE_GENDER: Mapping[int, float] = {0: 1.0, 1: 0.0}  # 0 male, 1 female → P(male)
PDESTRE_AGE: Mapping[int, str] = {  # 0-11, 12-17, 18-24, 25-34, 35-44, 45-54, 55-64, 65+
    0: "child", 1: "young", 2: "young", 3: "young", 4: "adult", 5: "adult", 6: "senior", 7: "senior"}
PDESTRE_ETHNICITY: Mapping[int, str] = {0: "white", 1: "black", 2: "asian", 3: "indian"}
PDESTRE_HAIRSTYLE: Mapping[int, str] = {0: "bald", 1: "short", 2: "medium", 3: "long", 4: "horse_tail"}

_FIELD_SEPARATOR = re.compile(r"[,\s]+")


def _pdestre_code(values: list[str], name: str) -> int | None:
    index = PDESTRE_COLUMNS.index(name)
    if index >= len(values) or values[index] == "":
        return None
    return int(float(values[index]))


def read_pdestre(root: str | Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """P-DESTRE (UAV pedestrians): videos plus one annotation `.txt` per video, same stem.

    Rows point at the video file and a frame index; frames are decoded when the images
    are loaded. Subject = the person ID (P-DESTRE keeps IDs across days: that is its
    point); sequence = (video, ID). Rows with a negative ID (unidentified) are skipped.
    The ROI is the top square of the body box (see `_top_square`), clipped at the top and
    left; the right and bottom are clipped against the frame when it is read.
    Files are found anywhere under `root`; an annotation whose video is missing is
    skipped with a warning (partial downloads are common).
    """
    root = Path(root)
    run_id = run_id or new_run_id()
    videos = {p.stem: p for p in sorted(root.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES}
    rows: list[dict[str, Any]] = []
    for annotation in sorted(root.rglob("*.txt")):
        video = videos.get(annotation.stem)
        if video is None:
            log.warning("P-DESTRE: no video for annotation %s, skipped", annotation)
            continue
        with open(annotation, encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                values = _FIELD_SEPARATOR.split(line)
                if len(values) < 6:
                    raise ValueError(f"{annotation}:{line_no}: expected at least frame, id, box; got {line!r}")
                frame, pid = int(float(values[0])), int(float(values[1]))
                if pid < 0:
                    continue
                x, y, w, h = (int(round(float(v))) for v in values[2:6])
                if w < 1 or h < 1:
                    continue
                bx, by, bw, bh = _top_square(x, y, w, h)
                bx, by = max(0, bx), max(0, by)
                labels = {
                    "gender": PDESTRE_GENDER.get(_pdestre_code(values, "gender")),
                    "age_group": PDESTRE_AGE.get(_pdestre_code(values, "age")),
                    "ethnicity": PDESTRE_ETHNICITY.get(_pdestre_code(values, "ethnicity")),
                    "hairstyle": PDESTRE_HAIRSTYLE.get(_pdestre_code(values, "hairstyle")),
                }
                known = any(v is not None for v in labels.values())
                rows.append(face_row(
                    dataset="pdestre", subject_id=str(pid), sequence_id=f"{video.stem}/{pid}",
                    frame_index=frame - PDESTRE_FIRST_FRAME, image_path=video, run_id=run_id,
                    box=(bx, by, bw, bh), label_source=LABEL_SOURCE_ANNOTATION if known else None,
                    **labels))
    return rows


# --------------------------------------------------------------------------- YouTube Faces

# frame_images_DB/<person>/<video>/<video>.<frame>.jpg
_YTF_NAME = re.compile(r"^(?P<video>\d+)\.(?P<frame>\d+)\.jpe?g$", re.I)


def _ytf_face_boxes(labels_file: Path) -> dict[str, tuple[float, float, float, float]]:
    """`<person>.labeled_faces.txt`: filename, _, x, y, width, height, _, _ with (x, y) the
    face centre; file names use backslashes (the database was built on Windows)."""
    boxes = {}
    with open(labels_file, encoding="utf-8", newline="") as handle:
        for fields in csv.reader(handle):
            if len(fields) < 6:
                continue
            name = fields[0].strip().replace("\\", "/")
            boxes[name] = tuple(float(v) for v in fields[2:6])
    return boxes


def read_youtube_faces(root: str | Path, run_id: str | None = None,
                       roi_scale: float = DEFAULT_ROI_SCALE) -> list[dict[str, Any]]:
    """YouTube Faces: `frame_images_DB/<person>/<video>/<video>.<frame>.jpg`.

    `root` is the folder holding `frame_images_DB/`, or that folder itself. Subject = the
    person, sequence = person/video, frame_index = the number after the dot. Where the
    person's `labeled_faces.txt` gives a face box, the ROI is the pipeline's head ROI of
    it (`head_roi`, scale `roi_scale`); otherwise it is null (whole frame).
    """
    root = Path(root)
    run_id = run_id or new_run_id()
    base = root / "frame_images_DB" if (root / "frame_images_DB").is_dir() else root
    people = sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.name)
    if not people:
        raise FileNotFoundError(f"{base}: no person folders (YouTube Faces frame_images_DB layout)")
    rows: list[dict[str, Any]] = []
    for person in people:
        labels_file = base / f"{person.name}.labeled_faces.txt"
        boxes = _ytf_face_boxes(labels_file) if labels_file.is_file() else {}
        for video in sorted((v for v in person.iterdir() if v.is_dir()), key=lambda v: _natural_key(v.name)):
            frames = []
            for image in video.iterdir():
                match = _YTF_NAME.match(image.name)
                if match is not None:
                    frames.append((int(match["frame"]), image))
            if not frames:
                continue
            frames.sort()
            width, height = _image_size(frames[0][1])  # one size per video
            for frame, image in frames:
                face = boxes.get(f"{person.name}/{video.name}/{image.name}")
                box = None
                if face is not None:
                    cx, cy, fw, fh = face
                    corners = np.array([cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2])
                    box = head_roi(corners, width, height, roi_scale)
                rows.append(face_row(dataset="youtube_faces", subject_id=person.name,
                                     sequence_id=f"{person.name}/{video.name}", frame_index=frame,
                                     image_path=image, run_id=run_id, box=box))
    return rows


# --------------------------------------------------------------------------- generic folders

_LABEL_COLUMNS = ("gender", "age_group", "ethnicity", "hairstyle")
_MALE = {"male", "m", "man"}
_FEMALE = {"female", "f", "woman"}


def _parse_gender(text: str) -> float | None:
    text = text.strip().lower()
    if text == "":
        return None
    if text in _MALE:
        return 1.0
    if text in _FEMALE:
        return 0.0
    value = float(text)  # a probability P(male), or 0/1
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"gender {text!r} is not male/female or a probability in [0, 1]")
    return value


def _parse_age_group(text: str) -> str | None:
    text = text.strip().lower()
    if text == "":
        return None
    if text in AGE_GROUPS:
        return text
    return age_group(float(text))  # an age in years


def _read_labels_csv(path: Path) -> dict[str, dict[str, Any]]:
    labels: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "subject_id" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a header with a subject_id column")
        for line_no, record in enumerate(reader, 2):
            try:
                parsed = {
                    "gender": _parse_gender(record.get("gender") or ""),
                    "age_group": _parse_age_group(record.get("age_group") or ""),
                    "ethnicity": (record.get("ethnicity") or "").strip() or None,
                    "hairstyle": (record.get("hairstyle") or "").strip() or None,
                }
            except ValueError as err:
                raise ValueError(f"{path}:{line_no}: {err}") from err
            labels[record["subject_id"].strip()] = parsed
    return labels


def read_track_folder(root: str | Path, dataset: str = "track_folder",
                      run_id: str | None = None) -> list[dict[str, Any]]:
    """Any archive of face tracks: `<subject>/<sequence>/*.png|jpg` (+ optional `labels.csv`).

    Images are taken whole (already face crops). frame_index = position in natural
    file-name order ("f2" before "f10"). `labels.csv` has a `subject_id` column and any of
    gender (male/female/m/f or P(male)), age_group (child/young/adult/senior, or an age
    in years), ethnicity, hairstyle; a subject's labels apply to all its images.
    """
    root = Path(root)
    run_id = run_id or new_run_id()
    labels_file = root / "labels.csv"
    labels = _read_labels_csv(labels_file) if labels_file.is_file() else {}
    rows: list[dict[str, Any]] = []
    for subject in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name):
        subject_labels = labels.get(subject.name, {})
        known = any(subject_labels.get(c) is not None for c in _LABEL_COLUMNS)
        for sequence in sorted((p for p in subject.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name)):
            images = sorted((p for p in sequence.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                            key=lambda p: _natural_key(p.name))
            rows.extend(
                face_row(dataset=dataset, subject_id=subject.name,
                         sequence_id=f"{subject.name}/{sequence.name}", frame_index=i,
                         image_path=image, run_id=run_id,
                         label_source=LABEL_SOURCE_ANNOTATION if known else None,
                         **{c: subject_labels.get(c) for c in _LABEL_COLUMNS})
                for i, image in enumerate(images))
    unknown = sorted(set(labels) - {p.name for p in root.iterdir() if p.is_dir()})
    if unknown:
        log.warning("%s: labels.csv names subjects with no folder: %s", root, unknown[:5])
    return rows


def subjects_by_split(rows: Iterable[Mapping[str, Any]]) -> dict[str, set[str]]:
    """split → the "dataset/subject" keys in it (a check that no subject straddles splits)."""
    out: dict[str, set[str]] = {s: set() for s in SPLITS}
    for row in rows:
        out[row["split"]].add(f"{row['dataset']}/{row['subject_id']}")
    return out
