"""Reversal under real codecs: what is left of a public stream after someone re-encodes it.

The public module writes a lossless stream, but released footage gets re-encoded (upload
sites, editors, archives). Two things can break:

- the ROI payload, hidden in pixel LSBs: the design expects yuv420 to wipe it;
- the de-identified face itself, which U_d must still be able to invert.

`sweep` separates them. For every codec setting it re-encodes the public stream, decodes
it, and counts on how many frames `stego.extract` still authenticates the payload. Where
the payload is gone it falls back to the ROIs read from the lossless public stream
("oracle ROIs", i.e. what an authority would have if it kept the payload some other way),
so the face restoration is still measured. Both PSNRs are reported: over the frames whose
payload survived (what the private module would restore on its own), and over all frames
with the oracle ROIs (what U_d could restore at all).
"""
from __future__ import annotations

import math
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.datapath import stego
from tasks.datapath.decode import iter_frames, probe
from tasks.datapath.deidentify import FaceSwapper
from tasks.datapath.encode import ffmpeg_exe
from tasks.datapath.keys import DataKey
from tasks.datapath.track import Roi
from tasks.evaluation.metrics import ssim
from tasks.judges import SFaceJudge

_X264_420 = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "medium"]
# Name → ffmpeg output options. x264 yuv420p is what a re-encode in the wild looks like;
# CRF 0 is "lossless" in YUV, yet the RGB → YUV 4:2:0 conversion alone rounds the LSBs.
# ffv1 in bgr0 is bit-exact RGB: the lossless reference every other row is compared to.
CODEC_SETTINGS: dict[str, list[str]] = {
    **{f"x264-crf{crf}": [*_X264_420, "-crf", str(crf)] for crf in (0, 12, 18, 23, 28)},
    "ffv1": ["-c:v", "ffv1", "-level", "3", "-pix_fmt", "bgr0"],
}
_BATCH = 16
_REENCODE_TIMEOUT_S = 600


@dataclass
class SweepRow:
    """One codec setting: payload survival and restoration quality after the re-encode.

    psnr_roi_* are PSNRs (dB) of the restored ROIs against the source at frame resolution,
    pooled over all ROI pixels like `RestoreRecord.psnr_roi`; same_person_rate is the share
    of sampled (source crop, restored crop) pairs that SFace calls the same person.
    """

    setting: str
    payload_recovery: float  # share of frames whose payload still authenticates
    psnr_roi_payload: float  # over frames with a recovered payload; nan when there are none
    psnr_roi_oracle: float  # over all frames, ROIs from the lossless stream's payloads
    same_person_rate: float  # nan when no sampled frame holds a face
    ssim_roi: float  # mean SSIM of restored vs source ROIs on the sampled frames; nan when none
    frames: int
    seconds: float


def reencode(public_path: str | Path, out_path: str | Path, args: Sequence[str]) -> Path:
    """Re-encode the video track of `public_path` with ffmpeg output options `args` (Matroska).

    One input frame, one output frame (fps_mode passthrough), so frame indices, which the
    payloads are checked against, still line up. Written under a temporary name first.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp = out_path.with_name(f".{out_path.name}.partial.mkv")
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
           "-i", str(public_path), "-map", "0:v:0", "-fps_mode", "passthrough", *args,
           "-f", "matroska", str(temp)]
    result = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=_REENCODE_TIMEOUT_S)
    if result.returncode != 0:
        temp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg re-encode of {public_path} with {list(args)} failed: {result.stderr[-2000:]}")
    os.replace(temp, out_path)
    return out_path


def _decode_rgb(path: Path, width: int, height: int) -> Iterator[np.ndarray]:
    """Every frame of `path` as uint8 RGB, decoded in one sequential ffmpeg pass.

    Not `iter_frames`: it seeks per batch, which on x264's default 250-frame GOPs would
    decode most frames many times over. Memory stays at one frame.
    """
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
           "-map", "0:v:0", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:"]
    frame_bytes = width * height * 3
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        try:
            while chunk := proc.stdout.read(frame_bytes):
                if len(chunk) != frame_bytes:
                    raise RuntimeError(f"{path}: ffmpeg returned a partial frame")
                yield np.frombuffer(chunk, dtype=np.uint8).reshape(height, width, 3).copy()
        finally:
            # A consumer that stops early would otherwise wait for ffmpeg to finish decoding.
            proc.kill()


@dataclass
class _Reference:
    """What the lossless public stream and the source give once, for every setting."""

    video_id: str
    oracle_rois: list[list[Roi]]  # per frame, from the lossless stream's payloads
    source_crops: list[list[np.ndarray]]  # per frame, the source's pixels inside each oracle ROI


def _reference(public_path: Path, source_path: Path, key: DataKey) -> _Reference:
    video_id: str | None = None
    oracle_rois: list[list[Roi]] = []
    source_crops: list[list[np.ndarray]] = []
    public_batches = iter_frames(public_path, batch_size=_BATCH)
    # The source goes through decord, as in reconstruct_video, so the ffv1 row reproduces its PSNR.
    for (first, src_batch), (_, pub_batch) in zip(iter_frames(source_path, batch_size=_BATCH), public_batches):
        for i, (src, pub) in enumerate(zip(src_batch, pub_batch)):
            payload = stego.extract(pub, key.payload_key(), expected_frame_index=first + i,
                                    expected_video_id=video_id)
            video_id = payload.video_id
            rois = [Roi(first + i, r.seq_id, r.x, r.y, r.w, r.h, None, False) for r in payload.rois]
            oracle_rois.append(rois)
            source_crops.append([src[r.y : r.y + r.h, r.x : r.x + r.w].copy() for r in rois])
    if video_id is None:
        raise ValueError(f"{public_path}: no frames")
    return _Reference(video_id, oracle_rois, source_crops)


def _psnr(squared_error: float, pixels: int) -> float:
    if pixels == 0:
        return math.nan
    mse = squared_error / pixels
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _measure(name: str, path: Path, ref: _Reference, key: DataKey, swapper: FaceSwapper, width: int,
             height: int, sample_every: int, judge: SFaceJudge,
             source_embeddings: dict[tuple[int, int], np.ndarray]) -> SweepRow:
    """Extract, restore and score one re-encoded stream (timing is the caller's)."""
    noise_cache: dict[int, np.ndarray] = {}

    def noise_for(seq_id: int) -> np.ndarray:
        if seq_id not in noise_cache:
            noise_cache[seq_id] = key.noise(seq_id)
        return noise_cache[seq_id]

    payload_key = key.payload_key()
    frames = recovered = same = compared = 0
    ssims: list[float] = []
    error = {"payload": 0.0, "oracle": 0.0}
    pixels = {"payload": 0, "oracle": 0}
    for index, frame in enumerate(_decode_rgb(path, width, height)):
        if index >= len(ref.oracle_rois):
            raise RuntimeError(f"{name}: more frames than the public stream")
        try:
            payload = stego.extract(frame, payload_key, expected_frame_index=index, expected_video_id=ref.video_id)
            rois = [Roi(index, r.seq_id, r.x, r.y, r.w, r.h, None, False) for r in payload.rois]
            recovered += 1
            has_payload = True
        except stego.PayloadError:
            rois, has_payload = ref.oracle_rois[index], False
        # An authenticated payload names exactly the boxes the lossless stream does (same HMAC'd
        # message), so the oracle source crops below line up with `rois` either way.
        swapper.restore([frame], [rois], noise_for)
        for j, (r, original) in enumerate(zip(rois, ref.source_crops[index])):
            restored = frame[r.y : r.y + r.h, r.x : r.x + r.w]
            err = float(((restored.astype(np.float64) - original) ** 2).sum())
            for kind in ("oracle", "payload") if has_payload else ("oracle",):
                error[kind] += err
                pixels[kind] += restored.size
            if index % sample_every == 0:
                if (index, j) not in source_embeddings:
                    source_embeddings[index, j] = judge.embed(original).vector
                same += judge.same_person(source_embeddings[index, j], judge.embed(np.ascontiguousarray(restored)))
                compared += 1
                ssims.append(ssim(np.ascontiguousarray(restored), original))
        frames += 1
    if frames != len(ref.oracle_rois):
        raise RuntimeError(f"{name}: {frames} frames decoded, the public stream has {len(ref.oracle_rois)}")
    return SweepRow(
        setting=name,
        payload_recovery=recovered / frames,
        psnr_roi_payload=_psnr(error["payload"], pixels["payload"]),
        psnr_roi_oracle=_psnr(error["oracle"], pixels["oracle"]),
        same_person_rate=same / compared if compared else math.nan,
        ssim_roi=float(np.mean(ssims)) if ssims else math.nan,
        frames=frames,
        seconds=0.0,
    )


def sweep(
    public_path: str | Path,
    source_path: str | Path,
    key: DataKey,
    swapper: FaceSwapper,
    settings: Mapping[str, Sequence[str]] | None = None,
    sample_every: int = 4,
    judge: SFaceJudge | None = None,
) -> list[SweepRow]:
    """One `SweepRow` per codec setting (default: all of `CODEC_SETTINGS`), in the given order.

    `public_path` must be a lossless public stream (its payloads are the oracle ROIs) and `key`
    its data key;
    `source_path` is the video it was made from. SFace compares source and restored ROI
    crops on every `sample_every`-th frame only: it costs far more than restoring.
    Re-encoded files live in a temporary folder that is removed afterwards.
    """
    if sample_every < 1:
        raise ValueError(f"sample_every must be >= 1, got {sample_every}")
    settings = CODEC_SETTINGS if settings is None else settings
    judge = judge or SFaceJudge()
    public_path, source_path = Path(public_path), Path(source_path)
    info = probe(public_path)
    ref = _reference(public_path, source_path, key)
    source_embeddings: dict[tuple[int, int], np.ndarray] = {}  # shared: the source is the same for every row
    rows = []
    with tempfile.TemporaryDirectory(prefix="codec-sweep-") as tmp:
        for name, args in settings.items():
            start = time.perf_counter()
            encoded = reencode(public_path, Path(tmp) / f"{name}.mkv", args)
            row = _measure(name, encoded, ref, key, swapper, info.width, info.height, sample_every,
                           judge, source_embeddings)
            row.seconds = time.perf_counter() - start
            encoded.unlink()
            rows.append(row)
    return rows


def format_table(rows: Sequence[SweepRow]) -> str:
    """A Markdown table of the sweep, for reports."""
    lines = ["| setting | payload recovered | PSNR ROI (payload) dB | PSNR ROI (oracle) dB "
             "| SSIM ROI | SFace same person | frames | s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.setting} | {r.payload_recovery:.1%} | {r.psnr_roi_payload:.2f} | "
                     f"{r.psnr_roi_oracle:.2f} | {r.ssim_roi:.3f} | {r.same_person_rate:.1%} | {r.frames} | "
                     f"{r.seconds:.1f} |")
    return "\n".join(lines)
