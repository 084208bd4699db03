"""The paper's Sec. IV evaluation, ours against the classic baselines, on one FaceSet.

A FaceSet comes from one of two places:
- held-out footage (`collect_faces` here), exactly as in the model card
  (`tasks/evaluation/held_out.py`): the last quarter of every clip, the best MTCNN face per frame,
  the pipeline's 64x64 head crop; each clip is one subject with one real sequence (id 0);
- a labelled faces catalog split run through the real public and private modules
  (`tasks/evaluation/labelled_faces.py`): subjects and gender labels from the catalog.
Either way a second, virtual sequence of the same person is the same x with another
sequence's keyed noise. Every method maps the x crops to a (uint8 64x64 faces); ours also
gives r (right key), r_wrong (wrong key) and a of the virtual sequence.

Measures (Sec. IV of the paper; eq. 14 for d'):
- detection: MTCNN on x and on a, framed as the model card frames them; confidence of the
  face's detection per crop, detection rate and AP ratios a/x with bootstrap mean +- sd;
- identity: decision environments x<->x' (same subject, other frame; impostor = other
  subject) and x<->a' (x against a of another frame of the same person); d' and AUC, for
  SFace (cosine) and dlib (negated Euclidean distance). They need two faces of one subject:
  a split of single-image subjects gets none (and no temporal measure), not a zero;
- temporal consistency (ours): a_t<->a_t+i of one sequence against a of other people;
- diversity (ours): a of sequence 0 against a of sequence 1 on the same frames; and, where
  a catalog gives one subject several sequences, a of one sequence against a of another;
- soft label: gender agreement x<->a (the gender judge on both), agreement of the judge's
  call on a with the catalog's label, and both per control vector s (`compare_controls`);
- reversibility (ours): PSNR and SSIM x<->r, SFace same-person rates x<->r and
  x<->r_wrong, and the largest pixel difference between two runs on the same input.

Everything here is a plain function over arrays; flows/evaluate.py orchestrates and writes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from catalogs.store import file_content_hash
from tasks.datapath.deidentify import FacePair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import DataKey
from tasks.evaluation.held_out import (
    CONTEXT_BORDER,
    CONTEXT_UPSAMPLE,
    SEQ_ID,
    from_uint8,
    in_context,
    run_clip,
    to_uint8,
    video_noise,
)
from tasks.evaluation.metrics import (
    average_precision,
    bootstrap,
    bootstrap_two_samples,
    decidability,
    detection_matches,
    ks_pvalue,
    pearson,
    psnr,
    roc_auc,
    roc_curve,
    ssim,
)
from tasks.judges import DlibJudge, GenderJudge, SFaceJudge, YuNetDetector

OURS = "ours"
VIRTUAL_SEQ_ID = 1  # the second sequence of the same person: same frames, other keyed noise
N_RESAMPLES = 100   # bootstrap subsets per estimate; the sd moves by < 10% beyond this
# The paper draws its 90% subsets "with repetition". Read as with replacement, the sd over
# subsets is close to the estimate's real sampling error; without replacement it would be
# about a third of it (a 90% subset shares most of its items with every other), and a
# reader would take a noisy number for a precise one.
WITH_REPETITION = True
GENDER_CUT = 0.5

Method = Callable[[np.ndarray], np.ndarray]


@dataclass
class FaceSet:
    """The faces of one evaluation dataset, one row per face, and what our pair makes of them."""

    subjects: np.ndarray        # (n,) index into `subject_names`: who the face is
    subject_names: list[str]    # a clip's name (one person per clip) or a catalog subject_id
    frames: np.ndarray          # (n,) frame index in its clip
    x: np.ndarray               # uint8 (n, 64, 64, 3)
    a: np.ndarray               # ours, as the public stream stores it
    r: np.ndarray               # U_d(a) with the right key
    r_wrong: np.ndarray         # U_d(a) with a wrong key
    a_seq0: np.ndarray          # ours on x again, with the face's own sequence noise (diversity reference)
    a_seq1: np.ndarray          # ours on x with another sequence's noise: the same person's other identity
    residual_max: float         # max |r1 - r2| over two runs of U_e then U_d on the same input
    gender_labels: np.ndarray | None = None  # (n,) P(male) from the catalog, NaN where unknown
    sequences: np.ndarray | None = None      # (n,) the pipeline's sequence (track) of each face


@dataclass
class Estimate:
    """A number; `sd` is the bootstrap sd over 90% subsets when the number is a bootstrap mean."""

    value: float
    sd: float | None = None

    @property
    def low(self) -> float | None:
        return None if self.sd is None else self.value - self.sd

    @property
    def high(self) -> float | None:
        return None if self.sd is None else self.value + self.sd


@dataclass
class Environment:
    """Genuine and impostor similarity scores of one decision environment (Figs. 6/7)."""

    genuine: np.ndarray
    impostor: np.ndarray

    def summary(self, prefix: str, seed: int = 0) -> dict[str, Estimate]:
        def two_sample(statistic: Callable[[np.ndarray, np.ndarray], float]) -> Estimate:
            return Estimate(*bootstrap_two_samples(self.genuine, self.impostor, statistic, n_resamples=N_RESAMPLES,
                                                   seed=seed, replace=WITH_REPETITION))

        return {
            f"{prefix}_d_prime": two_sample(decidability),
            f"{prefix}_auc": two_sample(roc_auc),
            f"{prefix}_genuine_mean": Estimate(float(self.genuine.mean())),
            f"{prefix}_impostor_mean": Estimate(float(self.impostor.mean())),
        }


@dataclass
class MethodResult:
    """Every number of one method, plus the score distributions the plots draw."""

    metrics: dict[str, Estimate] = field(default_factory=dict)
    environments: dict[str, Environment] = field(default_factory=dict)


@torch.inference_mode()
def collect_faces(clips: Sequence[Path], stride: int, detector: FaceDetector, pair: FacePair, key: DataKey,
                  wrong_key: DataKey, roi_scale: float) -> FaceSet:
    """Held-out faces of every clip through the model card's `run_clip`, plus sequence 1 and a rerun."""
    parts, names, subjects, frames = [], [], [], []
    for index, path in enumerate(clips):
        faces = run_clip(Path(path), stride, detector, pair, key, wrong_key, roi_scale)
        if not len(faces.x):
            continue  # a clip without a held-out face adds no pairs
        parts.append((faces, file_content_hash(path)))
        names.append(Path(path).stem)
        subjects += [len(names) - 1] * len(faces.x)
        frames += faces.frames
    if not parts:
        raise ValueError("no held-out frame of any clip holds a face")

    a_seq0, a_seq1, residual = [], [], 0.0
    for faces, video_id in parts:
        # U_e sees the uint8 crop here (run_clip fed it the float crop): both sequences get
        # the very same input, so any difference between them is the noise's doing.
        x_in = from_uint8(faces.x, pair.device)

        def noise(seq_id: int, k: DataKey = key) -> torch.Tensor:
            n = torch.from_numpy(video_noise(k, video_id, seq_id)).to(pair.device)
            return n.expand(len(x_in), 1, -1, -1)

        a0 = to_uint8(pair.encoder(x_in, noise(SEQ_ID)))
        a_seq0.append(a0)
        a_seq1.append(to_uint8(pair.encoder(x_in, noise(VIRTUAL_SEQ_ID))))
        # Two complete runs (U_e then U_d) on one input: evidence must restore identically every time.
        r_runs = [to_uint8(pair.decoder(from_uint8(to_uint8(pair.encoder(x_in, noise(SEQ_ID))), pair.device),
                                        noise(SEQ_ID))) for _ in range(2)]
        residual = max(residual, float(np.abs(r_runs[0].astype(np.int16) - r_runs[1].astype(np.int16)).max()))

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(faces, name) for faces, _ in parts])

    return FaceSet(np.asarray(subjects), names, np.asarray(frames), cat("x"), cat("a"), cat("r"), cat("r_wrong"),
                   np.concatenate(a_seq0), np.concatenate(a_seq1), residual)


# --- detection -------------------------------------------------------------------------

@dataclass
class Detections:
    """MTCNN's verdict per crop: (scores, is_tp) against the one true face, and its confidence."""

    per_face: list[tuple[np.ndarray, np.ndarray]]
    confidence: np.ndarray  # score of the detection matched to the face, 0 when it was missed

    @property
    def hit(self) -> np.ndarray:
        return np.array([bool(tp.any()) for _, tp in self.per_face])


def truth_box(roi_scale: float, side: int = 64) -> tuple[float, float, float, float]:
    """Where the face is in a framed crop: the head ROI is the face box enlarged `roi_scale`
    times about its centre, so the face is the centred square of side/roi_scale, then upsampled
    and shifted by the grey border exactly as `in_context` does it."""
    centre = CONTEXT_BORDER + side * CONTEXT_UPSAMPLE / 2
    half = side * CONTEXT_UPSAMPLE / roi_scale / 2
    return centre - half, centre - half, centre + half, centre + half


def detect_faces(detector: FaceDetector | YuNetDetector, faces: np.ndarray, roi_scale: float) -> Detections:
    truth = truth_box(roi_scale, faces.shape[1])
    per_face, confidence = [], []
    framed = in_context(faces)
    # MTCNN detects a batch of frames at once; YuNet one image at a time.
    found = detector.detect(framed) if isinstance(detector, FaceDetector) else [detector.detect(f) for f in framed]
    for boxes in found:
        scores, is_tp = detection_matches(boxes, truth)
        per_face.append((scores, is_tp))
        confidence.append(float(scores[is_tp].max()) if is_tp.any() else 0.0)
    return Detections(per_face, np.asarray(confidence))


def _ap(det: Detections, subset: np.ndarray) -> float:
    chosen = [det.per_face[i] for i in subset]
    scores = np.concatenate([s for s, _ in chosen]) if chosen else np.zeros(0)
    tps = np.concatenate([t for _, t in chosen]) if chosen else np.zeros(0, dtype=bool)
    return average_precision(scores, tps, n_ground_truth=len(subset))


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("nan")


def detection_metrics(on_x: Detections, on_a: Detections, seed: int = 0) -> dict[str, Estimate]:
    """Table II of the paper: does the de-identified face still read as a face, relative to x."""
    faces = np.arange(len(on_x.per_face))
    hit_x, hit_a = on_x.hit, on_a.hit
    return {
        "mtcnn_conf_x": Estimate(float(on_x.confidence.mean())),
        "mtcnn_conf_a": Estimate(float(on_a.confidence.mean())),
        "mtcnn_conf_pearson": Estimate(pearson(on_x.confidence, on_a.confidence)),
        "detection_rate_a": rate(hit_a, seed),
        "detection_rate_ratio": boot(faces, lambda s: _ratio(hit_a[s].mean(), hit_x[s].mean()), seed),
        "ap_ratio": boot(faces, lambda s: _ratio(_ap(on_a, s), _ap(on_x, s)), seed),
    }


# --- identity ----------------------------------------------------------------------------

def embed_all(judge: SFaceJudge, faces: np.ndarray) -> np.ndarray:
    """(n, 128) unit SFace embeddings."""
    return np.stack([judge.embed(np.ascontiguousarray(face)).vector for face in faces])


def dlib_embed_all(judge: DlibJudge, faces: np.ndarray) -> np.ndarray:
    """(n, 128) dlib descriptors; compared by Euclidean distance, not cosine."""
    return np.stack([judge.embed(np.ascontiguousarray(face)) for face in faces])


def similarities(e1: np.ndarray, e2: np.ndarray, euclidean: bool = False) -> np.ndarray:
    """All pairwise similarities, higher = more alike: cosine of unit SFace embeddings, or the
    negated distance for dlib, whose descriptors are compared by Euclidean distance."""
    if not euclidean:
        return e1 @ e2.T
    squared = (e1**2).sum(1)[:, None] + (e2**2).sum(1)[None, :] - 2 * e1 @ e2.T
    return -np.sqrt(np.maximum(squared, 0.0))


def cross_environment(e1: np.ndarray, e2: np.ndarray, subjects: np.ndarray, euclidean: bool = False) -> Environment:
    """Genuine: same subject, different frames; impostor: different subjects.

    With e1 is e2 (x<->x' or a_t<->a_t+i) each unordered pair counts once; otherwise both
    orders are distinct comparisons (x_i vs a_j and x_j vs a_i).
    """
    cos = similarities(e1, e2, euclidean)
    same = subjects[:, None] == subjects[None, :]
    n = len(subjects)
    keep = np.triu(np.ones((n, n), dtype=bool), k=1) if e1 is e2 else ~np.eye(n, dtype=bool)
    genuine, impostor = cos[keep & same], cos[keep & ~same]
    if not len(genuine) or not len(impostor):
        raise ValueError("an environment needs two frames of one subject and two subjects")
    return Environment(genuine.astype(np.float64), impostor.astype(np.float64))


def sequence_environment(emb: np.ndarray, subjects: np.ndarray, sequences: np.ndarray | None) -> Environment | None:
    """Genuine: same subject, different sequence; impostor: different subjects. None without such pairs."""
    if sequences is None:
        return None
    cos = emb @ emb.T
    upper = np.triu(np.ones(cos.shape, dtype=bool), k=1)
    same = subjects[:, None] == subjects[None, :]
    other_seq = sequences[:, None] != sequences[None, :]
    genuine, impostor = cos[upper & same & other_seq], cos[upper & ~same]
    if not len(genuine) or not len(impostor):
        return None
    return Environment(genuine.astype(np.float64), impostor.astype(np.float64))


def false_accept_rate(same: np.ndarray, subjects: np.ndarray, seed: int) -> Estimate | None:
    """Share of different-subject pairs a judge calls the same person (`same`: its (n, n)
    verdicts), each unordered pair once; None with a single subject."""
    upper = np.triu(np.ones(same.shape, dtype=bool), k=1) & (subjects[:, None] != subjects[None, :])
    return rate(same[upper], seed) if upper.any() else None


def boot(items: np.ndarray, statistic: Callable[[np.ndarray], float], seed: int = 0) -> Estimate:
    """The evaluation's bootstrap: N_RESAMPLES 90% subsets of `items`, with repetition."""
    return Estimate(*bootstrap(items, statistic, n_resamples=N_RESAMPLES, seed=seed, replace=WITH_REPETITION))


def rate(values: np.ndarray, seed: int = 0) -> Estimate:
    return boot(np.asarray(values, dtype=float), np.mean, seed)


def gender_agreement(gender: GenderJudge, x: np.ndarray, a: np.ndarray, seed: int = 0) -> Estimate:
    agree = (gender.p_male(x) >= GENDER_CUT) == (gender.p_male(a) >= GENDER_CUT)
    return rate(agree, seed)


# --- putting it together -----------------------------------------------------------------

@dataclass
class Judges:
    detector: FaceDetector
    sface: SFaceJudge
    gender: GenderJudge
    dlib: DlibJudge | None = None  # a second recogniser, so no identity number hangs on SFace alone


def environment_or_none(e1: np.ndarray, e2: np.ndarray, subjects: np.ndarray,
                        euclidean: bool = False) -> Environment | None:
    """None when the faces cannot form one: a catalog split of single-image subjects (the
    DCGAN corpus) has no genuine pair, and then d′ and AUC are undefined, not zero."""
    try:
        return cross_environment(e1, e2, subjects, euclidean)
    except ValueError:
        return None


def _add_environment(result: MethodResult, title: str, prefix: str, env: Environment | None, seed: int) -> None:
    if env is not None:
        result.environments[title] = env
        result.metrics.update(env.summary(prefix, seed))


def label_agreement(gender: GenderJudge, faces: np.ndarray, labels: np.ndarray, seed: int) -> Estimate | None:
    """How often the gender judge's call on `faces` matches the catalog's label (where known)."""
    known = np.isfinite(labels)
    if not known.any():
        return None
    calls = gender.p_male(faces[known]) >= GENDER_CUT
    return rate(calls == (labels[known] >= GENDER_CUT), seed)


@dataclass
class JudgedOriginals:
    """What the judges make of x, computed once: every method and every pair of weights is
    compared against it."""

    detections: Detections   # MTCNN on x
    sface: np.ndarray        # (n, 128) SFace embeddings of x
    dlib: np.ndarray | None  # (n, 128) dlib descriptors of x, when the judges include dlib


def judge_originals(faces: FaceSet, judges: Judges, roi_scale: float) -> JudgedOriginals:
    return JudgedOriginals(detect_faces(judges.detector, faces.x, roi_scale), embed_all(judges.sface, faces.x),
                           dlib_embed_all(judges.dlib, faces.x) if judges.dlib is not None else None)


def evaluate_methods(faces: FaceSet, methods: Mapping[str, Method], judges: Judges, roi_scale: float,
                     seed: int = 0, originals: JudgedOriginals | None = None) -> dict[str, MethodResult]:
    """Every measure for every method; `methods` maps a name to x → a (ours is `faces.a` already)."""
    subjects = faces.subjects
    originals = originals or judge_originals(faces, judges, roi_scale)
    on_x, emb_x, dlib_x = originals.detections, originals.sface, originals.dlib
    reference = MethodResult()
    _add_environment(reference, "x↔x′", "x_x", environment_or_none(emb_x, emb_x, subjects), seed)
    if dlib_x is not None:
        _add_environment(reference, "x↔x′ (dlib)", "dlib_x_x",
                         environment_or_none(dlib_x, dlib_x, subjects, euclidean=True), seed)
    # How often each judge calls two *different* people the same: the floor under every
    # same-person rate below (a lenient judge on small, blurry or GAN faces has a high one).
    verdicts = {"same_person_impostor": similarities(emb_x, emb_x) >= judges.sface.threshold}
    if dlib_x is not None:
        verdicts["dlib_same_person_impostor"] = -similarities(dlib_x, dlib_x, euclidean=True) < judges.dlib.threshold
    for name, same in verdicts.items():
        if (far := false_accept_rate(same, subjects, seed)) is not None:
            reference.metrics[name] = far
    reference.metrics["faces"] = Estimate(float(len(faces.x)))
    reference.metrics["subjects"] = Estimate(float(len(np.unique(subjects))))
    reference.metrics["mtcnn_detection_rate_x"] = rate(on_x.hit, seed)
    reference.metrics["mtcnn_conf_x"] = Estimate(float(on_x.confidence.mean()))
    # YuNet, the second opinion: trained elsewhere, so "still a face" does not hang on MTCNN.
    yunet_x = detect_faces(judges.sface.detector, faces.x, roi_scale)
    reference.metrics["yunet_detection_rate_x"] = rate(yunet_x.hit, seed)
    if faces.gender_labels is not None and (agree := label_agreement(
            judges.gender, faces.x, faces.gender_labels, seed)) is not None:
        reference.metrics["gender_label_agreement"] = agree  # the judge's own accuracy: the ceiling for a
    results = {"original": reference}

    for name, method in {OURS: lambda x: faces.a, **methods}.items():
        a = method(faces.x)
        result = MethodResult()
        result.metrics.update(detection_metrics(on_x, detect_faces(judges.detector, a, roi_scale), seed))
        result.metrics["yunet_detection_rate_a"] = rate(detect_faces(judges.sface.detector, a, roi_scale).hit, seed)
        emb_a = embed_all(judges.sface, a)
        _add_environment(result, "x↔a′", "x_a", environment_or_none(emb_x, emb_a, subjects), seed)
        # Same frame, x against its own a: the model card's privacy number.
        result.metrics["same_person_x_a"] = rate(np.sum(emb_x * emb_a, axis=1) >= judges.sface.threshold, seed)
        result.metrics["gender_agreement"] = gender_agreement(judges.gender, faces.x, a, seed)
        if faces.gender_labels is not None and (agree := label_agreement(
                judges.gender, a, faces.gender_labels, seed)) is not None:
            result.metrics["gender_label_agreement"] = agree
        if dlib_x is not None:
            dlib_a = dlib_embed_all(judges.dlib, a)
            _add_environment(result, "x↔a′ (dlib)", "dlib_x_a",
                             environment_or_none(dlib_x, dlib_a, subjects, euclidean=True), seed)
            result.metrics["dlib_same_person_x_a"] = dlib_same_rate(judges.dlib, dlib_x, dlib_a, seed)
        if name == OURS:
            ours_only(faces, emb_x, emb_a, dlib_x, judges, result, seed)
        results[name] = result
    return results


def dlib_same_rate(judge: DlibJudge, e1: np.ndarray, e2: np.ndarray, seed: int) -> Estimate:
    """Rate of pairs (e1_i, e2_i) that dlib calls the same person."""
    return rate(np.linalg.norm(e1 - e2, axis=1) < judge.threshold, seed)


def ours_only(faces: FaceSet, emb_x: np.ndarray, emb_a: np.ndarray, dlib_x: np.ndarray | None, judges: Judges,
              result: MethodResult, seed: int) -> None:
    """Temporal consistency, diversity and reversibility: the baselines have no key, no sequence, no U_d."""
    threshold = judges.sface.threshold
    temporal = environment_or_none(emb_a, emb_a, faces.subjects)
    _add_environment(result, "temporal a_t↔a_t+i", "temporal", temporal, seed)
    if temporal is not None:
        result.metrics["temporal_ks_p"] = Estimate(ks_pvalue(temporal.genuine, temporal.impostor))

    diversity = np.sum(embed_all(judges.sface, faces.a_seq0) * embed_all(judges.sface, faces.a_seq1), axis=1)
    if temporal is not None:
        # Shown against the temporal impostors: how far apart two sequences of one person are,
        # measured against how far apart two different people's virtual faces are.
        result.environments["diversity seq 0↔seq 1"] = Environment(diversity.astype(np.float64), temporal.impostor)
    result.metrics["diversity_cos_mean"] = rate(diversity, seed)
    result.metrics["diversity_same_rate"] = rate(diversity >= threshold, seed)
    across = sequence_environment(emb_a, faces.subjects, faces.sequences)
    if across is not None:
        # The paper's diversity on real data: one person's different sequences (other days,
        # other cameras) must get virtual identities as unlike as two different people's.
        _add_environment(result, "diversity: a of one subject, other sequence", "diversity_seq", across, seed)
        result.metrics["diversity_seq_same_rate"] = rate(across.genuine >= threshold, seed)

    cos_r = np.sum(emb_x * embed_all(judges.sface, faces.r), axis=1)
    cos_wrong = np.sum(emb_x * embed_all(judges.sface, faces.r_wrong), axis=1)
    psnrs = np.array([psnr(x, r) for x, r in zip(faces.x, faces.r)])
    mse = np.mean((faces.x.astype(np.float64) - faces.r.astype(np.float64)) ** 2)
    result.metrics["psnr_x_r_pooled"] = Estimate(math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))
    finite = psnrs[np.isfinite(psnrs)]
    if len(finite):
        result.metrics["psnr_x_r"] = rate(finite, seed)
    result.metrics["ssim_x_r"] = rate(np.array([ssim(x, r) for x, r in zip(faces.x, faces.r)]), seed)
    result.metrics["same_person_x_r"] = rate(cos_r >= threshold, seed)
    result.metrics["same_person_x_r_wrong"] = rate(cos_wrong >= threshold, seed)
    result.metrics["reversibility_residual_max"] = Estimate(faces.residual_max)
    if dlib_x is not None:
        result.metrics["dlib_same_person_x_r"] = dlib_same_rate(
            judges.dlib, dlib_x, dlib_embed_all(judges.dlib, faces.r), seed)
        result.metrics["dlib_same_person_x_r_wrong"] = dlib_same_rate(
            judges.dlib, dlib_x, dlib_embed_all(judges.dlib, faces.r_wrong), seed)


# --- the control vector s ---------------------------------------------------------------------

CONTROL_METRICS = ("gender_agreement", "gender_label_agreement", "same_person_x_a", "dlib_same_person_x_a",
                   "detection_rate_a")


def control_label(pair: FacePair) -> str:
    """The s a pair was trained with, from its weights file (`-1,0,0` = change ID, free the rest)."""
    meta = getattr(pair, "meta", None) or {}
    control = (meta.get("config") or {}).get("control")
    names = meta.get("label_names")
    if control is None:
        return "n/a"
    if names:
        return ", ".join(f"{n} {v}" for n, v in zip(names, str(control).split(",")))
    return str(control)


@torch.inference_mode()
def compare_controls(faces: FaceSet, pairs: Mapping[str, FacePair], judges: Judges, roi_scale: float,
                     seed: int = 0, originals: JudgedOriginals | None = None) -> dict[str, dict[str, Estimate | str]]:
    """Soft-label consistency per control vector s: each pair de-identifies the very same x
    with the very same noise, so only its training (its s) differs between rows.

    The noise is drawn afresh for every face (seeded), as if each were its own sequence: in
    the pipeline all faces of a sequence share one virtual identity, so on footage with a
    few long sequences a rate over faces would rest on a few draws of the noise.
    """
    x_in = from_uint8(faces.x, torch.device("cpu"))
    noise_all = torch.from_numpy(np.random.default_rng(seed).random((len(faces.x), 1, 64, 64), dtype=np.float32))
    originals = originals or judge_originals(faces, judges, roi_scale)
    on_x, emb_x, dlib_x = originals.detections, originals.sface, originals.dlib
    table: dict[str, dict[str, Estimate | str]] = {}
    for name, pair in pairs.items():
        a = to_uint8(pair.encoder(x_in.to(pair.device), noise_all.to(pair.device)))
        emb_a = embed_all(judges.sface, a)
        row: dict[str, Estimate | str] = {
            "s": control_label(pair),
            "gender_agreement": gender_agreement(judges.gender, faces.x, a, seed),
            "same_person_x_a": rate(np.sum(emb_x * emb_a, axis=1) >= judges.sface.threshold, seed),
            "detection_rate_a": rate(detect_faces(judges.detector, a, roi_scale).hit & on_x.hit, seed),
        }
        if faces.gender_labels is not None and (agree := label_agreement(
                judges.gender, a, faces.gender_labels, seed)) is not None:
            row["gender_label_agreement"] = agree
        if dlib_x is not None:
            row["dlib_same_person_x_a"] = dlib_same_rate(judges.dlib, dlib_x, dlib_embed_all(judges.dlib, a), seed)
        table[name] = row
    return table


def roc_points(env: Environment) -> tuple[np.ndarray, np.ndarray]:
    fpr, tpr, _ = roc_curve(env.genuine, env.impostor)
    return fpr, tpr


# --- the public face per mode ----------------------------------------------------------

@torch.inference_mode()
def public_face_measures(faces: FaceSet, encoder: torch.nn.Module, device: torch.device, key: DataKey,
                         judges: Judges, roi_scale: float, blend: bool, seed: int = 0,
                         originals: JudgedOriginals | None = None) -> dict[str, Estimate]:
    """What the public sees of one U_e, on the same x as the rest of the evaluation.

    Each (subject, sequence) gets its own keyed noise, as a sequence does in the pipeline;
    with `blend` the face is laid over x with the pipeline's face-region weights
    (`tasks/datapath/track.py`, the sealed default), else it replaces the whole crop (`--seal
    none`). Measures: MTCNN and YuNet find a where they find x; SFace and dlib x↔a; temporal
    d′ (faces of one subject's virtual identity against other subjects', as `ours_only`);
    diversity: the same x under another sequence's noise, and, where the data has them, the
    subject's other real sequences, judged the same person.
    """
    from tasks.datapath.track import face_region  # numpy only

    originals = originals or judge_originals(faces, judges, roi_scale)
    sequences = faces.sequences if faces.sequences is not None else np.zeros(len(faces.x), dtype=int)
    x_in = from_uint8(faces.x, device)
    weights = torch.from_numpy(face_region(x_in.shape[-1], x_in.shape[-2]).copy()).to(device)

    def public(seq_offset: int) -> np.ndarray:
        out = []
        for start in range(0, len(x_in), 256):
            rows = range(start, min(start + 256, len(x_in)))
            noise = torch.stack([torch.from_numpy(video_noise(key, faces.subject_names[faces.subjects[i]],
                                                              int(sequences[i]) + seq_offset)) for i in rows])
            x = x_in[start:rows.stop]
            a = encoder(x, noise.to(device)[:, None])
            out.append(to_uint8(torch.lerp(x, a, weights) if blend else a))
        return np.concatenate(out)

    a, a_other = public(0), public(1_000_000)  # 1e6: no real sequence of the data has that id
    emb_x, emb_a, emb_other = originals.sface, embed_all(judges.sface, a), embed_all(judges.sface, a_other)
    threshold = judges.sface.threshold
    found_x = {"mtcnn": originals.detections.hit, "yunet": detect_faces(judges.sface.detector, faces.x, roi_scale).hit}
    found_a = {"mtcnn": detect_faces(judges.detector, a, roi_scale).hit,
               "yunet": detect_faces(judges.sface.detector, a, roi_scale).hit}
    out: dict[str, Estimate] = {"faces": Estimate(float(len(a)))}
    for name in found_x:
        if found_x[name].any():
            out[f"{name}_found_a"] = rate(found_a[name][found_x[name]], seed)
    out["same_person_x_a"] = rate(np.sum(emb_x * emb_a, axis=1) >= threshold, seed)
    out["diversity_same_rate"] = rate(np.sum(emb_a * emb_other, axis=1) >= threshold, seed)
    if originals.dlib is not None:
        dlib_a = dlib_embed_all(judges.dlib, a)
        out["dlib_same_person_x_a"] = dlib_same_rate(judges.dlib, originals.dlib, dlib_a, seed)
        out["dlib_diversity_same_rate"] = dlib_same_rate(judges.dlib, dlib_a, dlib_embed_all(judges.dlib, a_other),
                                                         seed)
    if (temporal := environment_or_none(emb_a, emb_a, faces.subjects)) is not None:
        out.update(temporal.summary("temporal", seed))
    if (across := sequence_environment(emb_a, faces.subjects, faces.sequences)) is not None:
        out["diversity_seq_same_rate"] = rate(across.genuine >= threshold, seed)
    return out
