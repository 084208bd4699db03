"""Seal stage: every sequence's original ROI pixels, compressed and encrypted for the authorities.

The public module adds each frame's ROIs here before it de-identifies them; the private
module pastes them back, exactly (`exact`) or within 42 dB (`high`), at source resolution.
The sealed file travels as an attachment of the public file (`encode.attach`).

Layout of a sealed file:

    b"UUSEAL1\\n"
    u32 n | header JSON, plaintext: format, video id, quality, the key envelope
    records, each:  u32 n | record header JSON | u32 n | 12-byte nonce | AES-256-GCM ciphertext

Record kinds, all encrypted with the video's seal key (`keys.DataKey.seal_key`):
- `rois`: the ROI lists of a block of frames (the only copy for lossy public formats);
- `crops`: one chunk of one sequence: the crops of up to CHUNK_FRAMES frames on a canvas
  that spans their boxes, each crop where it was in the frame and the canvas holding the
  previous pixels around it (so the stream sees a steady picture with a moving face, which
  H.264 predicts well), encoded as a small H.264 stream (4:4:4 tuned for PSNR, re-encoded
  finer until the chunk's ROI pixels are within 42 dB; lossless RGB for `exact`), with
  each frame's box;
- `manifest`, last: every record written and the header's hash. Without it the file was
  cut short; a record it lists that is not found was removed.
A record's header (kind, sequence, index, frame span) is the cipher's associated data,
together with the format and the video id: a record altered, swapped between sequences or
chunks, or moved from another video fails authentication and is counted, and every other
record still restores.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tasks.datapath.encode import ffmpeg_exe
from tasks.datapath.keys import DataKey, WrappedKey, envelope_from_bytes, envelope_to_bytes
from tasks.datapath.track import Roi

MAGIC = b"UUSEAL1\n"
FORMAT = "uunet-seal/1"
QUALITIES = ("high", "exact", "none")
CHUNK_FRAMES = 128  # crops per chunk: one ffmpeg run per chunk, bounded memory per live sequence
# Canvas bytes per chunk: large faces end chunks early. 24 MB cut the Wolfgang clip's 400 px
# faces into 55-frame chunks, and their keyframes cost a fifth of the sealed bytes (2.86 MB
# against 2.26 MB at 64 MB).
CHUNK_MAX_BYTES = 64 * 1024 * 1024
ROI_BLOCK_FRAMES = 256
# Chunks encoded in the background while the caller detects and de-identifies; at most this
# many wait, so memory stays bounded when encoding falls behind.
MAX_PENDING_CHUNKS = 2
HIGH_MIN_PSNR_DB = 42.0
# `high`: x264's CRF is a float, and a chunk's ROI PSNR falls about HIGH_DB_PER_CRF dB per CRF
# unit at these rates (bundled Wolfgang clip, faces ~400 px: CRF 18 42.4 dB / 2.24 MB, CRF 20
# 41.2 dB / 1.74 MB). So each chunk aims at HIGH_MIN_PSNR_DB + HIGH_AIM_MARGIN_DB: it is
# encoded at the CRF its sequence's last chunk predicts (the video's first at HIGH_FIRST_CRF),
# measured, and re-encoded at a corrected CRF while it misses its floor. The promise is the
# video's: ROI PSNR pooled over every sealed pixel of the video at least HIGH_MIN_PSNR_DB. So a
# chunk's floor is what keeps the pooled error of the chunks sealed so far within that promise,
# never below HIGH_CHUNK_FLOOR_DB: the surplus of one chunk pays for a small miss of the next
# instead of an encode. Each encode of a 400 px face chunk costs about 4 CPU-seconds beside the
# detector, and each 0.1 dB of overshoot about 1.5 % of its bytes; consecutive chunks differ by
# up to 0.5 dB at one CRF. Measured on the bundled clips' chunks: a floor of 42 dB for every
# chunk, aiming 0.06 dB over and retrying passes 0.25 dB over the aim, took 8 encodes for the
# Wolfgang clip's 4 chunks (14 for the 3 clips); this floor, aim and retry take 5 (9) for the
# same sealed bytes, pooled 42.1-42.7 dB per clip. Below HIGH_MIN_CRF,
# or after HIGH_MAX_TRIES encodes, the chunk is sealed lossless instead. `-tune psnr` saved a
# quarter of the bits at equal PSNR; 10-bit beat 8-bit (CRF 18: 42.6 dB / 2.23 MB against
# 42.0 dB / 2.25 MB); 4:2:0 lost 2 dB to chroma; x265 and libaom AV1 (4x slower) were no
# smaller at equal PSNR; chroma QP offsets moved sizes by under 4 %.
HIGH_FIRST_CRF = 18.0
HIGH_DB_PER_CRF = 0.6
HIGH_AIM_MARGIN_DB = 0.2
HIGH_CHUNK_FLOOR_DB = 41.5  # a surplus may not buy a stretch of faces far under the promise
HIGH_MIN_CRF = 6.0
HIGH_MAX_CRF = 30.0
HIGH_MAX_TRIES = 6
HIGH_RETRY_OVERSHOOT_DB = 0.7  # about 1.2 CRF, 10 % of a chunk's bytes: worth one more encode
_MIN_SIDE = 16  # x264 wants at least one macroblock
_LENGTH = 4
_MAX_HEADER = 16 * 1024 * 1024
# x264 presets: `medium` encodes the small crop streams well below the pipeline's own speed.
# Its B-frame placement (`b-adapt=1`) is the one setting that costs here: `b-adapt=2` sealed
# the Wolfgang clip's faces in 1.75 MB instead of 2.08 MB at 42.05 dB, for 7 % more time
# (preset `slower`, which has it too: 1.67 MB, twice the time).
_CROP_CODECS = {
    "yuv444": ["-c:v", "libx264", "-preset", "medium", "-tune", "psnr", "-pix_fmt", "yuv444p10le",
               "-x264-params", "b-adapt=2"],
    "rgb-lossless": ["-c:v", "libx264rgb", "-preset", "medium", "-qp", "0", "-pix_fmt", "rgb24"],
}


class SealError(Exception):
    """A sealed file that cannot be read at all (not one, or a header that is damaged)."""


def _roi(frame_index: int, seq_id: int, x: int, y: int, w: int, h: int) -> Roi:
    """A sealed box as the tracker's Roi (no detector score: it was sealed, not detected)."""
    return Roi(int(frame_index), int(seq_id), int(x), int(y), int(w), int(h), None, False)


def _u32(n: int) -> bytes:
    return n.to_bytes(_LENGTH, "big")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("ascii")


def _aad(video_id: str, record_header: bytes) -> bytes:
    return FORMAT.encode() + b"\x00" + video_id.encode("ascii") + b"\x00" + record_header


def _sealed_record(aes: AESGCM, video_id: str, header: dict[str, Any], plaintext: bytes) -> bytes:
    """One record as it lies in the file: its header, then a fresh nonce and the ciphertext."""
    header_bytes = _canonical(header)
    nonce = secrets.token_bytes(12)
    body = nonce + aes.encrypt(nonce, plaintext, _aad(video_id, header_bytes))
    return _u32(len(header_bytes)) + header_bytes + _u32(len(body)) + body


def _ffmpeg_failed(stderr: bytes) -> SealError:
    return SealError(f"ffmpeg failed on a crop chunk: {stderr.decode(errors='replace').strip()[-1000:]}")


def _run_ffmpeg(args: list[str], data: bytes | memoryview) -> bytes:
    result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", *args],
                            input=data, capture_output=True)
    if result.returncode != 0:
        raise _ffmpeg_failed(result.stderr)
    return result.stdout


def encode_crops(frames: np.ndarray, codec: str, crf: float | None = None) -> bytes:
    """(n, H, W, 3) uint8 RGB → an H.264 elementary stream."""
    n, height, width, _ = frames.shape
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", "25", "-i", "pipe:0",
            *_CROP_CODECS[codec], *(["-crf", str(crf)] if crf is not None else []), "-f", "h264", "pipe:1"]
    # A flat view, not .tobytes(): a chunk's canvases are tens of MB, and a copy would double them.
    return _run_ffmpeg(args, memoryview(np.ascontiguousarray(frames)).cast("B"))


def decode_crops(stream: bytes, width: int, height: int, count: int) -> np.ndarray:
    """An H.264 stream of `count` frames → (count, height, width, 3) uint8 RGB, read straight into one array
    (collecting ffmpeg's output and joining it would hold the chunk twice)."""
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    process = subprocess.Popen([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "h264",
                                "-i", "pipe:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None

    def feed() -> None:
        try:
            process.stdin.write(stream)
        except BrokenPipeError:
            pass  # ffmpeg stopped early; its exit status and stderr say why
        finally:
            process.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    view, filled = memoryview(frames).cast("B"), 0
    while filled < len(view):
        got = process.stdout.readinto(view[filled:])
        if not got:
            break
        filled += got
    # Drain whatever comes beyond the expected frames: left in the pipe, it would block ffmpeg.
    extra = b""
    while block := process.stdout.read(1 << 16):
        extra = extra or block[:1]
    feeder.join()
    stderr = process.stderr.read()  # small: errors only
    if process.wait() != 0:
        raise _ffmpeg_failed(stderr)
    if filled != len(view) or extra:
        decoded = (filled + len(extra)) // max(1, height * width * 3)
        raise SealError(f"a crop chunk decoded to {decoded}{'+' if extra else ''} frames, expected {count}")
    return frames


def _canvases(boxes: Sequence[tuple[int, int, int, int, int]], crops: Sequence[np.ndarray],
              origin: tuple[int, int], width: int, height: int) -> np.ndarray:
    """(n, height, width, 3): crop t pasted at its place over canvas t-1 (the first filled with its mean colour)."""
    x0, y0 = origin
    frames = np.empty((len(crops), height, width, 3), dtype=np.uint8)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = crops[0].reshape(-1, 3).mean(axis=0).astype(np.uint8)
    for t, ((_, x, y, w, h), crop) in enumerate(zip(boxes, crops)):
        canvas[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = crop
        frames[t] = canvas
    return frames


def _crop_back(canvas: np.ndarray, box: tuple[int, int, int, int, int], origin: tuple[int, int]) -> np.ndarray:
    _, x, y, w, h = box
    return canvas[y - origin[1] : y - origin[1] + h, x - origin[0] : x - origin[0] + w]


def _mse(psnr_db: float) -> float:
    return 255.0**2 / 10 ** (psnr_db / 10)


def _psnr(mse: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _pooled_psnr(originals: np.ndarray, decoded: np.ndarray,
                 boxes: Sequence[tuple[int, int, int, int, int]], origin: tuple[int, int]) -> float:
    """PSNR (dB) over every ROI pixel of a chunk, canvases as encoded against canvases as decoded."""
    squared, pixels = 0.0, 0
    for original, canvas, box in zip(originals, decoded, boxes):
        # float32 and a BLAS dot product: a fifth of float64's time here, the same sum to the unit.
        diff = np.subtract(_crop_back(canvas, box, origin), _crop_back(original, box, origin), dtype=np.float32)
        diff = diff.ravel()
        squared, pixels = squared + float(np.dot(diff, diff)), pixels + diff.size
    return _psnr(squared / max(pixels, 1))


def _grow(span: tuple[int, int, int, int] | None, box: tuple[int, int, int, int, int]) -> tuple[int, int, int, int]:
    """`span` (x0, y0, x1, y1) grown to take in one (frame, x, y, w, h) box."""
    _, x, y, w, h = box
    if span is None:
        return x, y, x + w, y + h
    return min(span[0], x), min(span[1], y), max(span[2], x + w), max(span[3], y + h)


def _quarter(crf: float) -> float:
    """CRF rounded down to a quarter: fewer distinct values, and never aimed coarser than predicted."""
    return math.floor(crf * 4) / 4


def _aim_crf(encode: Callable[[float], bytes], measure: Callable[[bytes], float],
             last: tuple[float, float] | None,
             floor: float = HIGH_MIN_PSNR_DB) -> tuple[float, float, bytes] | None:
    """(CRF, pooled ROI PSNR, stream) of the coarsest tried CRF whose PSNR reaches `floor`.

    `last` is the (CRF, PSNR) of the sequence's previous chunk: the first try corrects its
    CRF by the PSNR it missed or overshot the aim by, at HIGH_DB_PER_CRF. Later tries
    interpolate between the coarsest passing and the finest failing CRF so far,
    until a pass overshoots the aim by less than HIGH_RETRY_OVERSHOOT_DB. None: no CRF down
    to HIGH_MIN_CRF got there within HIGH_MAX_TRIES encodes.
    """
    aim = HIGH_MIN_PSNR_DB + HIGH_AIM_MARGIN_DB
    crf = HIGH_FIRST_CRF if last is None else last[0] + (last[1] - aim) / HIGH_DB_PER_CRF
    crf = _quarter(min(HIGH_MAX_CRF, max(HIGH_MIN_CRF, crf)))
    passed: tuple[float, float, bytes] | None = None  # the coarsest CRF that reached the minimum
    failed: tuple[float, float] | None = None  # the finest CRF that did not
    for _ in range(HIGH_MAX_TRIES):
        stream = encode(crf)
        psnr = measure(stream)
        if psnr >= floor:
            if passed is None or crf > passed[0]:
                passed = (crf, psnr, stream)
        elif failed is None or crf < failed[0]:
            failed = (crf, psnr)
        if passed is not None and passed[1] - aim < HIGH_RETRY_OVERSHOOT_DB:
            return passed
        if passed is not None and failed is not None:
            # PSNR is near linear in CRF between two close tries: interpolate to the aim.
            (c0, p0, _), (c1, p1) = passed, failed
            crf = _quarter(c0 + (c1 - c0) * (p0 - aim) / max(p0 - p1, 1e-6))
            if not c0 < crf < c1:
                return passed
        elif passed is not None:
            crf = _quarter(passed[0] + (passed[1] - aim) / HIGH_DB_PER_CRF)
            if crf > HIGH_MAX_CRF:
                return passed
        else:
            # Finer by what was missed, and by at least a quarter so the search always moves.
            crf = min(crf - 0.25, _quarter(crf - (aim - psnr) / HIGH_DB_PER_CRF))
            if crf < HIGH_MIN_CRF:
                return None
    return passed


@dataclass
class _OpenChunk:
    index: int
    boxes: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # frame, x, y, w, h
    crops: list[np.ndarray] = field(default_factory=list)
    span: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 of the boxes so far, grown as they come

    def add(self, box: tuple[int, int, int, int, int], crop: np.ndarray) -> None:
        self.boxes.append(box)
        self.crops.append(crop)
        self.span = _grow(self.span, box)

    def canvas_bytes(self, extra: tuple[int, int, int, int, int]) -> int:
        """What the chunk's canvases will take once stacked, with `extra` added."""
        x0, y0, x1, y1 = _grow(self.span, extra)
        return (x1 - x0 + 1) * (y1 - y0 + 1) * 3 * (len(self.boxes) + 1)


@dataclass
class SealStats:
    records: int = 0
    crop_chunks: int = 0
    bytes: int = 0
    crop_bytes: int = 0
    min_psnr_db: float = math.inf  # `high`: the worst chunk's pooled ROI PSNR, measured when sealing
    roi_values: int = 0  # sealed ROI samples (pixels x 3) so far
    roi_squared_error: float = 0.0  # their summed squared error, as measured when sealing

    @property
    def psnr_db(self) -> float:
        """ROI PSNR pooled over every sealed pixel so far (inf: all lossless, or none)."""
        return _psnr(self.roi_squared_error / max(self.roi_values, 1))

    def chunk_floor_db(self, values: int) -> float:
        """The PSNR a next chunk of `values` samples needs for the pooled PSNR to stay at HIGH_MIN_PSNR_DB."""
        allowed = _mse(HIGH_MIN_PSNR_DB) * (self.roi_values + values) - self.roi_squared_error
        return max(HIGH_CHUNK_FLOOR_DB, _psnr(allowed / values))


class SealWriter:
    """Streams one video's sealed file: `add` every frame in order (before de-identifying it), then `close`."""

    def __init__(self, path: str | Path, video_id: str, data_key: DataKey, envelope: Sequence[WrappedKey],
                 quality: str = "high", chunk_frames: int = CHUNK_FRAMES, index_base: int = 0) -> None:
        """`index_base`: where this writer's record indices start. A split video's segments are sealed
        by separate writers and merged (`merge_sealed`); distinct bases keep their records apart."""
        if quality not in QUALITIES:
            raise ValueError(f"unknown seal quality {quality!r}; choose one of {QUALITIES}")
        self.path, self.video_id, self.quality = Path(path), video_id, quality
        self.chunk_frames = chunk_frames
        self._aes = AESGCM(data_key.seal_key())
        self._file: BinaryIO = open(self.path, "wb")
        self._written: list[list[Any]] = []
        self._open: dict[int, _OpenChunk] = {}
        self._next_index: dict[int, int] = {}
        self._roi_block: list[list[Any]] = []
        self._roi_block_first: int | None = None
        self._roi_blocks = index_base
        self._index_base = index_base
        self._last_frame = -1
        # `high`: per sequence, the (CRF, PSNR) of its last chunk, which aims the next one.
        self._last_crf: dict[int, tuple[float, float]] = {}
        self._video_last_crf: tuple[float, float] | None = None
        # One ffmpeg at a time beside the caller's work; chunks are written in the order they were cut.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seal")
        self._pending: collections.deque[Future] = collections.deque()
        self.stats = SealStats()
        header = _canonical({"format": FORMAT, "video_id": video_id, "quality": quality,
                             "envelope": json.loads(envelope_to_bytes(envelope))})
        self._header_sha256 = hashlib.sha256(header).hexdigest()
        self._file.write(MAGIC + _u32(len(header)) + header)

    def add(self, frame_index: int, frame: np.ndarray, rois: Iterable[Any]) -> None:
        """One frame's original pixels and the ROIs (objects with x, y, w, h, seq_id) about to be replaced."""
        rois = list(rois)
        self._last_frame = frame_index
        if self._roi_block_first is None:
            self._roi_block_first = frame_index
        if rois:
            self._roi_block.append([frame_index, [[r.x, r.y, r.w, r.h, r.seq_id] for r in rois]])
        if frame_index - self._roi_block_first + 1 >= ROI_BLOCK_FRAMES:
            self._flush_rois(frame_index)
        if self.quality == "none":
            return
        present = {r.seq_id for r in rois}
        # The tracker fills its gaps, so a sequence's frames are contiguous: absent now, ended for good.
        for seq_id in [s for s in self._open if s not in present]:
            self._flush_chunk(seq_id)
        for r in rois:
            box = (frame_index, r.x, r.y, r.w, r.h)
            chunk = self._open.get(r.seq_id)
            # A face that crosses the frame would stretch the canvas: end the chunk before it grows too big.
            if chunk is not None and chunk.canvas_bytes(box) > CHUNK_MAX_BYTES:
                self._flush_chunk(r.seq_id)
                chunk = None
            if chunk is None:
                chunk = self._open[r.seq_id] = _OpenChunk(self._next_index.get(r.seq_id, self._index_base))
                self._next_index[r.seq_id] = chunk.index + 1
            chunk.add(box, np.array(frame[r.y : r.y + r.h, r.x : r.x + r.w], dtype=np.uint8, copy=True))
            if len(chunk.crops) >= self.chunk_frames:
                self._flush_chunk(r.seq_id)
        self._write_done(keep=MAX_PENDING_CHUNKS)

    def _record(self, header: dict[str, Any], plaintext: bytes) -> None:
        self._file.write(_sealed_record(self._aes, self.video_id, header, plaintext))
        self.stats.records += 1
        self._written.append([header["kind"], header.get("seq", -1), header["index"]])

    def _flush_rois(self, last_frame: int) -> None:
        if self._roi_block_first is None:
            return
        self._record({"kind": "rois", "index": self._roi_blocks, "seq": -1,
                      "first": self._roi_block_first, "last": last_frame}, _canonical(self._roi_block))
        self._roi_blocks += 1
        self._roi_block, self._roi_block_first = [], None

    def _flush_chunk(self, seq_id: int) -> None:
        self._pending.append(self._encoder.submit(self._encode_chunk, seq_id, self._open.pop(seq_id)))

    def _write_done(self, keep: int) -> None:
        """Write the encoded chunks at the head of the queue; wait while more than `keep` are pending."""
        while self._pending and (self._pending[0].done() or len(self._pending) > keep):
            header, plaintext, stream_bytes = self._pending.popleft().result()
            self._record(header, plaintext)
            self.stats.crop_chunks += 1
            self.stats.crop_bytes += stream_bytes

    def _encode_chunk(self, seq_id: int, chunk: _OpenChunk) -> tuple[dict[str, Any], bytes, int]:
        """(record header, plaintext, stream bytes) of one chunk; runs on the encoder thread."""
        assert chunk.span is not None  # a chunk is flushed only once it holds a box
        x0, y0, x1, y1 = chunk.span
        width, height = max(_MIN_SIDE, x1 - x0), max(_MIN_SIDE, y1 - y0)
        width, height = width + width % 2, height + height % 2
        frames = _canvases(chunk.boxes, chunk.crops, (x0, y0), width, height)
        chunk.crops = []  # each canvas holds its crop exactly: memory for one copy of the chunk, not two
        codec, stream = "rgb-lossless", b""
        if self.quality == "high":
            def measure(stream: bytes) -> float:
                return _pooled_psnr(frames, decode_crops(stream, width, height, len(frames)), chunk.boxes,
                                    (x0, y0))

            # Chunks are encoded one at a time, in order: the stats hold every chunk before this one.
            values = sum(w * h * 3 for _, _, _, w, h in chunk.boxes)
            found = _aim_crf(lambda crf: encode_crops(frames, "yuv444", crf), measure,
                             self._last_crf.get(seq_id, self._video_last_crf), self.stats.chunk_floor_db(values))
            if found is not None:
                crf, psnr, stream = found
                codec = "yuv444"
                self.stats.min_psnr_db = min(self.stats.min_psnr_db, psnr)
                self.stats.roi_squared_error += values * _mse(psnr)
                self._last_crf[seq_id] = self._video_last_crf = (crf, psnr)
            self.stats.roi_values += values  # a chunk sealed lossless instead adds no error
        if codec == "rgb-lossless":
            stream = encode_crops(frames, codec)
        meta = _canonical({"codec": codec, "width": width, "height": height, "origin": [x0, y0],
                           "boxes": chunk.boxes})
        header = {"kind": "crops", "seq": seq_id, "index": chunk.index,
                  "first": chunk.boxes[0][0], "last": chunk.boxes[-1][0]}
        return header, _u32(len(meta)) + meta + stream, len(stream)

    def close(self) -> SealStats:
        """Flush every open chunk and the last ROI block, write the manifest, fsync; returns the stats."""
        if self._roi_block_first is not None:
            self._flush_rois(self._last_frame)
        for seq_id in sorted(self._open):
            self._flush_chunk(seq_id)
        self._write_done(keep=0)
        self._encoder.shutdown()
        records = list(self._written)
        self._record({"kind": "manifest", "index": 0, "seq": -1, "first": -1, "last": -1},
                     _canonical({"header_sha256": self._header_sha256, "records": records}))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.stats.bytes = self.path.stat().st_size
        return self.stats

    def abort(self) -> None:
        self._encoder.shutdown(cancel_futures=True)
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _RecordRef:
    kind: str
    seq: int
    index: int
    first: int
    last: int
    header: bytes
    offset: int  # of the body
    length: int


@dataclass
class CropChunk:
    seq_id: int
    boxes: list[tuple[int, int, int, int, int]]
    frames: np.ndarray  # (n, H, W, 3) canvases
    origin: tuple[int, int]  # frame coordinates of the canvases' top-left pixel


class SealedVideo:
    """A sealed file opened for reading: the header at once, records on demand, verified one by one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.failures: list[str] = []  # one line per record that failed, in reading order
        self.truncated = False
        with open(self.path, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                raise SealError(f"{self.path}: not a sealed file")
            self._header = self._read_block(fh, "header")
            try:
                header = json.loads(self._header)
                self.video_id: str = header["video_id"]
                self.quality: str = header["quality"]
                self.envelope = envelope_from_bytes(_canonical(header["envelope"]))
                if header["format"] != FORMAT:
                    raise SealError(f"{self.path}: format {header['format']!r}, this version reads {FORMAT}")
            except (ValueError, KeyError, TypeError) as error:
                raise SealError(f"{self.path}: damaged header ({error})") from None
            self.records = self._scan(fh)
        self._aes: AESGCM | None = None

    @staticmethod
    def _read_block(fh: BinaryIO, what: str) -> bytes:
        raw = fh.read(_LENGTH)
        if len(raw) < _LENGTH:
            raise SealError(f"sealed file ends inside the {what}")
        n = int.from_bytes(raw, "big")
        if n > _MAX_HEADER:
            raise SealError(f"implausible {what} length {n}")
        data = fh.read(n)
        if len(data) < n:
            raise SealError(f"sealed file ends inside the {what}")
        return data

    def _scan(self, fh: BinaryIO) -> list[_RecordRef]:
        """Every complete record's header and position; a cut-off tail marks the file truncated."""
        records = []
        while True:
            raw = fh.read(_LENGTH)
            if not raw:
                return records
            try:
                if len(raw) < _LENGTH:
                    raise SealError("cut inside a record")
                fh.seek(-_LENGTH, io.SEEK_CUR)
                header = self._read_block(fh, "record header")
                meta = json.loads(header)
                size_raw = fh.read(_LENGTH)
                if len(size_raw) < _LENGTH:
                    raise SealError("cut inside a record")
                size = int.from_bytes(size_raw, "big")
                offset = fh.tell()
                if fh.seek(0, io.SEEK_END) < offset + size:
                    raise SealError("cut inside a record")
                fh.seek(offset + size)
                records.append(_RecordRef(str(meta["kind"]), int(meta["seq"]), int(meta["index"]),
                                          int(meta["first"]), int(meta["last"]), header, offset, size))
            except (SealError, ValueError, KeyError, TypeError) as error:
                self.truncated = True
                self.failures.append(f"record {len(records)} and after unreadable ({error})")
                return records

    def unlock(self, data_key: DataKey) -> None:
        """Use `data_key` (unwrapped from the envelope) for every later read; checks the manifest."""
        self._aes = AESGCM(data_key.seal_key())
        manifests = [r for r in self.records if r.kind == "manifest"]
        self.expected: set[tuple[str, int, int]] | None = None
        for ref in manifests:
            plain = self._decrypt(ref)
            if plain is None:
                continue
            manifest = json.loads(plain)
            if manifest["header_sha256"] != hashlib.sha256(self._header).hexdigest():
                self.failures.append("the header does not match the manifest: altered")
                continue
            self.expected = {(k, int(s), int(i)) for k, s, i in manifest["records"]}
        if self.expected is None:
            self.truncated = True
            self.failures.append("no valid manifest: the sealed data was cut short or damaged")
        else:
            present = {(r.kind, r.seq, r.index) for r in self.records}
            for kind, seq, index in sorted(self.expected - present):
                self.failures.append(f"{kind} record seq {seq} index {index} is missing")

    @property
    def chunk_count(self) -> int:
        """Crop chunks the video was sealed with (from the manifest when it verified)."""
        if getattr(self, "expected", None) is not None:
            return sum(1 for kind, _, _ in self.expected if kind == "crops")
        return sum(1 for r in self.records if r.kind == "crops")

    @property
    def chunks_failed(self) -> int:
        return sum(1 for line in self.failures if line.startswith("crops"))

    def _decrypt(self, ref: _RecordRef) -> bytes | None:
        if self._aes is None:
            raise SealError("unlock() the sealed file with its data key first")
        with open(self.path, "rb") as fh:
            fh.seek(ref.offset)
            body = fh.read(ref.length)
        try:
            if len(body) < 12 + 16:
                raise InvalidTag()
            return self._aes.decrypt(body[:12], body[12:], _aad(self.video_id, ref.header))
        except InvalidTag:
            self.failures.append(f"{ref.kind} record seq {ref.seq} index {ref.index} failed authentication")
            return None

    def roi_lists(self, frames: Iterable[int] | None = None) -> dict[int, list[Roi]]:
        """The ROIs of `frames` (every frame when None) from the verified `rois` records.

        Frames without ROIs are absent. Only the records that span a wanted frame are read.
        """
        wanted = None if frames is None else set(frames)
        rois: dict[int, list[Roi]] = {}
        for ref in self.records:
            if ref.kind != "rois" or (wanted is not None and not any(ref.first <= f <= ref.last for f in wanted)):
                continue
            if (plain := self._decrypt(ref)) is None:
                continue
            for frame_index, boxes in json.loads(plain):
                if wanted is None or int(frame_index) in wanted:
                    rois[int(frame_index)] = [_roi(frame_index, s, x, y, w, h)
                                              for x, y, w, h, s in boxes]
        return rois

    def rois_by_frame(self) -> Iterator[tuple[int, list[Roi]]]:
        """(frame index, ROIs) in frame order for the frames that have ROIs, one record in memory at a time."""
        for ref in sorted((r for r in self.records if r.kind == "rois"), key=lambda r: r.first):
            if (plain := self._decrypt(ref)) is None:
                continue
            for frame_index, boxes in json.loads(plain):
                yield int(frame_index), [_roi(frame_index, s, x, y, w, h)
                                         for x, y, w, h, s in boxes]

    def _chunk(self, ref: _RecordRef) -> CropChunk | None:
        plain = self._decrypt(ref)
        if plain is None:
            return None
        n = int.from_bytes(plain[:_LENGTH], "big")
        meta = json.loads(plain[_LENGTH : _LENGTH + n])
        boxes = [tuple(int(v) for v in box) for box in meta["boxes"]]
        try:
            frames = decode_crops(plain[_LENGTH + n :], int(meta["width"]), int(meta["height"]), len(boxes))
        except SealError as error:
            self.failures.append(f"crops record seq {ref.seq} index {ref.index} does not decode ({error})")
            return None
        return CropChunk(ref.seq, boxes, frames, (int(meta["origin"][0]), int(meta["origin"][1])))

    def crops_by_frame(self) -> Iterator[tuple[int, list[tuple[Roi, np.ndarray]]]]:
        """(frame index, [(roi, original pixels)]) in frame order, only for frames that have crops.

        Chunks are decrypted and decoded when their first frame comes up and dropped after
        their last, so memory holds the live sequences' current chunks, not the video.
        """
        pending = sorted((r for r in self.records if r.kind == "crops"), key=lambda r: (r.first, r.seq, r.index))
        live: list[tuple[CropChunk, int]] = []  # chunk, position of its next box
        cursor = 0
        while cursor < len(pending) or live:
            frame = min([c.boxes[i][0] for c, i in live] + ([pending[cursor].first] if cursor < len(pending) else []))
            while cursor < len(pending) and pending[cursor].first <= frame:
                chunk = self._chunk(pending[cursor])
                cursor += 1
                if chunk is not None:
                    live.append((chunk, 0))
            found, still = [], []
            for chunk, i in live:
                if i < len(chunk.boxes) and chunk.boxes[i][0] == frame:
                    f, x, y, w, h = chunk.boxes[i]
                    found.append((_roi(f, chunk.seq_id, x, y, w, h),
                                  _crop_back(chunk.frames[i], chunk.boxes[i], chunk.origin)))
                    i += 1
                if i < len(chunk.boxes):
                    still.append((chunk, i))
            live = still
            if found:
                yield frame, found


def merge_stats(parts: Sequence[SealStats]) -> SealStats:
    """The stats of a video sealed in segments, from its segments' (bytes: set by the caller)."""
    merged = SealStats()
    for part in parts:
        merged.records += part.records
        merged.crop_chunks += part.crop_chunks
        merged.crop_bytes += part.crop_bytes
        merged.min_psnr_db = min(merged.min_psnr_db, part.min_psnr_db)
        merged.roi_values += part.roi_values
        merged.roi_squared_error += part.roi_squared_error
    return merged


def merge_sealed(parts: Sequence[str | Path], out: str | Path, data_key: DataKey) -> int:
    """One sealed file at `out` from the sealed files of a split video's segments; returns its size.

    Each segment was sealed by its own `SealWriter` (same header, distinct `index_base`). The
    records are copied as they are (still encrypted: their associated data names the video and
    the record, not the file), each segment's manifest is dropped, and one manifest listing every
    record is written last. A segment that does not verify in full, or whose header differs,
    stops the merge: the merged file must be as complete as one written in one piece.
    """
    opened = [SealedVideo(p) for p in parts]
    if not opened:
        raise SealError("no sealed segments to merge")
    header = opened[0]._header
    for part in opened:
        if part._header != header:
            raise SealError(f"{part.path}: its header differs from {opened[0].path}'s: not the same video's segments")
        part.unlock(data_key)
        if part.failures:
            raise SealError(f"{part.path}: the segment's sealed data does not verify: {'; '.join(part.failures[:3])}")
    aes = AESGCM(data_key.seal_key())
    video_id = opened[0].video_id
    written: list[list[Any]] = []
    with open(out, "wb") as target:
        target.write(MAGIC + _u32(len(header)) + header)
        for part in opened:
            with open(part.path, "rb") as fh:
                for ref in part.records:
                    if ref.kind == "manifest":
                        continue
                    fh.seek(ref.offset)
                    target.write(_u32(len(ref.header)) + ref.header + _u32(ref.length) + fh.read(ref.length))
                    written.append([ref.kind, ref.seq, ref.index])
        if len({tuple(w) for w in written}) != len(written):
            raise SealError("two segments hold a record with the same kind, sequence and index (same index_base?)")
        target.write(_sealed_record(aes, video_id, {"kind": "manifest", "index": 0, "seq": -1, "first": -1, "last": -1},
                                    _canonical({"header_sha256": hashlib.sha256(header).hexdigest(),
                                                "records": written})))
        target.flush()
        os.fsync(target.fileno())
    return Path(out).stat().st_size
