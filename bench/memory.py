"""Peak memory of the public module on a clip and on the same clip looped N times.

    python -m bench.memory [VIDEO] [--repeat 10]

Streaming means peak RSS must not grow with video length: the brief's bar is at most
+20% for a clip ten times longer. Each run is a fresh process (peak RSS is per process);
the long clip is the short one concatenated with ffmpeg's concat demuxer (stream copy).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.throughput import DEFAULT_CLIP
from tasks.datapath.encode import ffmpeg_exe

CHILD = """
import json, sys, time, torch
torch.set_num_threads(1)
from tasks.datapath.deidentify import FaceSwapper, load_pipeline_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import generate_key_pair, parse_public_key
from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.video_loop import PipelineSettings
settings = PipelineSettings()
authority = parse_public_key(generate_key_pair()[1])
record = anonymize_video(sys.argv[1], sys.argv[2], recipients=[authority], video_id="0" * 64,
                         detector=FaceDetector(batch_size=settings.batch_size),
                         swapper=FaceSwapper(load_pipeline_pair(settings.model, None, settings.seal)), settings=settings,
                         run_id="bench", progress=False)
# VmHWM is this process's own peak; ru_maxrss would start from the parent's (Linux keeps it across exec).
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"frames": record.frame_count, "seconds": record.seconds["total"], "peak_rss_mb": peak_kb / 1024}))
"""


def measure(video: Path, output: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(video), str(output)], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("video", nargs="?", default=str(DEFAULT_CLIP))
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        listing = tmp / "list.txt"
        listing.write_text(f"file '{Path(args.video).resolve()}'\n" * args.repeat)
        long_clip = tmp / f"long{Path(args.video).suffix}"
        subprocess.run([ffmpeg_exe(), "-v", "error", "-f", "concat", "-safe", "0", "-i", str(listing),
                        "-c", "copy", str(long_clip)], check=True)
        short = measure(Path(args.video), tmp / "short.mkv")
        long = measure(long_clip, tmp / "long.mkv")
    for name, r in (("clip", short), (f"clip x{args.repeat}", long)):
        print(f"{name:<10} {r['frames']:6d} frames  {r['frames'] / r['seconds']:6.1f} fps  "
              f"peak RSS {r['peak_rss_mb']:7.1f} MB")
    growth = 100 * (long["peak_rss_mb"] / short["peak_rss_mb"] - 1)
    print(f"peak RSS growth for a {long['frames'] / short['frames']:.0f}x longer clip: {growth:+.1f}% (bar: <= +20%)")


if __name__ == "__main__":
    main()
