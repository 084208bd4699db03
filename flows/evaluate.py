"""The paper's Sec. IV evaluation: ours against blurring and superpixels, plus codec robustness.

    python -m flows.evaluate [--clips-dir samples] [--out out/eval] [--model uunet] [--weights FILE]
                             [--stride 2] [--codec-frames 48] [--codec-settings NAME ...] [--seed 0]

Held-out faces of every clip in --clips-dir (last quarter, 1 frame in --stride; see
tasks/evaluation.py) go through each method and every measure; the codec sweep
re-encodes ONE short public stream (the first --codec-frames frames of the bundled
Wolfgang clip, anonymized by the real public module) with each x264 CRF setting and ffv1.
Writes OUT/report.html with its PNG plots, OUT/summary.json and `metrics` / `runs` rows in
OUT/catalogs. Keys are derived from --seed: an evaluation is reproducible, not secret.
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
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from catalogs import CatalogStore, new_run_id
from catalogs.store import file_content_hash
from tasks.baselines import BASELINES
from tasks.codec_sweep import CODEC_SETTINGS, SweepRow, sweep
from tasks.deidentify import FaceSwapper, load_face_pair
from tasks.detect import FaceDetector
from tasks.encode import ffmpeg_exe
from tasks.evaluation import (N_RESAMPLES, OURS, Estimate, HeldOutFaces, Judges, MethodResult, collect_faces,
                              evaluate_methods, roc_points)
from tasks.judges import DlibJudge, GenderJudge, SFaceJudge, YuNetDetector
from tasks.keys import Key
from tasks.metrics import decidability
from tasks.workers import PipelineSettings, anonymize_video, utc_now

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CLIPS = REPO / "samples"
CODEC_CLIP = REPO / "samples" / "WolfgangLanger_Pexels.mp4"
METHODS = [OURS, *BASELINES]

# (metric, label) in the headline table, in the paper's order; ↑/↓ say which way is better.
HEADLINE: list[tuple[str, str]] = [
    ("detection_rate_a", "MTCNN detects a (IoU ≥ 0.5 with the face) ↑"),
    ("detection_rate_ratio", "detection rate ratio a/x ↑"),
    ("ap_ratio", "AP ratio a/x ↑"),
    ("mtcnn_conf_a", "MTCNN confidence on a, mean (x: see reference)"),
    ("mtcnn_conf_pearson", "Pearson r of MTCNN confidence x↔a"),
    ("x_a_d_prime", "identity x↔a′: d′ ↓"),
    ("x_a_auc", "identity x↔a′: AUC ↓"),
    ("same_person_x_a", "SFace same person x↔a (same frame) ↓"),
    ("dlib_same_person_x_a", "dlib same person x↔a (same frame) ↓"),
    ("gender_agreement", "gender agreement x↔a ↑"),
    ("temporal_d_prime", "temporal consistency a_t↔a_t+i: d′ ↑"),
    ("temporal_auc", "temporal consistency: AUC ↑"),
    ("temporal_ks_p", "temporal: KS p-value genuine vs impostor ↓"),
    ("diversity_cos_mean", "diversity seq 0↔seq 1: mean cosine ↓"),
    ("diversity_same_rate", "diversity: SFace same-person rate ↓"),
    ("psnr_x_r", "PSNR x↔r dB (64×64, non-exact faces) ↑"),
    ("ssim_x_r", "SSIM x↔r ↑"),
    ("same_person_x_r", "SFace same person x↔r ↑"),
    ("same_person_x_r_wrong", "SFace same person x↔r, wrong key ↓"),
    ("dlib_same_person_x_r", "dlib same person x↔r ↑"),
    ("dlib_same_person_x_r_wrong", "dlib same person x↔r, wrong key ↓"),
    ("reversibility_residual_max", "max |r1 − r2| over two runs (must be 0)"),
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


# NO_CACHE, no persisted result: the outputs are arrays of faces, only ever used by this run.
@task(task_run_name="held-out faces of {clips_dir}", cache_policy=NO_CACHE, persist_result=False)
def score_faces(clips: list[str], clips_dir: str, model: str, weights: str | None, stride: int,
                seed: int) -> tuple[HeldOutFaces, dict[str, MethodResult]]:
    rng = np.random.default_rng(seed)
    key, wrong_key = Key(rng.bytes(32)), Key(rng.bytes(32))
    settings = PipelineSettings(model=model, weights=weights)
    pair = load_face_pair(model, weights)
    detector = FaceDetector(min_face_size=settings.min_face_size, batch_size=settings.batch_size)
    judges = Judges(detector, SFaceJudge(detector=YuNetDetector()), GenderJudge(), DlibJudge())
    faces = collect_faces([Path(c) for c in clips], stride, detector, pair, key, wrong_key, settings.roi_scale)
    return faces, evaluate_methods(faces, BASELINES, judges, settings.roi_scale, seed)


def cut_clip(source: Path, dest: Path, frames: int) -> Path:
    """The first `frames` frames of `source`, near-losslessly (x264 qp 0 in the source's own yuv420p)."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(source), "-an",
           "-frames:v", str(frames), "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv420p", str(dest)]
    subprocess.run(cmd, check=True, capture_output=True)
    return dest


@task(task_run_name="codec sweep on {frames} frames", cache_policy=NO_CACHE, persist_result=False)
def codec_robustness(source: str, frames: int, model: str, weights: str | None, settings: list[str] | None,
                     seed: int) -> list[SweepRow]:
    rng = np.random.default_rng(seed + 1)  # another key than the faces': nothing shared by accident
    key = Key(rng.bytes(32))
    pipeline = PipelineSettings(model=model, weights=weights)
    swapper = FaceSwapper(load_face_pair(model, weights))
    judge = SFaceJudge()
    chosen = CODEC_SETTINGS if settings is None else {name: CODEC_SETTINGS[name] for name in settings}
    with tempfile.TemporaryDirectory(prefix="uunet-eval-codec-") as tmp:
        clip = cut_clip(Path(source), Path(tmp) / "source.mp4", frames)
        public = Path(tmp) / "public.mkv"
        anonymize_video(clip, public, key=key, video_id=file_content_hash(clip),
                        detector=FaceDetector(min_face_size=pipeline.min_face_size, batch_size=pipeline.batch_size),
                        swapper=swapper, settings=pipeline, run_id="evaluate", progress=False, judge=judge)
        return sweep(public, clip, key, swapper, settings=chosen, sample_every=4, judge=judge)


# --- outputs ------------------------------------------------------------------------------

def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def metric_rows(run_id: str, dataset: str, results: dict[str, MethodResult], codec: list[SweepRow]) -> list[dict]:
    now = utc_now()
    rows = []
    for method, result in results.items():
        for metric, est in result.metrics.items():
            if _finite(est.value) is None:
                continue  # the catalog holds numbers; an undefined one stays in summary.json as null
            rows.append(dict(run_id=run_id, dataset=dataset, method=method, metric=metric, value=float(est.value),
                             low=_finite(est.low), high=_finite(est.high), created_at=now))
    for row in codec:
        for metric in ("payload_recovery", "psnr_roi_payload", "psnr_roi_oracle", "ssim_roi", "same_person_rate"):
            value = getattr(row, metric)
            if math.isfinite(value):
                rows.append(dict(run_id=run_id, dataset=f"codec:{row.setting}", method=OURS, metric=metric,
                                 value=float(value), created_at=now))
    return rows


def _plots(out: Path, results: dict[str, MethodResult], codec: list[SweepRow]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = [(f"{'x' if m == 'original' else m}: {name}", env) for m, r in results.items()
            for name, env in r.environments.items()]
    written = []
    cols = 3
    rows = math.ceil(len(envs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    bins = np.linspace(-0.4, 1.0, 57)
    for ax, (title, env) in zip(axes.flat, envs):
        ax.hist(env.impostor, bins=bins, density=True, color="tab:red", alpha=0.55, label="impostor")
        ax.hist(env.genuine, bins=bins, density=True, color="tab:green", alpha=0.55, label="genuine")
        ax.set_title(f"{title}  (d′ = {decidability(env.genuine, env.impostor):.2f})", fontsize=9)
        ax.set_xlabel("SFace cosine")
    for ax in list(axes.flat)[len(envs):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decision_environments.png", dpi=90)
    plt.close(fig)
    written.append("decision_environments.png")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for title, env in envs:
        fpr, tpr = roc_points(env)
        ax.plot(fpr, tpr, label=title)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=90)
    plt.close(fig)
    written.append("roc.png")

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
    return [(label, [_cell(results[m].metrics.get(metric)) for m in METHODS]) for metric, label in HEADLINE]


def write_report(out: Path, params: dict[str, Any], faces: HeldOutFaces, results: dict[str, MethodResult],
                 codec: list[SweepRow], plots: list[str], seconds: float) -> Path:
    ref = results["original"].metrics
    table = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
                    for label, cells in headline_rows(results))
    codec_table = "".join(
        f"<tr><td>{r.setting}</td><td>{r.payload_recovery:.1%}</td><td>{_num(r.psnr_roi_payload, '.2f')}</td>"
        f"<td>{_num(r.psnr_roi_oracle, '.2f')}</td><td>{_num(r.ssim_roi, '.3f')}</td>"
        f"<td>{_num(r.same_person_rate, '.1%')}</td><td>{r.frames}</td>"
        f"<td>{r.seconds:.1f}</td></tr>" for r in codec)
    images = "".join(f'<p><img src="{name}" alt="{name}"></p>' for name in plots)
    counts = ", ".join(f"{name}: {int((faces.subjects == i).sum())}" for i, name in enumerate(faces.clips))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>UU-Net evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:3px 8px}}
table{{border-collapse:collapse}}td:not(:first-child){{text-align:right}}</style></head><body>
<h1>UU-Net evaluation (paper Sec. IV)</h1>
<p>Model <code>{html.escape(str(params['model']))}</code> ({html.escape(str(params['weights'] or 'bundled weights'))});
clips in <code>{html.escape(str(params['clips_dir']))}</code>. Faces: 1 frame in {params['stride']} of the last 25% of
each clip (the part the training corpus leaves out), best MTCNN face per frame, the pipeline's 64×64 head crop:
{len(faces.x)} faces ({counts}); one subject per clip. Keys derived from seed {params['seed']}.
Bootstrap: mean ± sd over {N_RESAMPLES} random 90% subsets (items = faces, or score pairs for d′/AUC).
Run time {seconds:.0f} s.</p>
<h2>Ours vs blur vs superpixel</h2>
<p>Reference on x: MTCNN detection rate {_cell(ref['mtcnn_detection_rate_x'])};
identity x↔x′ d′ {_cell(ref['x_x_d_prime'])}, AUC {_cell(ref['x_x_auc'])}.
Detection: a crop is upsampled 2× and framed in grey as in the model card; a hit is an MTCNN box with IoU ≥ 0.5
with the face square (the head ROI shrunk by the ROI scale). Identity: SFace cosine; x↔a′ compares x with a of
<em>another frame</em> of the same person (genuine) or of another person (impostor). Temporal, diversity and
reversibility apply to ours only: the baselines have no sequence noise and no inverse.</p>
<table><tr><th>measure</th>{''.join(f'<th>{m}</th>' for m in METHODS)}</tr>{table}</table>
<h2>Codec robustness (one public stream: first {params['codec_frames']} frames of the Wolfgang clip)</h2>
<p>Payload ROIs: frames whose hidden payload still authenticates after the re-encode; oracle ROIs: the lossless
stream's boxes, so U_d is measured even where the payload is gone. PSNR at frame resolution inside the ROIs.</p>
<table><tr><th>setting</th><th>payload recovered</th><th>PSNR ROI (payload) dB</th><th>PSNR ROI (oracle) dB</th>
<th>SSIM ROI</th><th>SFace same person</th><th>frames</th><th>s</th></tr>{codec_table}</table>
<h2>Plots</h2>{images}
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    return path


def _json_value(est: Estimate) -> dict[str, float | None]:
    return {"value": _finite(est.value), "sd": _finite(est.sd), "low": _finite(est.low), "high": _finite(est.high)}


@flow(name="evaluate")
def evaluate(clips_dir: str = str(DEFAULT_CLIPS), out: str = "out/eval", model: str = "uunet",
             weights: str | None = None, stride: int = 2, clips: list[str] | None = None,
             codec_clip: str = str(CODEC_CLIP), codec_frames: int = 48, codec_settings: list[str] | None = None,
             seed: int = 0, threads: int = 1) -> dict[str, Any]:
    params = dict(locals())  # the flow parameters, before any local is bound
    logger = get_run_logger()
    run_id, started, t0 = new_run_id(), utc_now(), time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip_paths = clips or [str(p) for p in sorted(Path(clips_dir).glob("*.mp4"))]
    with _threads(threads):
        faces, results = score_faces(clip_paths, clips_dir, model, weights, stride, seed)
        logger.info("%d held-out faces of %d clips scored", len(faces.x), len(faces.clips))
        codec = codec_robustness(codec_clip, codec_frames, model, weights, codec_settings, seed)
    plots = _plots(out_dir, results, codec)
    seconds = time.perf_counter() - t0

    catalog = CatalogStore(out_dir / "catalogs")
    dataset = Path(clips_dir).name
    catalog.write_part("metrics", run_id, "evaluate", metric_rows(run_id, dataset, results, codec))
    summary = {
        "run_id": run_id, "params": params, "seconds": round(seconds, 1),
        "faces": {"total": len(faces.x), "per_clip": {n: int((faces.subjects == i).sum())
                                                      for i, n in enumerate(faces.clips)}},
        "results": {m: {k: _json_value(v) for k, v in r.metrics.items()} for m, r in results.items()},
        "codec": [{k: (_finite(v) if isinstance(v, float) else v) for k, v in vars(row).items()} for row in codec],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False, default=str) + "\n")
    report = write_report(out_dir, params, faces, results, codec, plots, seconds)
    catalog.write_part("runs", run_id, "summary", [dict(
        run_id=run_id, flow="evaluate", started_at=started, finished_at=utc_now(), input_dir=clips_dir,
        output_dir=str(out_dir), params_json=json.dumps(params, sort_keys=True, default=str),
        n_videos=len(clip_paths), host=socket.gethostname(), status="done")])
    logger.info("report: %s (%.0f s)", report, seconds)
    return {"run_id": run_id, "report": str(report), "summary": str(out_dir / "summary.json"),
            "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips-dir", default=str(DEFAULT_CLIPS), help="folder of clips (*.mp4), one person each")
    p.add_argument("--out", default="out/eval")
    p.add_argument("--model", default="uunet", choices=["uunet", "keyed-permutation"])
    p.add_argument("--weights", help="weights file (default: the bundled ones)")
    p.add_argument("--stride", type=int, default=2, help="use 1 held-out frame in N (default 2)")
    p.add_argument("--codec-clip", default=str(CODEC_CLIP))
    p.add_argument("--codec-frames", type=int, default=48)
    p.add_argument("--codec-settings", nargs="*", choices=list(CODEC_SETTINGS),
                   help="codec settings to sweep (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1)")
    args = p.parse_args(argv)
    if args.stride < 1 or args.codec_frames < 1 or args.threads < 1:
        p.error("--stride, --codec-frames and --threads must be >= 1")
    print(json.dumps(evaluate(**vars(args)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
