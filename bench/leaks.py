"""Does speed cost privacy? Faces left visible with and without the detection schedule, every frame judged.

    python -m bench.leaks [--every 1,4] [--frames 240] [--clips cuts.mp4,pan.mp4]

Runs the public module on clips made from the bundled footage with the ffmpeg we ship, once
per `--every` value (PipelineSettings.detect_every: 1 runs the detector on every frame, as
before the schedule), then judges EVERY frame of each public file the way the release check
does (tasks/datapath/release_check.py: our MTCNN on the whole frame and YuNet as the second
opinion, against the ROIs read back from the file's sealed data; SFace on each ROI against
the source). It prints, per clip and setting, the share of frames with a face outside every
ROI and with a recognisable identity, the share of frames the detector ran on, and fps.

The clips: the three bundled samples, and two made to stress a sparse schedule from the
Wolfgang clip: `cuts` (9 of every 23 frames black, so the face enters and leaves at every
phase of the stride) and `pan` (a 480x270 window swinging across the frame: the face moves
fast). Not a test: a benchmark of one machine and one day; compare the rows.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.throughput import SAMPLES
from tasks.datapath.anonymize import anonymize_video, read_back_rois
from tasks.datapath.decode import probe
from tasks.datapath.deidentify import FaceSwapper, load_pipeline_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.encode import ffmpeg_exe
from tasks.datapath.keys import DataKey, generate_key_pair, parse_private_key
from tasks.datapath.release_check import check_public_stream, listed_rois
from tasks.datapath.video_loop import PipelineSettings
from tasks.judges import SFaceJudge

WOLFGANG = SAMPLES / "WolfgangLanger_Pexels.mp4"


def make_clips(folder: Path, frames: int) -> list[Path]:
    clips = []
    for source in sorted(SAMPLES.glob("*.mp4")):
        clips.append(folder / source.name)
        shutil.copy(source, clips[-1])
    made = {
        "cuts.mp4": "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='lt(mod(n,23),9)'",
        "pan.mp4": "crop=480:270:x='80+80*sin(n/6)':y='45+40*cos(n/9)'",
    }
    for name, vf in made.items():
        clips.append(folder / name)
        subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(WOLFGANG), "-frames:v", str(frames), "-vf", vf,
                        "-c:v", "libx264", "-crf", "18", "-an", str(clips[-1])], check=True)
    return clips


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.leaks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", default="1,4", help="detect_every values to compare, comma-separated")
    p.add_argument("--frames", type=int, default=240, help="length of the made clips")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clips", help="only these clips, comma-separated names (e.g. cuts.mp4,pan.mp4)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    detector = FaceDetector()
    judge = SFaceJudge()
    authority = parse_private_key(generate_key_pair()[0])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(Path(tmp), args.frames)
        if args.clips:
            clips = [c for c in clips if c.name in args.clips.split(",")]
        for every in (int(v) for v in args.every.split(",")):
            settings = PipelineSettings(detect_every=every)
            swapper = FaceSwapper(load_pipeline_pair(settings.model, settings.weights, settings.seal))
            for clip in clips:
                public, video_id, data_key = Path(tmp) / f"{clip.stem}-{every}.mkv", "0" * 64, DataKey.generate()
                started = time.perf_counter()
                record = anonymize_video(clip, public, recipients=[authority.public], video_id=video_id,
                                         detector=detector, swapper=swapper, settings=settings, run_id="bench",
                                         progress=False, judge=judge, data_key=data_key)
                seconds = time.perf_counter() - started
                every_frame = list(range(probe(public).frame_count))
                rois = read_back_rois(public, video_id, data_key, every_frame)
                verdict = check_public_stream(public, clip, listed_rois(rois), detector, judge=judge,
                                              frames=every_frame)
                n = len(every_frame)
                rows.append((clip.name, n, every, record.frames_detected / n, record.frame_count / seconds,
                             len(verdict.face_outside_frames), len(verdict.identity_match_frames)))
                print(f"{clip.name} every {every}: {rows[-1][5]} of {n} frames with a face outside the ROIs, "
                      f"{rows[-1][6]} with the identity kept", flush=True)
    print("| clip | frames | detect every | frames detected | anonymize fps | face outside ROIs | identity kept |")
    print("|---|---|---|---|---|---|---|")
    for name, n, every, detected, fps, outside, kept in rows:
        print(f"| {name} | {n} | {every} | {100 * detected:.0f} % | {fps:.1f} | {outside} ({100 * outside / n:.1f} %) "
              f"| {kept} ({100 * kept / n:.1f} %) |")
    for every in sorted({r[2] for r in rows}):
        mine = [r for r in rows if r[2] == every]
        frames = sum(r[1] for r in mine)
        print(f"every {every}: face outside ROIs in {sum(r[5] for r in mine)} of {frames} frames, "
              f"identity kept in {sum(r[6] for r in mine)}; detector on {sum(r[3] * r[1] for r in mine):.0f} frames")


if __name__ == "__main__":
    main()
