"""Benchmark of the public module on one clip (default: the bundled 640×360 clip), and sizes.

    python -m bench.throughput [VIDEO] [--model NAME] [--weights FILE] [--sizes]

Measures, in one process and one run: decode + encode alone in the public format (no
detection, no model), the full anonymize path, and the reconstruct path, and prints the
ratio anonymize fps / (decode + encode) fps plus each stage's share of the anonymize time.
With `--sizes`, also the size of the public files of every bundled sample against their
sources, per public format × seal quality (`make bench` does both).
Not a test: numbers depend on the machine; the ratio is what travels between machines.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import iter_frames, probe
from tasks.datapath.deidentify import FaceSwapper, load_pipeline_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.encode import VIDEO_FORMATS, VideoWriter
from tasks.datapath.keys import generate_key_pair, parse_private_key
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.seal import QUALITIES
from tasks.datapath.video_loop import PipelineSettings

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
DEFAULT_CLIP = SAMPLES / "WolfgangLanger_Pexels.mp4"


def decode_encode_only(source: Path, output: Path, settings: PipelineSettings) -> float:
    info = probe(source)
    start = time.perf_counter()
    with VideoWriter(output, info.width, info.height, info.fps_rational, codec=settings.public_format) as writer:
        for _, batch in iter_frames(source, batch_size=settings.batch_size):
            writer.write(batch)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="?", default=str(DEFAULT_CLIP))
    p.add_argument("--model", default=PipelineSettings.model)
    p.add_argument("--weights")
    p.add_argument("--batch-size", type=int, default=PipelineSettings.batch_size)
    p.add_argument("--min-face-size", type=int, default=PipelineSettings.min_face_size)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--format", dest="public_format", default=PipelineSettings.public_format,
                   choices=sorted(VIDEO_FORMATS))
    p.add_argument("--seal", default=PipelineSettings.seal, choices=QUALITIES)
    p.add_argument("--sizes", action="store_true", help="also the size table of the bundled samples")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    source = Path(args.video)
    info = probe(source)
    settings = PipelineSettings(model=args.model, weights=args.weights, batch_size=args.batch_size,
                                min_face_size=args.min_face_size, public_format=args.public_format, seal=args.seal)
    detector = FaceDetector(min_face_size=settings.min_face_size, batch_size=settings.batch_size)
    swapper = FaceSwapper(load_pipeline_pair(settings.model, settings.weights, settings.seal))
    authority = parse_private_key(generate_key_pair()[0])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Warm-up on a few frames so one-off costs (thread pools, carrier cache) don't count.
        detector.detect(next(iter_frames(source, batch_size=4))[1])
        # The median of three: one pass takes a few seconds, and a single one swung the ratio by a sixth.
        base_s = statistics.median(decode_encode_only(source, tmp / "baseline.mkv", settings) for _ in range(3))
        record = anonymize_video(source, tmp / "public.mkv", recipients=[authority.public], video_id="0" * 64,
                                 detector=detector, swapper=swapper, settings=settings, run_id="bench",
                                 progress=False)
        restored = reconstruct_video(tmp / "public.mkv", tmp / "restored.mkv", private_key=authority,
                                     swapper=swapper, settings=settings, source=source, progress=False)
    n = record.frame_count
    anon_s, rest_s = record.seconds["total"], restored.seconds["total"]
    base_fps, anon_fps, rest_fps = n / base_s, n / anon_s, n / rest_s
    print(f"clip: {source.name} {info.width}x{info.height}, {n} frames, {info.fps:.3f} fps; "
          f"model {settings.model}; torch threads {args.threads}; batch {settings.batch_size}; "
          f"min face {settings.min_face_size}px; {record.faces} faces in {record.frames_with_faces} frames; "
          f"format {settings.public_format}, seal {settings.seal}")
    print(f"decode + {settings.public_format} encode only : {base_fps:7.1f} fps")
    print(f"anonymize (public module)     : {anon_fps:7.1f} fps   ratio to decode+encode {anon_fps / base_fps:.3f}")
    print(f"reconstruct (private module)  : {rest_fps:7.1f} fps   ratio to decode+encode {rest_fps / base_fps:.3f}"
          f"   PSNR in ROIs {restored.psnr_roi:.2f} dB, restored by {restored.restore_path}")
    sealed_db = f", sealed ROI PSNR {record.seal_psnr_db:.2f} dB" if record.seal_psnr_db is not None else ""
    print(f"public file {record.public_bytes / 1e6:.2f} MB (sealed data {record.sealed_bytes / 1e6:.2f} MB{sealed_db}), "
          f"source {source.stat().st_size / 1e6:.2f} MB: {record.public_bytes / source.stat().st_size:.2f}x")
    print("anonymize time share by stage (encode = time spent handing frames to ffmpeg;"
          " release_check = the sampled re-check of the written stream):")
    for stage in ("decode", "detect", "seal", "deidentify", "stego", "encode", "attach", "release_check"):
        seconds = record.seconds.get(stage, 0.0)
        print(f"  {stage:<13} {seconds:6.2f} s  {100 * seconds / anon_s:5.1f} %")
    if args.sizes:
        print_size_table(detector, swapper, authority, settings)


def print_size_table(detector: FaceDetector, swapper: FaceSwapper, authority, base: PipelineSettings) -> None:
    """Public bytes / source bytes over all bundled samples, per public format × seal quality."""
    clips = sorted(SAMPLES.glob("*.mp4"))
    source_bytes = sum(c.stat().st_size for c in clips)
    print(f"\nsize of the public files of the {len(clips)} bundled samples ({source_bytes / 1e6:.2f} MB of sources):")
    print("| format | seal | public MB | of which sealed MB | public / sources "
          "| sealed ROI dB, lowest video (lowest chunk) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, seal in itertools.product(sorted(VIDEO_FORMATS, key=lambda f: f != "h264"), QUALITIES):
            # Sizes do not depend on the release check: check the minimum of frames.
            settings = PipelineSettings(**{**base.__dict__, "public_format": fmt, "seal": seal,
                                           "release_check_frames": 3})
            public = sealed = 0
            worst_video = worst_chunk = float("inf")
            for clip in clips:
                record = anonymize_video(clip, Path(tmp) / "public.mkv", recipients=[authority.public],
                                         video_id="0" * 64, detector=detector, swapper=swapper, settings=settings,
                                         run_id="bench", progress=False)
                public, sealed = public + record.public_bytes, sealed + record.sealed_bytes
                worst_video = min(worst_video, record.seal_psnr_db or float("inf"))
                worst_chunk = min(worst_chunk, record.seal_min_psnr_db or float("inf"))
            worst_text = (f"{worst_video:.2f} ({worst_chunk:.2f})" if seal == "high"
                          else ("exact" if seal == "exact" else "-"))
            print(f"| {fmt} | {seal} | {public / 1e6:.2f} | {sealed / 1e6:.2f} | {public / source_bytes:.2f}x "
                  f"| {worst_text} |", flush=True)


if __name__ == "__main__":
    main()
