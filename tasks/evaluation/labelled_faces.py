"""A labelled faces catalog split through the real public and private modules.

Face datasets come as crops (MARS, P-DESTRE, YouTube Faces, the DCGAN corpus: see
tasks/training/adapters.py and the `faces` catalog); the pipeline takes video. So that the
evaluation judges the very code that runs on archived footage, the faces of a split
become one lossless "gallery" clip: every face upsampled and framed in grey (as the
detectors see crops everywhere in the evaluation), the frames of one catalog sequence
in a row, sequences separated by blank frames the tracker cannot bridge. Then
`anonymize_video` (detect, track, U_e, paste, stego, lossless encode, release check) and
`reconstruct_video` (payload, U_d) run on it unchanged, twice for the private module, and
each face is read back at the ROI the pipeline itself chose:

    x = the source frame, a = the public frame, r = the restored frame, all cropped at
    that ROI as the pipeline crops (64x64); r_wrong = U_d on the public frame with a
    wrong key's noise (the private module would refuse that key at the payload already).

A face the pipeline did not find is not de-identified at all: it is counted
(`GalleryRun.faces_missed`), and it is left out of the face measures, which describe
what the public stream shows where it did replace a face.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from catalogs import CatalogStore
from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import read_frames
from tasks.datapath.deidentify import FaceSwapper, crop_faces
from tasks.datapath.detect import FaceDetector
from tasks.datapath.encode import VideoWriter
from tasks.datapath.keys import DataKey, generate_key_pair, parse_private_key
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.track import Roi
from tasks.datapath.video_loop import PipelineSettings
from tasks.evaluation.evaluate import FaceSet
from tasks.evaluation.held_out import CONTEXT_BORDER, CONTEXT_GREY, CONTEXT_UPSAMPLE, from_uint8, in_context, to_uint8
from tasks.judges import SFaceJudge
from tasks.training.corpus import load_face_images

GALLERY_FPS = "25/1"
MIN_ROI_IOU = 0.5  # an ROI covers a gallery face when it overlaps the face's head square this much
VIRTUAL_SEQ_OFFSET = 1_000_000  # a sequence id no tracker reaches in a gallery clip: the diversity noise
_READ_CHUNK = 128  # gallery frames read back at once (192x192: ~14 MB per clip per chunk)


@dataclass
class GalleryRun:
    """What the pipeline did with the gallery clip of one split."""

    faces_selected: int
    faces_found: int
    frames: int
    sequences_tracked: int
    needs_review: bool
    review_frames: list[int] = field(default_factory=list)
    frames_with_payload: int = 0
    psnr_roi: float | None = None
    seconds_anonymize: float = 0.0
    seconds_reconstruct: float = 0.0
    label_sources: list[str] = field(default_factory=list)  # where the catalog's labels came from

    @property
    def faces_missed(self) -> int:
        return self.faces_selected - self.faces_found


def select_split(faces: pd.DataFrame, split: str, max_sequences: int, frames_per_sequence: int,
                 seed: int = 0) -> pd.DataFrame:
    """The rows of `split` to evaluate: at most `max_sequences` sequences (a seeded random
    choice when there are more), at most `frames_per_sequence` frames of each, evenly spaced.
    Ordered by sequence, then frame, so a sequence's frames follow each other in the clip."""
    rows = faces[faces["split"] == split]
    if rows.empty:
        present = sorted(faces["split"].unique()) if len(faces) else []
        raise ValueError(f"the faces catalog has no {split!r} rows (splits present: {present or 'none'})")
    if max_sequences < 1 or frames_per_sequence < 1:
        raise ValueError("max_sequences and frames_per_sequence must be >= 1")
    keys = rows[["dataset", "sequence_id"]].drop_duplicates().sort_values(["dataset", "sequence_id"])
    if len(keys) > max_sequences:
        keys = keys.iloc[np.sort(np.random.default_rng(seed).choice(len(keys), max_sequences, replace=False))]
    chosen = rows.merge(keys, on=["dataset", "sequence_id"])
    parts = []
    for _, seq in chosen.groupby(["dataset", "sequence_id"], sort=True):
        seq = seq.sort_values("frame_index")
        if len(seq) > frames_per_sequence:
            seq = seq.iloc[np.unique(np.linspace(0, len(seq) - 1, frames_per_sequence).round().astype(int))]
        parts.append(seq)
    return pd.concat(parts, ignore_index=True)


def gallery_id(rows: pd.DataFrame) -> str:
    """A 64-hex video id from the faces in the gallery, in order. File names, not paths: the
    same catalog built in another folder (a fresh clone) must give the same id."""
    digest = hashlib.sha256()
    columns = [c for c in ("dataset", "sequence_id", "frame_index", "image_path", "array_index") if c in rows]
    for row in rows[columns].assign(**({"image_path": rows["image_path"].map(lambda p: Path(str(p)).name)}
                                       if "image_path" in rows else {})).itertuples(index=False):
        digest.update(repr(tuple(row)).encode())
    return digest.hexdigest()


def head_square() -> tuple[int, int, int, int]:
    """(x, y, w, h) of the framed face crop inside a gallery frame."""
    side = 64 * CONTEXT_UPSAMPLE
    return CONTEXT_BORDER, CONTEXT_BORDER, side, side


def write_gallery(images: np.ndarray, sequence_of: np.ndarray, path: Path, gap: int) -> np.ndarray:
    """Write the gallery clip; returns the clip frame of every face.

    `gap` blank frames follow every sequence: more than the tracker's max_gap, so no track
    runs from one catalog sequence into the next and each gets its own keyed noise."""
    framed = in_context(images)
    size = framed.shape[1]
    blank = np.full((gap, size, size, 3), CONTEXT_GREY, dtype=np.uint8)
    frame_of = np.empty(len(images), dtype=np.int64)
    position = 0
    with VideoWriter(path, size, size, GALLERY_FPS) as writer:
        start = 0
        while start < len(images):
            stop = start + 1
            while stop < len(images) and sequence_of[stop] == sequence_of[start]:
                stop += 1
            writer.write(framed[start:stop])
            frame_of[start:stop] = np.arange(position, position + stop - start)
            position += stop - start
            writer.write(blank)
            position += gap
            start = stop
    return frame_of


def _iou(r: Roi, box: tuple[int, int, int, int]) -> float:
    x, y, w, h = box
    ix = max(0, min(r.x + r.w, x + w) - max(r.x, x))
    iy = max(0, min(r.y + r.h, y + h) - max(r.y, y))
    inter = ix * iy
    return inter / float(r.w * r.h + w * h - inter)


def rois_by_frame(catalog: CatalogStore, video_id: str) -> dict[int, list[Roi]]:
    table = catalog.read("rois", filters=[("video_id", "==", video_id)])
    out: dict[int, list[Roi]] = {}
    for row in table.itertuples(index=False):
        out.setdefault(int(row.frame_index), []).append(
            Roi(int(row.frame_index), int(row.seq_id), int(row.x), int(row.y), int(row.w), int(row.h),
                None if pd.isna(row.score) else float(row.score), bool(row.interpolated)))
    return out


def _crop(frame: np.ndarray, roi: Roi) -> np.ndarray:
    return to_uint8(crop_faces(frame, [roi], torch.device("cpu")))[0]


def run_split(rows: pd.DataFrame, work_dir: Path, *, key: DataKey, wrong_key: DataKey, detector: FaceDetector,
              swapper: FaceSwapper, settings: PipelineSettings, judge: SFaceJudge | None = None,
              run_id: str = "evaluate") -> tuple[FaceSet, GalleryRun]:
    """The gallery clip of `rows` through both modules; the faces the pipeline replaced, read back.

    `key` is the gallery video's data key (fixed, so a rerun draws the same noise), sealed to
    a throwaway authority whose private key then restores it. Which restore path is measured
    follows `settings.seal`: `none` measures the paper's learned U_d.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    # Each face is one still, alone between blank frames: not video, where faces last. The
    # detection schedule would skip most of them (agreeing blank frames on both sides), and
    # what is measured here is the face pair on every face, so the detector sees every frame.
    settings = dataclasses.replace(settings, detect_every=1)
    images = load_face_images(rows)
    seq_keys = (rows["dataset"].astype(str) + "/" + rows["sequence_id"].astype(str)).to_numpy()
    source = work_dir / "gallery.mkv"
    frame_of = write_gallery(images, seq_keys, source, gap=settings.max_gap + 1)
    # Named by what it holds, not by its bytes: x264's output is not bit-stable between runs,
    # and a changed id would change every keyed noise and so every number.
    video_id = gallery_id(rows)
    catalog = CatalogStore(work_dir / "catalogs")
    public = work_dir / "public.mkv"
    authority = parse_private_key(generate_key_pair()[0])
    record = anonymize_video(source, public, recipients=[authority.public], video_id=video_id, detector=detector,
                             swapper=swapper, settings=settings, run_id=run_id, catalog=catalog, progress=False,
                             judge=judge, data_key=key)
    restored = [work_dir / f"restored{i}.mkv" for i in (1, 2)]
    restores = [reconstruct_video(public, path, private_key=authority, swapper=swapper, settings=settings,
                                  source=source, progress=False) for path in restored]

    rois = rois_by_frame(catalog, video_id)
    square = head_square()
    picked: list[tuple[int, Roi]] = []  # (row, roi) of every face the pipeline replaced
    for row, frame in enumerate(frame_of):
        candidates = [(r, _iou(r, square)) for r in rois.get(int(frame), [])]
        best = max(candidates, key=lambda c: c[1], default=None)
        if best is not None and best[1] >= MIN_ROI_IOU:
            picked.append((row, best[0]))

    x, a, r, r_wrong, residual = [], [], [], [], 0.0
    wrong_noise = {}
    for start in range(0, len(picked), _READ_CHUNK):
        chunk = picked[start:start + _READ_CHUNK]
        frames = [int(frame_of[row]) for row, _ in chunk]
        src, pub, rest1, rest2 = (read_frames(p, frames) for p in (source, public, *restored))
        residual = max(residual, float(np.abs(rest1.astype(np.int16) - rest2.astype(np.int16)).max()))
        for i, (_, roi) in enumerate(chunk):
            x.append(_crop(src[i], roi))
            a.append(_crop(pub[i], roi))
            r.append(_crop(rest1[i], roi))
            if roi.seq_id not in wrong_noise:
                wrong_noise[roi.seq_id] = wrong_key.noise(roi.seq_id)
            # The private module's own restore code, only with the wrong key's noise.
            frame = pub[i].copy()
            swapper.restore([frame], [[roi]], lambda seq_id: wrong_noise[seq_id])
            r_wrong.append(_crop(frame, roi))

    subject_ids = rows["subject_id"].astype(str).to_numpy()
    kept = [row for row, _ in picked]
    names = sorted(set(subject_ids[kept]))
    index = {name: i for i, name in enumerate(names)}
    x_arr = _stack(x)
    a_seq0, a_seq1 = _virtual_sequences(swapper, x_arr, [roi for _, roi in picked], key)
    genders = rows["gender"].to_numpy(dtype=float, na_value=np.nan) if "gender" in rows else None
    faces = FaceSet(
        subjects=np.array([index[subject_ids[row]] for row in kept], dtype=np.int64),
        subject_names=names,
        frames=np.array([int(frame_of[row]) for row in kept], dtype=np.int64),
        x=x_arr, a=_stack(a), r=_stack(r), r_wrong=_stack(r_wrong), a_seq0=a_seq0, a_seq1=a_seq1,
        residual_max=residual,
        gender_labels=None if genders is None else genders[kept],
        sequences=np.array([roi.seq_id for _, roi in picked], dtype=np.int64))
    run = GalleryRun(
        faces_selected=len(rows), faces_found=len(picked), frames=record.frame_count,
        sequences_tracked=record.sequences, needs_review=record.needs_review,
        review_frames=list(record.review_frames), frames_with_payload=restores[0].frames_with_payload,
        psnr_roi=restores[0].psnr_roi, seconds_anonymize=record.seconds.get("total", 0.0),
        seconds_reconstruct=sum(rec.seconds.get("total", 0.0) for rec in restores),
        label_sources=sorted(rows["label_source"].dropna().astype(str).unique()) if "label_source" in rows else [])
    return faces, run


def _stack(faces: list[np.ndarray]) -> np.ndarray:
    return np.stack(faces) if faces else np.zeros((0, 64, 64, 3), np.uint8)


@torch.inference_mode()
def _virtual_sequences(swapper: FaceSwapper, x: np.ndarray, rois: list[Roi],
                       key: DataKey) -> tuple[np.ndarray, np.ndarray]:
    """U_e on the same x with the face's own sequence noise and with another sequence's."""
    if not len(x):
        return x.copy(), x.copy()
    pair = swapper.pair
    x_in = from_uint8(x, pair.device)

    def noise(offset: int) -> torch.Tensor:
        maps = np.stack([key.noise(r.seq_id + offset) for r in rois])
        return torch.from_numpy(maps).unsqueeze(1).to(pair.device)

    return to_uint8(pair.encoder(x_in, noise(0))), to_uint8(pair.encoder(x_in, noise(VIRTUAL_SEQ_OFFSET)))
