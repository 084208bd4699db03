"""Benchmark of the public module on one clip (default: the bundled 640×360 clip).

    python -m bench.throughput [VIDEO] [--model NAME] [--weights FILE] [--repeat N]

Measures, in one process and one run: decode + lossless encode alone (no detection, no
model), the full anonymize path, and the reconstruct path, and prints the ratio
anonymize fps / (decode + encode) fps plus each stage's share of the anonymize time.
Not a test: numbers depend on the machine; the ratio is what travels between machines.
"""
from __future__ import annotations

import argparse
import os
import secrets
import tempfile
import time
from pathlib import Path

import torch

from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import iter_frames, probe
from tasks.datapath.deidentify import FaceSwapper, load_face_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.encode import LosslessVideoWriter
from tasks.datapath.keys import Key
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.video_loop import PipelineSettings

DEFAULT_CLIP = Path(__file__).resolve().parent.parent / "samples" / "WolfgangLanger_Pexels.mp4"


def decode_encode_only(source: Path, output: Path, settings: PipelineSettings) -> float:
    info = probe(source)
    start = time.perf_counter()
    with LosslessVideoWriter(output, info.width, info.height, info.fps_rational, codec=settings.codec) as writer:
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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    source = Path(args.video)
    info = probe(source)
    settings = PipelineSettings(model=args.model, weights=args.weights, batch_size=args.batch_size,
                                min_face_size=args.min_face_size)
    detector = FaceDetector(min_face_size=settings.min_face_size, batch_size=settings.batch_size)
    swapper = FaceSwapper(load_face_pair(settings.model, settings.weights))
    key = Key(secrets.token_bytes(32))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Warm-up on a few frames so one-off costs (thread pools, carrier cache) don't count.
        detector.detect(next(iter_frames(source, batch_size=4))[1])
        base_s = decode_encode_only(source, tmp / "baseline.mkv", settings)
        record = anonymize_video(source, tmp / "public.mkv", key=key, video_id="0" * 64, detector=detector,
                                 swapper=swapper, settings=settings, run_id="bench", progress=False)
        restored = reconstruct_video(tmp / "public.mkv", tmp / "restored.mkv", key=key, swapper=swapper,
                                     settings=settings, source=source, progress=False)
    n = record.frame_count
    anon_s, rest_s = record.seconds["total"], restored.seconds["total"]
    base_fps, anon_fps, rest_fps = n / base_s, n / anon_s, n / rest_s
    print(f"clip: {source.name} {info.width}x{info.height}, {n} frames, {info.fps:.3f} fps; "
          f"model {settings.model}; torch threads {args.threads}; batch {settings.batch_size}; "
          f"min face {settings.min_face_size}px; {record.faces} faces in {record.frames_with_faces} frames")
    print(f"decode + lossless encode only : {base_fps:7.1f} fps")
    print(f"anonymize (public module)     : {anon_fps:7.1f} fps   ratio to decode+encode {anon_fps / base_fps:.3f}")
    print(f"reconstruct (private module)  : {rest_fps:7.1f} fps   ratio to decode+encode {rest_fps / base_fps:.3f}"
          f"   PSNR in ROIs {restored.psnr_roi:.2f} dB")
    print("anonymize time share by stage (encode = time spent handing frames to ffmpeg;"
          " release_check = the sampled re-check of the written stream):")
    for stage in ("decode", "detect", "deidentify", "stego", "encode", "release_check"):
        seconds = record.seconds.get(stage, 0.0)
        print(f"  {stage:<11} {seconds:6.2f} s  {100 * seconds / anon_s:5.1f} %")


if __name__ == "__main__":
    main()
