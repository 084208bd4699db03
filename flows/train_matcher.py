"""Phase I: train the pairwise attribute matcher D_a (paper Sec. III-A) on a faces corpus.

    python -m flows.train_matcher [--corpus out/corpus] [--steps 2000] [--out models/weights/matcher.pt]

Builds the offline default corpus first when the corpus folder holds none (see
tasks/training/corpus.py and models/weights/MODEL_CARD.md for what it is). Per-step losses
and validation AUC per label on held-out subjects go to the `metrics` catalog; the best
checkpoint by ID AUC is kept. Re-running resumes from the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task

from catalogs import CatalogStore, new_run_id, utc_now
from flows.recording import CatalogMetrics
from tasks.training.corpus import build_default_corpus, export_training_tensors
from tasks.training.loops import TRAIN, VAL, FaceData, MatcherConfig, train_matcher

DEFAULT_CORPUS = "out/corpus"
# DCGAN identities in a newly built corpus: the bundled weights' recipe, so that a corpus
# built by any flow (training or evaluation) is the one they were trained and measured on.
DEFAULT_N_GAN = 3500
DEFAULT_MATCHER = "models/weights/matcher.pt"


@task(task_run_name="prepare corpus {corpus_dir}")
def prepare_corpus(corpus_dir: str, n_gan: int = DEFAULT_N_GAN, seed: int = 0) -> Path:
    """The training tensor file of the corpus, built (faces catalog + export) if missing."""
    corpus = Path(corpus_dir)
    tensors = corpus / "faces.pt"
    if tensors.is_file():
        return tensors
    build_default_corpus(corpus, n_gan=n_gan, seed=seed)
    faces = CatalogStore(corpus / "catalogs").read("faces")
    return export_training_tensors(faces, tensors)


def resolve_device(device: str) -> torch.device:
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                        "cpu" if device == "auto" else device)


def record_run(catalog: CatalogStore, run_id: str, flow_name: str, params: dict[str, Any], started,
               status: str) -> None:
    catalog.write_part("runs", run_id, "summary", [dict(
        run_id=run_id, flow=flow_name, started_at=started, finished_at=utc_now(),
        input_dir=params.get("corpus_dir"), output_dir=params.get("out"),
        params_json=json.dumps(params, sort_keys=True, default=str), host=socket.gethostname(),
        status=status)])


@flow(name="train-matcher")
def train_matcher_flow(corpus_dir: str = DEFAULT_CORPUS, out: str = DEFAULT_MATCHER, steps: int = 2000,
                       batch: int = 64, device: str = "auto", n_gan: int = DEFAULT_N_GAN, seed: int = 0,
                       resume: bool = True, metrics_every: int = 10) -> dict[str, Any]:
    params = dict(locals())  # the flow parameters, before any local is bound
    logger = get_run_logger()
    run_id, started = new_run_id(), utc_now()
    tensors = prepare_corpus(corpus_dir, n_gan, seed)
    catalog = CatalogStore(Path(corpus_dir) / "catalogs")
    dev = resolve_device(device)
    metrics = CatalogMetrics(catalog, run_id, dataset=str(tensors), method="matcher",
                             every=metrics_every)
    checkpoint = Path(out).with_suffix(".ckpt")
    logger.info("phase I on %s, %d steps%s", dev, steps, " (resuming)" if resume and checkpoint.is_file() else "")
    result = train_matcher(FaceData(tensors, dev, TRAIN), FaceData(tensors, dev, VAL), out,
                           MatcherConfig(steps=steps, batch=batch, seed=seed),
                           resume=checkpoint if resume else None, on_metrics=metrics)
    metrics.flush()
    record_run(catalog, run_id, "train-matcher", params, started, "done")
    logger.info("matcher: %s; last values %s", result, metrics.last)
    return {**result, **metrics.last, "run_id": run_id}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.train_matcher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", dest="corpus_dir", default=DEFAULT_CORPUS)
    p.add_argument("--out", default=DEFAULT_MATCHER)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--n-gan", type=int, default=DEFAULT_N_GAN, help="DCGAN identities in a newly built corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--metrics-every", type=int, default=10, help="write per-step losses every N steps")
    print(json.dumps(train_matcher_flow(**vars(p.parse_args(argv))), default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
