"""Batched detection and de-identification of 720p frames on one device, with torch and numpy alone.

    python -m bench.gpu export DIR                         # here: frames and MTCNN's weights into DIR
    python -m bench.gpu run DIR [--device cuda] [--batch 16] [--seconds 20]

`export` (this project's environment) writes 16 frames of the bundled Wolfgang clip scaled to
1280x720 (`frames.npy`, 44 MB: small enough to carry to a machine without our decoders) and
MTCNN's weights as a torch state dict (`mtcnn.pt`; the `mtcnn` package keeps them as joblib
pickles that need lz4). `run` needs nothing but torch, numpy and this repository (`models/`,
`tasks/datapath/deidentify.py`, `track.py` and the bundled U_e): on any CUDA machine it loops the
frames through

- upload (pinned host memory → device), MTCNN on the batch (the detector of the data path, its
  pyramid by torch), a head ROI per face (`track.head_roi`),
- U_e on every face of the batch in one call (crop → 64x64 → U_e(x ⊕ noise) → resize → blended
  over the face region, as `deidentify.paste_faces` does, but on the device), download (into
  page-locked memory),

and prints frames per second for detection alone, de-identification alone (on the boxes
detection found) and both. The issue's goal: >= 300 fps at 720p on one GPU. Tracking, sealing,
encoding and the release check are not in it: they run on the CPU beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.mtcnn import MTCNN, area_pyramid
from models.unet import FACE_SIZE
from tasks.datapath.deidentify import load_pipeline_pair
from tasks.datapath.track import face_region, head_roi

SIZE = (1280, 720)


def export(folder: Path, frames: int) -> None:
    import cv2

    from bench.throughput import SAMPLES
    from tasks.datapath.decode import read_frames
    from tasks.datapath.detect import load_mtcnn

    folder.mkdir(parents=True, exist_ok=True)
    clip = read_frames(SAMPLES / "WolfgangLanger_Pexels.mp4", range(0, 8 * frames, 8))
    np.save(folder / "frames.npy", np.stack([cv2.resize(f, SIZE, interpolation=cv2.INTER_AREA) for f in clip]))
    torch.save(load_mtcnn("cpu").state_dict(), folder / "mtcnn.pt")
    print(f"wrote {folder / 'frames.npy'} ({frames} frames {SIZE[0]}x{SIZE[1]}) and {folder / 'mtcnn.pt'}")


def _deidentify(frames: torch.Tensor, boxes: list[torch.Tensor], encoder: torch.nn.Module,
                weights: dict[tuple[int, int], torch.Tensor]) -> int:
    """Replace every face of the (N, H, W, 3) uint8 device batch in place; returns the faces done."""
    height, width = frames.shape[1:3]
    # One download of the batch's boxes: a .cpu() per face is a device sync per face.
    host_boxes = [found.cpu().numpy() for found in boxes] if boxes else []
    rois = [(i, *head_roi(box, width, height)) for i, found in enumerate(host_boxes) for box in found]
    if not rois:
        return 0
    crops = torch.cat([F.interpolate(frames[i, y:y + h, x:x + w].permute(2, 0, 1)[None].float().div(255),
                                     size=(FACE_SIZE, FACE_SIZE), mode="bilinear", antialias=True)
                       for i, x, y, w, h in rois])
    noise = torch.rand((len(rois), 1, FACE_SIZE, FACE_SIZE), device=frames.device)
    faces = encoder(crops, noise)
    for face, (i, x, y, w, h) in zip(faces, rois):
        resized = F.interpolate(face[None], size=(h, w), mode="bilinear", antialias=True)[0].permute(1, 2, 0)
        if (w, h) not in weights:
            weights[(w, h)] = torch.from_numpy(face_region(w, h).copy()).to(frames.device)[..., None]
        target = frames[i, y:y + h, x:x + w]
        target.copy_(torch.lerp(target.float(), resized.mul(255), weights[(w, h)]).round().clamp(0, 255).byte())
    return len(rois)


def run(folder: Path, device: str, batch: int, seconds: float, min_face: int = 20,
        profile: Path | None = None) -> dict:
    device_ = torch.device(device)
    host = torch.from_numpy(np.load(folder / "frames.npy"))
    batches = [host[(k * batch + np.arange(batch)) % len(host)] for k in range(-(-len(host) // batch))]
    # The frames go back to the CPU encoder: into page-locked memory, as a data path on a GPU
    # would (a download into ordinary memory ran at 1.3 GB/s on an H200 and took 70 % of the time).
    returned = torch.empty_like(batches[0])
    if device_.type == "cuda":
        batches = [b.pin_memory() for b in batches]  # what lets the upload overlap
        returned = returned.pin_memory()
    detector = MTCNN(min_face_size=min_face, pyramid=area_pyramid)
    detector.load_state_dict(torch.load(folder / "mtcnn.pt", map_location="cpu", weights_only=True))
    detector = detector.eval().to(device_)
    encoder = load_pipeline_pair("uunet", None, "high", device_).encoder
    weights: dict[tuple[int, int], torch.Tensor] = {}

    def sync() -> None:
        if device_.type == "cuda":
            torch.cuda.synchronize()

    def timed(step) -> tuple[float, int]:
        """Frames per second of `step(batch index)` over at least `seconds`, after one warm-up pass."""
        for k in range(min(2, len(batches))):
            step(k)
        sync()
        done, start, k = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds or done == 0:
            step(k % len(batches))
            done += batch
            k += 1
        sync()
        return done / (time.perf_counter() - start), done

    with torch.inference_mode():
        found = [detector.detect(b.to(device_, copy=True)) for b in batches]
        faces = sum(len(f) for boxes in found for f in boxes)
        detect_fps, _ = timed(lambda k: detector.detect(batches[k].to(device_, non_blocking=True, copy=True)))
        deid_fps, _ = timed(lambda k: _deidentify(batches[k].to(device_, non_blocking=True, copy=True), found[k],
                                                  encoder, weights))

        def both(k: int) -> None:
            frames = batches[k].to(device_, non_blocking=True, copy=True)
            _deidentify(frames, detector.detect(frames), encoder, weights)
            returned.copy_(frames)

        both_fps, frames_done = timed(both)
        if profile is not None:
            _profile(both, len(batches), device_, profile)
    name = torch.cuda.get_device_name(device_) if device_.type == "cuda" else "cpu"
    return {"device": name, "batch": batch, "min_face": min_face, "size": f"{host.shape[2]}x{host.shape[1]}",
            "faces_per_frame": faces / (len(batches) * batch), "detect_fps": detect_fps,
            "deidentify_fps": deid_fps, "detect_and_deidentify_fps": both_fps, "frames": frames_done}


def _profile(step, batches: int, device: torch.device, path: Path) -> None:
    """Where a batch's time goes: torch.profiler's table over a few batches (kernels and host ops)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for k in range(4):
            step(k % batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40)
                    + "\n\nby host time\n" + prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_export = sub.add_parser("export", help="frames and MTCNN's weights into DIR")
    p_export.add_argument("dir", type=Path)
    p_export.add_argument("--frames", type=int, default=16)
    p_run = sub.add_parser("run", help="time detection and de-identification (torch and numpy alone)")
    p_run.add_argument("dir", type=Path)
    p_run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p_run.add_argument("--batch", type=int, default=16)
    p_run.add_argument("--seconds", type=float, default=20.0, help="at least this long per measure")
    p_run.add_argument("--min-face", type=int, default=20, help="MTCNN's smallest face in pixels (the data path's 20)")
    p_run.add_argument("--profile", type=Path, help="write torch.profiler's table of a few batches here")
    p_run.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.dir, args.frames)
        return 0
    result = run(args.dir, args.device, args.batch, args.seconds, args.min_face, args.profile)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"{result['device']}: {result['detect_and_deidentify_fps']:.1f} fps at {result['size']} "
          f"(detection {result['detect_fps']:.1f}, de-identification {result['deidentify_fps']:.1f}); "
          "the issue's goal: >= 300 fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
