"""Decoding a long video with one keyframe against the same video with a keyframe every 2 s.

    python -m bench.keyframes [VIDEO] [--seconds 300]

`iter_frames` flushes decord's decoder between batches to bound memory, and each flush
re-decodes from the previous keyframe: free when keyframes are close, quadratic when a
file has only one. Both clips are the bundled footage looped to the given length and
re-encoded with the ffmpeg we ship; each is decoded by the automatic choice, and the
single-keyframe one also by the decord path alone on its first `--decord-frames` frames
(the whole file would take hours), which shows what the automatic choice avoids.
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from bench.throughput import DEFAULT_CLIP
from tasks.datapath.decode import iter_frames, probe
from tasks.datapath.encode import ffmpeg_exe


def make_clip(source: Path, seconds: float, dest: Path, keyframe_every_s: float | None) -> None:
    gop = (["-x264-params", "keyint=infinite:min-keyint=infinite:scenecut=0"] if keyframe_every_s is None
           else ["-force_key_frames", f"expr:gte(t,n_forced*{keyframe_every_s})", "-sc_threshold", "0"])
    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-stream_loop", "-1", "-i", str(source), "-t", str(seconds),
                    "-an", "-c:v", "libx264", "-preset", "veryfast", *gop, str(dest)], check=True)


def decode_fps(path: Path, via: str, stop: int | None = None) -> tuple[int, float]:
    started = time.perf_counter()
    frames = sum(len(batch) for _, batch in iter_frames(path, batch_size=32, stop=stop, via=via))
    return frames, frames / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.keyframes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="?", default=str(DEFAULT_CLIP))
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--decord-frames", type=int, default=640)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        one_key, every_2s = Path(tmp) / "one_keyframe.mp4", Path(tmp) / "keyframe_every_2s.mp4"
        make_clip(Path(args.video), args.seconds, one_key, None)
        make_clip(Path(args.video), args.seconds, every_2s, 2.0)
        print(f"{probe(one_key).frame_count} frames, {args.seconds:.0f} s, {probe(one_key).width}x"
              f"{probe(one_key).height}")
        frames_2s, fps_2s = decode_fps(every_2s, "auto")
        frames_1k, fps_1k = decode_fps(one_key, "auto")
        frames_d, fps_d = decode_fps(one_key, "decord", stop=args.decord_frames)
    print(f"keyframe every 2 s, auto:      {frames_2s:6d} frames {fps_2s:7.1f} fps")
    print(f"one keyframe, auto:            {frames_1k:6d} frames {fps_1k:7.1f} fps")
    print(f"one keyframe, decord only:     {frames_d:6d} frames {fps_d:7.1f} fps (first frames only; "
          f"it slows further as the distance from the keyframe grows)")
    print(f"time ratio one keyframe / every 2 s (auto): {fps_2s / fps_1k:.2f} (bar: <= 2)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
