"""Phase II: train U_e, U_d and the PatchGAN critic (paper Sec. III-B, eq. 13) with the phase I matcher.

    python -m flows.train_uunet [--corpus out/corpus] [--matcher models/weights/matcher.pt]
                                [--steps 2000] [--control -1,0,0] [--out models/weights/uunet.pt]
    python -m flows.train_uunet --public --init models/weights/uunet.pt --out models/weights/uunet-public.pt

`--public` fine-tunes U_e of the `--init` pair alone for the sealed default's public face
(`tasks.training.loops.train_public_encoder`: no reconstruction term, MTCNN's R-Net and
O-Net as frozen face-likeness terms); it writes a U_e-only file in float16.

`--control` is the paper's s: one entry per matcher label (id, gender, age_group),
1 = keep, -1 = change, 0 = don't care; the ID entry is always -1. Losses per step go to
the `metrics` catalog, an x | a | r | r_wrong_key grid is written every `--samples-every`
steps next to the weights, and re-running resumes from the checkpoint. On a CUDA machine
the same loop runs as `python -m tasks.training uunet ...` with nothing but torch.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from catalogs import CatalogStore, new_run_id, utc_now
from flows.recording import CatalogMetrics, SampleGrids
from flows.train_matcher import (
    DEFAULT_CORPUS,
    DEFAULT_MATCHER,
    DEFAULT_N_GAN,
    prepare_corpus,
    record_run,
    resolve_device,
)
from tasks.datapath.detect import load_mtcnn
from tasks.training.loops import (
    TRAIN,
    FaceData,
    PublicEncoderConfig,
    UUNetConfig,
    load_matcher,
    train_public_encoder,
    train_uunet,
)

DEFAULT_WEIGHTS = "models/weights/uunet.pt"


@flow(name="train-uunet")
def train_uunet_flow(corpus_dir: str = DEFAULT_CORPUS, matcher: str = DEFAULT_MATCHER,
                     out: str = DEFAULT_WEIGHTS, steps: int = 2000, control: str = UUNetConfig.control,
                     device: str = "auto", samples_every: int = 250, n_gan: int = DEFAULT_N_GAN, seed: int = 0,
                     resume: bool = True, metrics_every: int = 10, keyed: bool = True, init: str | None = None,
                     batch_subjects: int | None = None, half: bool = False, public: bool = False,
                     minutes: float | None = None) -> dict[str, Any]:
    params = dict(locals())  # the flow parameters, before any local is bound
    logger = get_run_logger()
    run_id, started = new_run_id(), utc_now()
    tensors = prepare_corpus(corpus_dir, n_gan, seed)
    catalog = CatalogStore(Path(corpus_dir) / "catalogs")
    dev = resolve_device(device)
    d_a, _ = load_matcher(matcher, dev)
    metrics = CatalogMetrics(catalog, run_id, dataset=str(tensors), method="uunet",
                             every=metrics_every)
    samples = SampleGrids(Path(out).parent / "samples")
    checkpoint = Path(out).with_suffix(".ckpt")
    deadline = time.time() + 60 * minutes if minutes else None
    batch = {"subjects": batch_subjects} if batch_subjects else {}  # else each recipe's own batch
    logger.info("phase II%s on %s, %d steps, s=%s%s%s", " (public-only U_e)" if public else "", dev, steps, control,
                " (resuming)" if resume and checkpoint.is_file() else "", f", from {init}" if init else "")
    if public:
        if not init:
            raise ValueError("--public fine-tunes the U_e of a trained pair: give it --init")
        mtcnn = load_mtcnn(dev)
        config = PublicEncoderConfig(steps=steps, control=control, samples_every=samples_every, seed=seed,
                                     **batch)
        result = train_public_encoder(FaceData(tensors, dev, TRAIN), d_a, out, config, init,
                                      [(mtcnn.rnet, 24), (mtcnn.onet, 48)], resume=checkpoint if resume else None,
                                      on_metrics=metrics, on_samples=samples, deadline=deadline, half=True)
    else:
        config = UUNetConfig(steps=steps, control=control, samples_every=samples_every, seed=seed, keyed=keyed,
                             **batch)
        result = train_uunet(FaceData(tensors, dev, TRAIN), d_a, out, config,
                             resume=checkpoint if resume else None, on_metrics=metrics, on_samples=samples, init=init,
                             deadline=deadline, half=half)
    metrics.flush()
    record_run(catalog, run_id, "train-uunet", params, started, "done")
    logger.info("U-Nets: %s; samples %s", result, [str(p) for p in samples.written[-1:]])
    return {**result, **metrics.last, "run_id": run_id}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.train_uunet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", dest="corpus_dir", default=DEFAULT_CORPUS)
    p.add_argument("--matcher", default=DEFAULT_MATCHER)
    p.add_argument("--out", default=DEFAULT_WEIGHTS)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--control", default=UUNetConfig.control, help="s, e.g. -1,0,0 (id, gender, age_group)")
    p.add_argument("--device", default="auto")
    p.add_argument("--samples-every", type=int, default=250)
    p.add_argument("--n-gan", type=int, default=DEFAULT_N_GAN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--paper-mode", dest="keyed", action="store_false",
                   help="U_d sees a only, as in the paper (default: U_d also needs the keyed noise)")
    p.add_argument("--metrics-every", type=int, default=10, help="write per-step losses every N steps")
    p.add_argument("--init", help="start U_e/U_d from this weights file: fine-tune it to another --control")
    p.add_argument("--batch-subjects", type=int,
                   help="subjects per batch (batch = subjects x 2 sequences x 4 frames; default 8, --public 4)")
    p.add_argument("--half", action="store_true", help="write the weights in float16 (for kept variants)")
    p.add_argument("--public", action="store_true",
                   help="fine-tune --init's U_e alone for the sealed default's public face (writes U_e only)")
    p.add_argument("--minutes", type=float, help="stop (with a checkpoint) after this long; rerun to resume")
    print(json.dumps(train_uunet_flow(**vars(p.parse_args(argv))), default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
