"""One long video on 1 worker, on 2 workers (split at keyframes), and on 2 Ray nodes.

    python -m bench.split [--loops 6] [--skip-nodes]

The clip is the bundled Wolfgang clip looped `--loops` times without re-encoding (6: 2832
frames, 1 min 58 s, a keyframe every 72 frames). Each run is `python -m flows.anonymize` as
a user runs it, start-up included, into a fresh output folder:

1. `--workers 1` (one worker, so the video runs whole);
2. `--workers 2` (split into two segments, run at once);
3. `--workers 2 --ray-address` against two Ray nodes started on this machine
   (`ray start --head --num-cpus 1`, then `ray start --address ... --num-cpus 1`), so each
   segment runs on its own node.

It prints each run's seconds and the ratios 1 worker / 2 workers (the issue's bar: >= 1.7
on this machine) and 1 worker / 2 nodes. Not a test: compare the ratios, not the seconds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.throughput import SAMPLES
from tasks.datapath.decode import probe
from tasks.datapath.encode import ffmpeg_exe
from tasks.datapath.keys import write_key_pair

ROOT = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"


def make_clip(folder: Path, loops: int) -> Path:
    folder.mkdir(parents=True)
    clip = folder / "wolfgang_long.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-stream_loop", str(loops - 1), "-i",
                    str(SAMPLES / "WolfgangLanger_Pexels.mp4"), "-c", "copy", str(clip)], check=True)
    return clip


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def anonymize(archive: Path, out: Path, key: Path, *extra: str) -> tuple[float, float]:
    """(seconds, cores kept busy on average) of one whole `python -m flows.anonymize` process;
    its log goes to OUT.log. Busy cores are the machine's: run nothing else beside it."""
    start, (busy0, total0) = time.perf_counter(), cpu_ticks()
    with open(f"{out}.log", "w") as log:
        result = subprocess.run([sys.executable, "-m", "flows.anonymize", str(archive), str(out),
                                 "--public-key", str(key), *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds, (busy1, total1) = time.perf_counter() - start, cpu_ticks()
    if result.returncode != 0:
        raise SystemExit(f"anonymize {' '.join(extra)} exited {result.returncode}; see {out}.log")
    return seconds, (os.cpu_count() or 1) * (busy1 - busy0) / max(total1 - total0, 1)


def two_nodes(temp: Path, port: int = 6391) -> str:
    """Start a head node and a second node on this machine, one CPU each; returns the address."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    address = f"127.0.0.1:{port}"
    subprocess.run([str(RAY), "start", "--head", "--num-cpus", "1", "--port", str(port), "--node-ip-address",
                    "127.0.0.1", "--include-dashboard", "false", "--temp-dir", str(temp / "ray")],
                   check=True, env=env, capture_output=True)
    subprocess.run([str(RAY), "start", "--address", address, "--num-cpus", "1", "--node-ip-address", "127.0.0.1"],
                   check=True, env=env, capture_output=True)
    return address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=6)
    parser.add_argument("--skip-nodes", action="store_true", help="leave out the two-node run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-split-") as name:
        temp = Path(name)
        clip = make_clip(temp / "archive", args.loops)
        frames = probe(clip).frame_count
        key = temp / "authority.pub"
        write_key_pair(temp / "authority.key", key)
        print(f"{clip.name}: {frames} frames; each run is the whole process, start-up included", flush=True)
        cores = os.cpu_count() or 1
        one, busy = anonymize(clip.parent, temp / "one", key, "--workers", "1")
        # One worker's encoders and seal encoder (ffmpeg, x264 threads) already use part of the
        # other core: splitting can gain at most cores / busy.
        print(f"1 worker:  {one:7.1f} s  {frames / one:5.2f} fps  {busy:.2f} of {cores} cores busy "
              f"(so at most {cores / busy:.2f}x from more workers)", flush=True)
        two, busy = anonymize(clip.parent, temp / "two", key, "--workers", "2")
        print(f"2 workers: {two:7.1f} s  {frames / two:5.2f} fps  {busy:.2f} of {cores} cores busy  "
              f"1 worker / 2 workers = {one / two:.2f} (bar: >= 1.7)", flush=True)
        if not args.skip_nodes:
            try:
                address = two_nodes(temp)
                nodes, busy = anonymize(clip.parent, temp / "nodes", key, "--workers", "2", "--ray-address",
                                        address)
                print(f"2 nodes:   {nodes:7.1f} s  {frames / nodes:5.2f} fps  {busy:.2f} of {cores} cores busy  "
                      f"1 worker / 2 nodes = {one / nodes:.2f}", flush=True)
            finally:
                subprocess.run([str(RAY), "stop", "--force"], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
