"""The paper's Sec. IV evaluation: ours against blurring and superpixels, plus codec robustness.

    python -m flows.evaluate [--clips-dir samples] [--out out/eval] [--model uunet] [--weights FILE]
                             [--corpus out/corpus] [--split test] [--variants FILE ...]
                             [--codec-frames 48] [--readme README.md] [--seed 0]

Two datasets, each through every method and every measure (tasks/evaluation/evaluate.py):
(b) the held-out faces of every clip in --clips-dir (last quarter, 1 frame in --stride);
(a) a labelled faces catalog split (--corpus's catalogs/faces, --split), run as a gallery
clip through the real anonymize and reconstruct modules (tasks/evaluation/labelled_faces.py); when
--corpus holds no catalog, the training recipe's default corpus is built there first.
--variants adds weights files trained with other control vectors s: each de-identifies
the same faces, and the report compares gender agreement and identity per s. The codec
sweep re-encodes ONE short public stream (the first --codec-frames frames of the bundled
Wolfgang clip, anonymized by the real public module) with each x264 CRF setting and ffv1.
Writes OUT/report.html with its PNG plots, OUT/summary.json, OUT/headline.md (pasted into
--readme's eval-headline block when given) and `metrics` / `runs` rows in OUT/catalogs.
Keys are derived from --seed: an evaluation is reproducible, not secret.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from catalogs import CatalogStore, new_run_id, utc_now
from catalogs.store import file_content_hash
from flows.train_matcher import DEFAULT_CORPUS, DEFAULT_N_GAN, prepare_corpus
from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.deidentify import FacePair, FaceSwapper, load_face_pair, load_pipeline_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.encode import ffmpeg_exe
from tasks.datapath.keys import DataKey, generate_key_pair, parse_private_key
from tasks.datapath.seal import QUALITIES
from tasks.datapath.video_loop import PipelineSettings
from tasks.evaluation.baselines import BASELINES
from tasks.evaluation.codec_sweep import CODEC_SETTINGS, SweepRow, sweep
from tasks.evaluation.evaluate import (
    CONTROL_METRICS,
    N_RESAMPLES,
    OURS,
    Estimate,
    FaceSet,
    JudgedOriginals,
    Judges,
    MethodResult,
    collect_faces,
    compare_controls,
    evaluate_methods,
    judge_originals,
    public_face_measures,
    roc_points,
)
from tasks.evaluation.labelled_faces import GalleryRun, run_split, select_split
from tasks.evaluation.metrics import decidability
from tasks.evaluation.sealed_reversal import SealedReversal, measure_sealed_reversal
from tasks.judges import DlibJudge, GenderJudge, SFaceJudge, YuNetDetector

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CLIPS = REPO / "samples"
CODEC_CLIP = REPO / "samples" / "WolfgangLanger_Pexels.mp4"
METHODS = [OURS, *BASELINES]

# (metric of a method, the same measure on x for the reference column, label) in the paper's
# order; ↑/↓ say which way is better for a.
HEADLINE: list[tuple[str, str | None, str]] = [
    ("detection_rate_a", "mtcnn_detection_rate_x", "MTCNN detects the face (IoU ≥ 0.5) ↑"),
    ("yunet_detection_rate_a", "yunet_detection_rate_x", "YuNet detects the face (IoU ≥ 0.5) ↑"),
    ("detection_rate_ratio", None, "MTCNN detection rate ratio a/x ↑"),
    ("ap_ratio", None, "MTCNN AP ratio a/x ↑"),
    ("mtcnn_conf_a", "mtcnn_conf_x", "MTCNN confidence, mean"),
    ("mtcnn_conf_pearson", None, "Pearson r of MTCNN confidence x↔a"),
    ("x_a_d_prime", "x_x_d_prime", "SFace identity x↔a′ (x: x↔x′): d′ ↓"),
    ("x_a_auc", "x_x_auc", "SFace identity x↔a′: AUC ↓"),
    ("dlib_x_a_d_prime", "dlib_x_x_d_prime", "dlib identity x↔a′ (x: x↔x′): d′ ↓"),
    ("dlib_x_a_auc", "dlib_x_x_auc", "dlib identity x↔a′: AUC ↓"),
    ("same_person_x_a", "same_person_impostor", "SFace same person x↔a, same frame (x: two different people) ↓"),
    ("dlib_same_person_x_a", "dlib_same_person_impostor",
     "dlib same person x↔a, same frame (x: two different people) ↓"),
    ("gender_agreement", None, "gender agreement x↔a (gender judge on both) ↑"),
    ("gender_label_agreement", "gender_label_agreement", "gender judge on a = catalog label ↑"),
    ("temporal_d_prime", None, "temporal consistency a_t↔a_t+i: d′ ↑"),
    ("temporal_auc", None, "temporal consistency: AUC ↑"),
    ("temporal_ks_p", None, "temporal: KS p-value genuine vs impostor ↓"),
    ("diversity_cos_mean", None, "diversity, two sequences of one face: mean SFace cosine ↓"),
    ("diversity_same_rate", None, "diversity: SFace same-person rate ↓"),
    ("diversity_seq_d_prime", None, "diversity, one subject's other sequences vs other people: d′ ↓"),
    ("diversity_seq_same_rate", None, "diversity, one subject's other sequences: SFace same person ↓"),
    ("psnr_x_r", None, "PSNR x↔r dB (64×64, non-exact faces) ↑"),
    ("ssim_x_r", None, "SSIM x↔r ↑"),
    ("same_person_x_r", None, "SFace same person x↔r ↑"),
    ("same_person_x_r_wrong", None, "SFace same person x↔r, wrong key ↓"),
    ("dlib_same_person_x_r", None, "dlib same person x↔r ↑"),
    ("dlib_same_person_x_r_wrong", None, "dlib same person x↔r, wrong key ↓"),
    ("reversibility_residual_max", None, "max |r1 − r2| over two runs (must be 0)"),
]


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """One thread each by default: on this 2-core machine the libraries' own pools spin on
    descheduled threads and made the model card 18x slower (bench/model_card.py). Restored
    afterwards, so a flow called in-process leaves its caller's settings alone."""
    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(n)
    cv2.setNumThreads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


@dataclass
class DatasetResult:
    """One evaluated dataset: its faces, every method's numbers, the per-s comparison."""

    title: str
    description: str
    faces: FaceSet
    results: dict[str, MethodResult]
    originals: JudgedOriginals
    controls: dict[str, dict[str, Any]] = field(default_factory=dict)
    gallery: GalleryRun | None = None
    public: dict[str, dict[str, Estimate]] = field(default_factory=dict)  # mode → `public_face_measures`
    public_sources: dict[str, str] = field(default_factory=dict)  # mode → the weights its U_e came from


def _keys(seed: int) -> tuple[DataKey, DataKey]:
    rng = np.random.default_rng(seed)
    return DataKey(rng.bytes(32)), DataKey(rng.bytes(32))


# NO_CACHE, no persisted result: the outputs are arrays of faces, only ever used by this run.
@task(task_run_name="held-out faces of {clips_dir}", cache_policy=NO_CACHE, persist_result=False)
def score_footage(clips: list[str], clips_dir: str, pair: FacePair, settings: PipelineSettings, judges: Judges,
                  stride: int, seed: int) -> tuple[FaceSet, dict[str, MethodResult], JudgedOriginals]:
    key, wrong_key = _keys(seed)
    faces = collect_faces([Path(c) for c in clips], stride, judges.detector, pair, key, wrong_key,
                          settings.roi_scale)
    originals = judge_originals(faces, judges, settings.roi_scale)
    return faces, evaluate_methods(faces, BASELINES, judges, settings.roi_scale, seed, originals), originals


@task(task_run_name="faces catalog {corpus} split {split}", cache_policy=NO_CACHE, persist_result=False)
def score_split(corpus: str, split: str, pair: FacePair, settings: PipelineSettings, judges: Judges,
                max_sequences: int, frames_per_sequence: int, seed: int,
                ) -> tuple[FaceSet, dict[str, MethodResult], JudgedOriginals, GalleryRun]:
    catalog = Path(corpus) / "catalogs"
    if not (catalog / "faces").is_dir():
        # The training flows' own corpus (same recipe, same seed): its test split is
        # identities the bundled weights never saw.
        get_run_logger().info("no faces catalog in %s: building the default corpus there", corpus)
        prepare_corpus.fn(corpus, n_gan=DEFAULT_N_GAN, seed=0)
    rows = select_split(CatalogStore(catalog).read("faces"), split, max_sequences, frames_per_sequence, seed)
    key, wrong_key = _keys(seed + 2)  # other keys than the footage's and the codec sweep's
    with tempfile.TemporaryDirectory(prefix="uunet-eval-faces-") as tmp:
        faces, gallery = run_split(rows, Path(tmp), key=key, wrong_key=wrong_key, detector=judges.detector,
                                   swapper=FaceSwapper(pair), settings=settings, judge=judges.sface)
    if not len(faces.x):
        raise ValueError(f"the pipeline found none of the {len(rows)} faces of split {split!r} in {corpus}")
    originals = judge_originals(faces, judges, settings.roi_scale)
    return faces, evaluate_methods(faces, BASELINES, judges, settings.roi_scale, seed, originals), originals, gallery


@task(task_run_name="control vectors on {title}", cache_policy=NO_CACHE, persist_result=False)
def score_controls(title: str, data: DatasetResult, pairs: dict[str, FacePair], judges: Judges, roi_scale: float,
                   seed: int) -> dict[str, dict[str, Any]]:
    return compare_controls(data.faces, pairs, judges, roi_scale, seed, data.originals)


def cut_clip(source: Path, dest: Path, frames: int) -> Path:
    """The first `frames` frames of `source`, near-losslessly (x264 qp 0 in the source's own yuv420p)."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(source), "-an",
           "-frames:v", str(frames), "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p", str(dest)]
    subprocess.run(cmd, check=True, capture_output=True)
    return dest


@task(task_run_name="sealed reversal ({quality}) on {n_clips} clips", cache_policy=NO_CACHE, persist_result=False)
def sealed_reversal(clips: list[str], n_clips: int, quality: str, pair: FacePair, settings: PipelineSettings,
                    judges: Judges, stride: int, sheets_dir: str | None = None) -> SealedReversal:
    return measure_sealed_reversal([Path(c) for c in clips], quality, judges.detector, FaceSwapper(pair),
                                   judges.sface, judges.dlib, settings, stride, judges.sface.detector,
                                   Path(sheets_dir) if sheets_dir else None)


@task(task_run_name="codec sweep on {frames} frames", cache_policy=NO_CACHE, persist_result=False)
def codec_robustness(source: str, frames: int, pair: FacePair, settings: PipelineSettings, judges: Judges,
                     codec_settings: list[str] | None, seed: int) -> list[SweepRow]:
    key, _ = _keys(seed + 1)  # another key than the faces': nothing shared by accident
    swapper = FaceSwapper(pair)
    chosen = CODEC_SETTINGS if codec_settings is None else {name: CODEC_SETTINGS[name] for name in codec_settings}
    with tempfile.TemporaryDirectory(prefix="uunet-eval-codec-") as tmp:
        clip = cut_clip(Path(source), Path(tmp) / "source.mp4", frames)
        public = Path(tmp) / "public.mkv"
        authority = parse_private_key(generate_key_pair()[0])
        anonymize_video(clip, public, recipients=[authority.public], video_id=file_content_hash(clip),
                        detector=judges.detector, swapper=swapper, settings=settings, run_id="evaluate",
                        progress=False, judge=judges.sface, data_key=key)
        return sweep(public, clip, key, swapper, settings=chosen, sample_every=4, judge=judges.sface)


# --- outputs ------------------------------------------------------------------------------

def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def metric_rows(run_id: str, datasets: dict[str, DatasetResult], codec: list[SweepRow],
                sealed: list[SealedReversal]) -> list[dict]:
    now = utc_now()
    rows = []

    def add(dataset: str, method: str, metric: str, est: Estimate) -> None:
        if _finite(est.value) is None:
            return  # the catalog holds numbers; an undefined one stays in summary.json as null
        rows.append(dict(run_id=run_id, dataset=dataset, method=method, metric=metric, value=float(est.value),
                         low=_finite(est.low), high=_finite(est.high), created_at=now))

    for dataset, data in datasets.items():
        for method, result in data.results.items():
            for metric, est in result.metrics.items():
                add(dataset, method, metric, est)
        for variant, row in data.controls.items():
            for metric, est in row.items():
                if isinstance(est, Estimate):
                    add(dataset, f"{OURS}:{variant}", metric, est)
        for mode, values in data.public.items():
            for metric, est in values.items():
                add(dataset, f"public:{PUBLIC_MODES[mode][0]}", metric, est)
        if data.gallery is not None:
            g = data.gallery
            add(dataset, OURS, "pipeline_face_found_rate", Estimate(g.faces_found / max(g.faces_selected, 1)))
    for row in codec:
        for metric in ("payload_recovery", "psnr_roi_payload", "psnr_roi_oracle", "ssim_roi", "same_person_rate"):
            add(f"codec:{row.setting}", OURS, metric, Estimate(float(getattr(row, metric))))
    for row in sealed:
        for metric in ("psnr_db", "exact_fraction", "sface_same", "dlib_same", "public_sface_same",
                       "public_dlib_same", "attack_random_sface", "attack_random_dlib", "attack_zero_sface",
                       "attack_zero_dlib", "public_flicker", "source_flicker", "mtcnn_public_found",
                       "yunet_public_found"):
            add("footage", f"sealed:{row.quality}", metric, Estimate(float(getattr(row, metric))))
    return rows


def _plots(out: Path, datasets: dict[str, DatasetResult], codec: list[SweepRow]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, data in datasets.items():
        envs = [(f"{'x' if m == 'original' else m}: {name}", env) for m, r in data.results.items()
                for name, env in r.environments.items()]
        if not envs:
            continue  # single-image subjects: no pair of one person to draw
        cols = 3
        rows = math.ceil(len(envs) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, (title, env) in zip(axes.flat, envs):
            # Per panel: SFace cosines live in [-1, 1], dlib's negated distances below 0.
            scores = np.concatenate([env.genuine, env.impostor])
            bins = np.linspace(scores.min(), scores.max() + 1e-6, 50)
            ax.hist(env.impostor, bins=bins, density=True, color="tab:red", alpha=0.55, label="impostor")
            ax.hist(env.genuine, bins=bins, density=True, color="tab:green", alpha=0.55, label="genuine")
            ax.set_title(f"{title}  (d′ = {decidability(env.genuine, env.impostor):.2f})", fontsize=9)
            ax.set_xlabel("−dlib distance" if "dlib" in title else "SFace cosine")
        for ax in list(axes.flat)[len(envs):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=8)
        fig.tight_layout()
        name = f"decision_environments_{key}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)

        fig, ax = plt.subplots(figsize=(5.5, 5))
        for title, env in envs:
            fpr, tpr = roc_points(env)
            ax.plot(fpr, tpr, label=title)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=6)
        fig.tight_layout()
        name = f"roc_{key}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        written.append(name)

    if codec:
        names = [r.setting for r in codec]
        pos = np.arange(len(names))
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
        left.plot(pos, [r.psnr_roi_oracle for r in codec], "o-", label="oracle ROIs")
        left.plot(pos, [r.psnr_roi_payload for r in codec], "s--", label="payload ROIs")
        left.set_ylabel("PSNR inside ROIs, dB")
        right.plot(pos, [r.payload_recovery for r in codec], "o-", label="payload recovered")
        right.plot(pos, [r.same_person_rate for r in codec], "s--", label="SFace same person x↔r")
        right.set_ylim(-0.05, 1.05)
        for ax in (left, right):
            ax.set_xticks(pos, names, rotation=30, fontsize=8)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "codec_sweep.png", dpi=90)
        plt.close(fig)
        written.append("codec_sweep.png")
    return written


def _cell(est: Estimate | None) -> str:
    if est is None:
        return "—"
    if not math.isfinite(est.value):
        return "inf" if est.value == math.inf else "n/a"
    text = f"{est.value:.3f}" if abs(est.value) < 10 else f"{est.value:.2f}"
    return text + (f" ± {est.sd:.3f}" if est.sd is not None and math.isfinite(est.sd) else "")


def _num(value: float, spec: str) -> str:
    """A codec-table cell; NaN (no frame kept its payload) reads as a dash, not as "nan"."""
    return format(value, spec) if math.isfinite(value) else "—"


def headline_rows(results: dict[str, MethodResult]) -> list[tuple[str, list[str]]]:
    """The headline table; a measure no method has (no genuine pair in the split) is left out."""
    rows = []
    for metric, reference, label in HEADLINE:
        cells = [_cell(results["original"].metrics.get(reference) if reference else None)]
        cells += [_cell(results[m].metrics.get(metric)) for m in METHODS]
        if any(c != "—" for c in cells):
            rows.append((label, cells))
    return rows


def control_rows(controls: dict[str, dict[str, Any]]) -> list[list[str]]:
    return [[name, str(row["s"]), *[_cell(row.get(m)) if m in row else "—" for m in CONTROL_METRICS]]
            for name, row in controls.items()]


PUBLIC_MODES = {  # row label → (pipeline seal mode, blended over the face region)
    "default (sealed): blended over the face region": ("high", True),
    "`--seal none`: the whole box": ("none", False),
}
PUBLIC_HEADER = ["mode", "U_e", "faces", "MTCNN finds a where it finds x ↑", "YuNet finds a where it finds x ↑",
                 "SFace x↔a ↓", "dlib x↔a ↓", "SFace / dlib false-accept (x, two people)", "temporal d′ ↑",
                 "diversity: SFace / dlib same, other key ↓", "diversity: other real sequence ↓"]


def public_rows(data: DatasetResult) -> list[list[str]]:
    ref = data.results["original"].metrics
    far = f"{_cell(ref.get('same_person_impostor'))} / {_cell(ref.get('dlib_same_person_impostor'))}"
    return [[mode, data.public_sources.get(mode, "—"), _num(m["faces"].value, ".0f"), _cell(m.get("mtcnn_found_a")), _cell(m.get("yunet_found_a")),
             _cell(m.get("same_person_x_a")), _cell(m.get("dlib_same_person_x_a")), far,
             _cell(m.get("temporal_d_prime")),
             f"{_cell(m.get('diversity_same_rate'))} / {_cell(m.get('dlib_diversity_same_rate'))}",
             _cell(m.get("diversity_seq_same_rate"))] for mode, m in data.public.items()]


CONTROL_HEADER = ["weights", "s", "gender agreement x↔a", "judge on a = catalog label",
                  "SFace same person x↔a", "dlib same person x↔a", "MTCNN detects a"]


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def codec_rows(codec: list[SweepRow]) -> list[list[str]]:
    return [[r.setting, f"{r.payload_recovery:.1%}", _num(r.psnr_roi_payload, ".2f"), _num(r.psnr_roi_oracle, ".2f"),
             _num(r.ssim_roi, ".3f"), _num(r.same_person_rate, ".1%"), str(r.frames)] for r in codec]


CODEC_HEADER = ["setting", "payload recovered", "PSNR ROI (payload) dB", "PSNR ROI (oracle) dB", "SSIM ROI",
                "SFace same person x↔r", "frames"]
SEALED_HEADER = ["restore path", "public format", "faces restored", "PSNR ROI dB (frame resolution)", "bit-exact ROIs",
                 "SFace same person x↔r ↑", "dlib same person x↔r ↑", "SFace x↔a (public) ↓",
                 "dlib x↔a (public) ↓", "keyless U_d, random key: SFace / dlib ↓",
                 "keyless U_d, zero noise: SFace / dlib ↓", "ROI change per frame, public / source",
                 "public face found again: MTCNN / YuNet ↑", "faces judged", "sealed chunks failed"]


def sealed_rows(sealed: list[SealedReversal], learned: MethodResult | None) -> list[list[str]]:
    rows = [[f"sealed ({r.quality})", r.public_format, str(r.faces), _num(r.psnr_db, ".2f"), f"{r.exact_fraction:.1%}",
             f"{r.sface_same:.1%}", f"{r.dlib_same:.1%}", _num(r.public_sface_same, ".1%"),
             _num(r.public_dlib_same, ".1%"),
             f"{_num(r.attack_random_sface, '.1%')} / {_num(r.attack_random_dlib, '.1%')} ({r.attack_judged})",
             f"{_num(r.attack_zero_sface, '.1%')} / {_num(r.attack_zero_dlib, '.1%')}",
             f"{_num(r.public_flicker, '.2f')} / {_num(r.source_flicker, '.2f')}",
             f"{_num(r.mtcnn_public_found, '.1%')} ({r.mtcnn_source_faces}) / "
             f"{_num(r.yunet_public_found, '.1%')} ({r.yunet_source_faces})",
             str(r.judged), str(r.chunks_failed)] for r in sealed]
    if learned is not None:  # the paper's path on the same clips' held-out faces, from the table above
        m = learned.metrics
        rows.append(["learned (U_d, `--seal none`)", "x264rgb", "—", _cell(m.get("psnr_x_r")) + " (64×64)", "—",
                     _cell(m.get("same_person_x_r")), _cell(m.get("dlib_same_person_x_r")),
                     _cell(m.get("same_person_x_a")), _cell(m.get("dlib_same_person_x_a")), "—", "—", "—", "—", "—", "—"])
    return rows


def headline_markdown(datasets: dict[str, DatasetResult], codec: list[SweepRow], command: str,
                      sealed: list[SealedReversal] | None = None) -> str:
    """The report's headline as Markdown: what `--readme` pastes into the README."""
    parts = [f"Generated by `{command}` on {utc_now():%Y-%m-%d}; ± is the sd over {N_RESAMPLES} random "
             "90 % subsets drawn with repetition (≈ the sampling error); x = the original faces "
             "(reference column).", ""]
    for data in datasets.values():
        parts += [f"**{data.title}**: {data.description}", "",
                  _markdown_table(["measure", "x", *METHODS], [[label, *cells] for label, cells in
                                                               headline_rows(data.results)]), ""]
        if data.public:
            parts += ["The public face per mode (each U_e on the same 64×64 x, one keyed noise per sequence; the "
                      "default lays it over x with the pipeline's face-region weights):", "",
                      _markdown_table(PUBLIC_HEADER, public_rows(data)), ""]
        if data.controls:
            parts += ["Per control vector s (each pair's U_e on the same 64×64 x with the same noise, drawn "
                      "afresh per face, before any paste: the rows differ only by training):", "",
                      _markdown_table(CONTROL_HEADER, control_rows(data.controls)), ""]
    if sealed:
        footage = datasets.get("footage")
        parts += ["**Reversal from the sealed originals** (the held-out quarter of each bundled clip through the "
                  "real modules in the release format, restored with the authority's private key into the lossless "
                  "working copy; every ROI compared with the decoded source, SFace and dlib on every 2nd frame's "
                  "ROIs of ≥ 32 px; the learned row is the table above's):", "",
                  _markdown_table(SEALED_HEADER, sealed_rows(sealed, footage.results.get(OURS) if footage else None)),
                  ""]
    if codec:
        parts += ["**Reversal under codecs** (public stream re-encoded; oracle = the lossless stream's ROIs):", "",
                  _markdown_table(CODEC_HEADER, codec_rows(codec)), ""]
    return "\n".join(parts).rstrip() + "\n"


README_START, README_END = "<!-- eval-headline:start -->", "<!-- eval-headline:end -->"


def update_readme(path: Path, markdown: str) -> None:
    """Replace the block between the README's eval-headline markers (written atomically)."""
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} … {README_END} block to update")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(f"{head}{README_START}\n{markdown}{README_END}{tail}")
    tmp.replace(path)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(out: Path, params: dict[str, Any], datasets: dict[str, DatasetResult], codec: list[SweepRow],
                 plots: list[str], seconds: float, sealed: list[SealedReversal] | None = None) -> Path:
    sections = []
    for key, data in datasets.items():
        table = _html_table(["measure", "x", *METHODS],
                            [[label, *cells] for label, cells in headline_rows(data.results)])
        controls = ("<h3>Per control vector s</h3><p>Each weights file de-identifies the same x with the same "
                    "noise (drawn afresh per face); only the s it was trained with differs.</p>"
                    + _html_table(CONTROL_HEADER, control_rows(data.controls))) if data.controls else ""
        images = "".join(f'<p><img src="{n}" alt="{n}"></p>' for n in plots if n.endswith(f"_{key}.png"))
        public = ("<h3>The public face per mode</h3>" + _html_table(PUBLIC_HEADER, public_rows(data))
                  ) if data.public else ""
        sections.append(f"<h2>{html.escape(data.title)}</h2><p>{html.escape(data.description)}</p>"
                        f"{table}{public}{controls}{images}")
    codec_plot = '<p><img src="codec_sweep.png" alt="codec sweep"></p>' if "codec_sweep.png" in plots else ""
    sheet_names = [Path(p).name for r in sealed or [] for p in r.contact_sheets]
    sheets_html = ("<h3>Contact sheets</h3><p>Per clip, a few held-out frames around the faces: original | public "
                   "(as released) | restored from the sealed originals.</p>"
                   + "".join(f'<p><img src="sheets/{html.escape(n)}" alt="{html.escape(n)}"></p>' for n in sheet_names)
                   ) if sheet_names else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>UU-Net evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:3px 8px}}
table{{border-collapse:collapse}}td:not(:first-child){{text-align:right}}</style></head><body>
<h1>UU-Net evaluation (paper Sec. IV)</h1>
<p>Model <code>{html.escape(str(params['model']))}</code> ({html.escape(str(params['weights'] or 'bundled weights'))}).
Keys derived from seed {params['seed']}. Bootstrap: mean ± sd over {N_RESAMPLES} random 90% subsets drawn with
repetition (items = faces, or genuine and impostor scores apart for d′/AUC). Run time {seconds:.0f} s.</p>
<p>Detection: a crop is upsampled 2× and framed in grey as in the model card; a hit is an MTCNN box with IoU ≥ 0.5
with the face square (the head ROI shrunk by the ROI scale). Identity: SFace cosine and dlib distance; x↔a′
compares x with a of <em>another frame</em> of the same person (genuine) or of another person (impostor); it needs
two faces of one subject. Temporal, diversity and reversibility apply to ours only: the baselines have no
sequence noise and no inverse.</p>
{''.join(sections)}
<h2>Reversal from the sealed originals</h2>
<p>The held-out quarter of each clip through the real modules in the release format; every restored ROI against
the decoded source at frame resolution.</p>
{_html_table(SEALED_HEADER, sealed_rows(sealed or [], None))}
{sheets_html}
<h2>Codec robustness (one public stream: first {params['codec_frames']} frames of
<code>{html.escape(Path(params['codec_clip']).name)}</code>)</h2>
<p>Payload ROIs: frames whose hidden payload still authenticates after the re-encode; oracle ROIs: the lossless
stream's boxes, so U_d is measured even where the payload is gone. PSNR at frame resolution inside the ROIs.</p>
{_html_table(CODEC_HEADER, codec_rows(codec))}{codec_plot}
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _json_value(est: Estimate) -> dict[str, float | None]:
    return {"value": _finite(est.value), "sd": _finite(est.sd), "low": _finite(est.low), "high": _finite(est.high)}


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_value(v) if isinstance(v, Estimate) else v for k, v in row.items()}


def _per_subject(faces: FaceSet) -> dict[str, int]:
    return {n: int((faces.subjects == i).sum()) for i, n in enumerate(faces.subject_names)}


@flow(name="evaluate")
def evaluate(clips_dir: str = str(DEFAULT_CLIPS), out: str = "out/eval", model: str = "uunet",
             weights: str | None = None, stride: int = 2, clips: list[str] | None = None,
             corpus: str | None = DEFAULT_CORPUS, split: str = "test", max_sequences: int = 200,
             frames_per_sequence: int = 8, variants: list[str] | None = None,
             codec_clip: str = str(CODEC_CLIP), codec_frames: int = 48, codec_settings: list[str] | None = None,
             seed: int = 0, threads: int = 1, readme: str | None = None,
             sealed_qualities: list[str] | None = None) -> dict[str, Any]:
    params = dict(locals())  # the flow parameters, before any local is bound
    logger = get_run_logger()
    run_id, started, t0 = new_run_id(), utc_now(), time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_paths = clips or [str(p) for p in sorted(Path(clips_dir).glob("*.mp4"))]
    datasets: dict[str, DatasetResult] = {}
    with _threads(threads):
        # The paper's learned reversal is what the per-face measures score: the gallery and the
        # codec sweep run lossless with nothing sealed (`--seal none`).
        settings = PipelineSettings(model=model, weights=weights, public_format="x264rgb", seal="none")
        pair = load_face_pair(model, weights)
        pairs = {Path(pair.source).stem if model != "keyed-permutation" else model: pair}
        for path in variants or []:
            name = Path(path).stem if Path(path).stem not in pairs else f"{Path(path).parent.name}/{Path(path).stem}"
            pairs[name] = load_face_pair(model, path)
        judges = Judges(FaceDetector(min_face_size=settings.min_face_size, batch_size=settings.batch_size),
                        SFaceJudge(detector=YuNetDetector()), GenderJudge(), DlibJudge())
        if clip_paths:
            faces, results, originals = score_footage(clip_paths, clips_dir, pair, settings, judges, stride, seed)
            logger.info("%d held-out faces of %d clips scored", len(faces.x), len(faces.subject_names))
            datasets["footage"] = DatasetResult(
                f"Held-out footage ({Path(clips_dir).name})",
                f"1 frame in {stride} of the last 25% of each clip (the part the training corpus leaves out), "
                f"best MTCNN face per frame, the pipeline's 64×64 head crop: {len(faces.x)} faces of "
                f"{len(faces.subject_names)} people, one per clip ({_per_subject(faces)}).", faces, results, originals)
        if corpus:
            faces, results, originals, gallery = score_split(corpus, split, pair, settings, judges, max_sequences,
                                                  frames_per_sequence, seed)
            logger.info("%d of %d catalog faces found and scored", gallery.faces_found, gallery.faces_selected)
            datasets["faces"] = DatasetResult(
                f"Faces catalog {Path(corpus).name}, split {split!r}",
                f"{gallery.faces_selected} faces (≤ {max_sequences} sequences, ≤ {frames_per_sequence} frames "
                f"each) of {len(set(faces.subject_names))} subjects, framed in grey as one gallery clip and run "
                f"through the real anonymize and reconstruct modules. The pipeline found and replaced "
                f"{gallery.faces_found} ({gallery.faces_found / max(gallery.faces_selected, 1):.1%}); the "
                f"measures are over those. Release check: "
                f"{'needs review at frames ' + str(gallery.review_frames) if gallery.needs_review else 'passed'}. "
                f"Gender labels from the catalog ({', '.join(gallery.label_sources) or 'none'}).",
                faces, results, originals, gallery=gallery)
        if not datasets:
            raise ValueError("nothing to evaluate: no clips and no faces catalog")
        for data in datasets.values():
            data.controls = score_controls(data.title, data, pairs, judges, settings.roi_scale, seed)
            for mode, (seal, blend) in PUBLIC_MODES.items():
                mode_pair = load_pipeline_pair(model, weights, seal)
                data.public_sources[mode] = Path(mode_pair.source.split(" (U_e)")[0]).name
                data.public[mode] = public_face_measures(data.faces, mode_pair.encoder, mode_pair.device,
                                                         _keys(seed)[0], judges, settings.roi_scale, blend, seed,
                                                         data.originals)
        codec = codec_robustness(codec_clip, codec_frames, pair, settings, judges, codec_settings, seed) \
            if codec_frames > 0 else []
        qualities = ["high", "exact"] if sealed_qualities is None else sealed_qualities
        # Each mode with the U_e the data path runs for it (`load_pipeline_pair`): where the
        # originals are sealed, the public-only one. Contact sheets for the first mode only.
        sealed = [sealed_reversal(clip_paths, len(clip_paths), quality,
                                  load_pipeline_pair(model, weights, quality), settings, judges, stride,
                                  str(out_dir / "sheets") if i == 0 else None)
                  for i, quality in enumerate(qualities)] if clip_paths else []
    plots = _plots(out_dir, datasets, codec)
    seconds = time.perf_counter() - t0

    catalog = CatalogStore(out_dir / "catalogs")
    catalog.write_part("metrics", run_id, "evaluate", metric_rows(run_id, datasets, codec, sealed))
    summary = {
        "run_id": run_id, "params": params, "seconds": round(seconds, 1),
        "datasets": {key: {
            "title": data.title,
            "faces": {"total": len(data.faces.x), "per_subject": _per_subject(data.faces)},
            "results": {m: {k: _json_value(v) for k, v in r.metrics.items()} for m, r in data.results.items()},
            "controls": {name: _json_row(row) for name, row in data.controls.items()},
            "public": {PUBLIC_MODES[mode][0]: {k: _json_value(v) for k, v in m.items()} for mode, m in data.public.items()},
            "gallery": None if data.gallery is None else {**asdict(data.gallery),
                                                          "faces_missed": data.gallery.faces_missed},
        } for key, data in datasets.items()},
        "codec": [{k: (_finite(v) if isinstance(v, float) else v) for k, v in vars(row).items()} for row in codec],
        "sealed": [{k: (_finite(v) if isinstance(v, float) else v) for k, v in vars(row).items()} for row in sealed],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False, default=str) + "\n")
    report = write_report(out_dir, params, datasets, codec, plots, seconds, sealed)
    command = "make eval" if readme else "python -m flows.evaluate"
    markdown = headline_markdown(datasets, codec, command, sealed)
    (out_dir / "headline.md").write_text(markdown)
    if readme:
        update_readme(Path(readme), markdown)
    catalog.write_part("runs", run_id, "summary", [dict(
        run_id=run_id, flow="evaluate", started_at=started, finished_at=utc_now(), input_dir=clips_dir,
        output_dir=str(out_dir), params_json=json.dumps(params, sort_keys=True, default=str),
        n_videos=len(clip_paths), host=socket.gethostname(), status="done")])
    logger.info("report: %s (%.0f s)", report, seconds)
    return {"run_id": run_id, "report": str(report), "summary": str(out_dir / "summary.json"),
            "headline": str(out_dir / "headline.md"), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips-dir", default=str(DEFAULT_CLIPS), help="folder of clips (*.mp4), one person each")
    p.add_argument("--out", default="out/eval")
    p.add_argument("--model", default="uunet", choices=["uunet", "keyed-permutation"])
    p.add_argument("--weights", help="weights file (default: the bundled ones)")
    p.add_argument("--stride", type=int, default=2, help="use 1 held-out frame in N (default 2)")
    p.add_argument("--corpus", default=DEFAULT_CORPUS,
                   help="folder whose catalogs/faces table is evaluated (built with the training recipe when "
                        "it has none); '' skips the faces-catalog part")
    p.add_argument("--split", default="test", help="catalog split to evaluate (default test)")
    p.add_argument("--max-sequences", type=int, default=200)
    p.add_argument("--frames-per-sequence", type=int, default=8)
    p.add_argument("--variants", nargs="*", help="more weights files of the same model, compared per s")
    p.add_argument("--codec-clip", default=str(CODEC_CLIP))
    p.add_argument("--codec-frames", type=int, default=48, help="0 skips the codec sweep")
    p.add_argument("--sealed", default="high,exact",
                   help="seal qualities whose reversal is measured on the clips (comma-separated; '' skips)")
    p.add_argument("--codec-settings", nargs="*", choices=list(CODEC_SETTINGS),
                   help="codec settings to sweep (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1)")
    p.add_argument("--readme", help="also paste the headline tables into this README's eval-headline block")
    args = p.parse_args(argv)
    if args.stride < 1 or args.codec_frames < 0 or args.threads < 1 or args.max_sequences < 1 \
            or args.frames_per_sequence < 1:
        p.error("--stride, --threads, --max-sequences and --frames-per-sequence must be >= 1, --codec-frames >= 0")
    args.corpus = args.corpus or None
    qualities = [q for q in args.sealed.split(",") if q]
    if any(q not in QUALITIES for q in qualities):
        p.error(f"--sealed takes qualities among {', '.join(QUALITIES)}")
    options = {**vars(args), "sealed_qualities": qualities}
    options.pop("sealed")
    print(json.dumps(evaluate(**options), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
