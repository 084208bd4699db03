"""Decode stage: video metadata and RGB frames in bounded batches.

decord does the decoding; the static ffmpeg from imageio-ffmpeg (there is no
ffprobe here) answers the two questions decord cannot: how many audio streams a
file holds, and, for Matroska, how long the video track claims to be, which is
how a truncated public stream is caught before it silently loses frames.

Three things real archives hold that decord gets silently wrong or that a naive
check misjudges, each settled here in `probe`:
- variable frame rate: each frame's own start time is read (decord's frame
  timestamps) and handed on in `VideoInfo.frame_times`, so the writers keep it;
- a frame size that changes mid-stream (a .ts that switches resolution): decord
  returns every frame at the first size, the later ones cropped or frozen, so the
  keyframes' sizes are read with PyAV (keyframes only: a new size can only start
  on one) and such a file is refused with a clear error;
- display rotation (an mp4 display matrix, or a legacy `rotate` tag): decord
  already turns frames upright for multiples of 90 degrees, so every size here is
  the upright one and the outputs are written upright, with no rotation tag;
- containers without a frame index (MPEG transport and program streams, WMV):
  decord's seeks land on other frames than the ones it names, so these files are
  probed and read with PyAV, front to back (`FRONT_TO_BACK_FORMATS`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
from decord import DECORDError, VideoReader, cpu

# ffmpeg -i only reads headers; a minute means something is badly wrong.
_PROBE_TIMEOUT_S = 60
_STREAM_LINE = re.compile(r"^\s*Stream #\d+:\d+\S*: (Video|Audio|Subtitle|Data|Attachment):")
# Matroska writes each track's length as a tag, e.g. "DURATION : 00:00:02.400000000".
_DURATION_TAG = re.compile(r"^\s*DURATION\s*:\s*(\d+):(\d+):(\d+(?:\.\d+)?)\s*$")
# A frame whose start differs from i / fps by more than this is not on the constant-rate
# grid: above the rounding of Matroska's millisecond (and mp4's finer) time bases.
FRAME_TIME_TOLERANCE_S = 0.0015
# Demuxers (PyAV's `format.name`) that keep no index of frames: decord seeks in them by
# timestamp and lands elsewhere. Measured on clips made from the samples with our ffmpeg:
# MPEG-2 in .ts, .mpg and .vob, and WMV came back with frames shifted by up to 8 and status
# done; H.264 in .ts failed at frame 0; a .ts spliced from two recordings came back as the
# second recording, then its last frame 20 times. mp4, mov, mkv, webm, avi, flv and y4m
# read back frame for frame. These are read with PyAV, front to back, instead.
FRONT_TO_BACK_FORMATS = frozenset({"mpegts", "mpeg", "asf", "mpegvideo"})
# decord prefixes its messages with "[hh:mm:ss] /source/file.cc:123: ", once per re-raise.
_DECORD_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ")


def _load_malloc_trim() -> Callable[[int], int] | None:
    libc_name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(libc_name).malloc_trim if libc_name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


# decord frees each flushed batch's packets and frames from its own threads; glibc keeps
# that memory in per-thread arenas, and RSS crept up to 1.3 GB on a 2.2 GB lossless
# file until malloc_trim handed it back (then: under 100 MB).
_MALLOC_TRIM = _load_malloc_trim()


class VideoDecodeError(Exception):
    """A file that cannot be read as a video; the message names the file and the reason."""


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a video; duration_s is where its last frame ends; sizes are upright."""

    path: str
    width: int
    height: int
    frame_count: int
    fps: float
    fps_rational: str  # "24000/1001": what the encoder is given, so the output keeps the exact rate
    audio_streams: int
    duration_s: float
    # Start time (s) of each frame where the video is not constant-rate from 0 (variable frame
    # rate, a late start); None where frame i starts at i / fps, the common case. Left out of
    # the repr: a log line would otherwise carry thousands of numbers.
    frame_times: tuple[float, ...] | None = field(default=None, repr=False)


def fps_to_rational(fps: float) -> str:
    """The exact frame rate behind decord's float, e.g. 23.976023976 -> "24000/1001".

    decord returns av_q2d(stream rate), the double nearest to a rational. Every
    rate in use (integers, halves, and NTSC's n*1000/1001) has a denominator of
    at most 1001, so the closest fraction with such a denominator recovers it.
    """
    rate = Fraction(fps).limit_denominator(1001)
    return f"{rate.numerator}/{rate.denominator}"


def _ffmpeg_report(path: str | Path) -> tuple[bool, list[str]]:
    """Run `ffmpeg -i PATH` (no output); return (opened, stderr lines)."""
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=_PROBE_TIMEOUT_S,
    )
    lines = result.stderr.splitlines()
    # Without an output ffmpeg always exits non-zero; "Input #0" is the sign it parsed the file.
    return any(line.startswith("Input #0") for line in lines), lines


def _stream_kinds(lines: list[str]) -> list[str]:
    return [m.group(1) for line in lines if (m := _STREAM_LINE.match(line))]


def count_audio_streams(path: str | Path) -> int:
    """Number of audio streams in the file, read from ffmpeg's input report."""
    opened, lines = _ffmpeg_report(path)
    if not opened:
        raise VideoDecodeError(f"{path}: not a video or unsupported format ({_tail(lines)})")
    return _stream_kinds(lines).count("Audio")


def _declared_video_duration(lines: list[str]) -> float | None:
    """Seconds the first video track claims (Matroska's per-track DURATION tag), if present."""
    in_first_video = False
    for line in lines:
        match = _STREAM_LINE.match(line)
        if match:
            if in_first_video:
                return None
            in_first_video = match.group(1) == "Video" and "(attached pic)" not in line
            continue
        if in_first_video and (tag := _DURATION_TAG.match(line)):
            hours, minutes, seconds = tag.groups()
            return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return None


def _tail(lines: list[str], n: int = 3) -> str:
    return " | ".join(line.strip() for line in lines[-n:]) or "no ffmpeg output"


def _decord_reason(err: BaseException) -> str:
    text = str(err).strip()
    return _DECORD_PREFIX.sub("", text.splitlines()[0]) if text else type(err).__name__


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes), not a video")
    return path


def reads_front_to_back(path: str | Path) -> bool:
    """Whether the file's container is one of `FRONT_TO_BACK_FORMATS` (read with PyAV, not decord)."""
    try:
        with av.open(str(_check_file(path))) as container:
            return bool(FRONT_TO_BACK_FORMATS & set(container.format.name.split(",")))
    except av.FFmpegError:
        return False  # not a video PyAV can open: decord's errors say what is wrong with it


def _open(path: str | Path) -> VideoReader:
    """Open with decord, turning its failures into a VideoDecodeError that says why."""
    path = _check_file(path)
    try:
        return VideoReader(str(path), ctx=cpu(0))
    except AssertionError as err:  # decord asserts a positive frame count
        raise VideoDecodeError(f"{path}: zero frames") from err
    except (DECORDError, RuntimeError) as err:
        opened, lines = _ffmpeg_report(path)
        if not opened:
            reason = f"not a video or unsupported format ({_tail(lines)})"
        elif "Video" not in _stream_kinds(lines):
            reason = "no video stream"
        else:
            # decord reads every packet while indexing, so a cut-off file fails here.
            reason = f"truncated/corrupt (decord could not index it: {_decord_reason(err)})"
        raise VideoDecodeError(f"{path}: {reason}") from err


def _frame_size(reader: VideoReader, path: str | Path) -> tuple[int, int]:
    """(height, width), from decoding frame 0: decord exposes no size without a frame."""
    try:
        height, width = reader[0].shape[:2]
    except DECORDError as err:
        raise VideoDecodeError(f"{path}: truncated/corrupt at frame 0 ({_decord_reason(err)})") from err
    return int(height), int(width)


def off_grid_frame_times(starts: np.ndarray, fps: float) -> tuple[float, ...] | None:
    """`starts` as a tuple when some frame is not at i / fps (within the tolerance), else None."""
    grid = np.arange(len(starts)) / fps
    if len(starts) == 0 or np.abs(starts - grid).max() <= FRAME_TIME_TOLERANCE_S:
        return None
    return tuple(float(t) for t in starts)


def _frame_starts(reader: VideoReader, frame_count: int) -> np.ndarray | None:
    """Each frame's start (s) from decord, or None where the container gives no usable times
    (a cut Matroska file: every time reads as ffmpeg's "no timestamp", 9.2e15 s)."""
    starts = reader.get_frame_timestamp(range(frame_count))[:, 0].astype(np.float64)
    if not np.isfinite(starts).all() or np.abs(starts).max() > 1e7 or (np.diff(starts) <= 0).any():
        return None
    return starts


def _video_start(path: str | Path) -> float:
    """When the first frame is shown, in seconds from the container's start (PyAV, headers only).

    decord counts frame times from the first frame, so a video that starts after its audio
    (0.5 s in a phone clip, an edit list) would lose the gap and play out of sync.
    """
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.start_time is None:
                return 0.0
            return max(0.0, float(stream.start_time * stream.time_base) - (container.start_time or 0) / 1e6)
    except (av.FFmpegError, IndexError):
        return 0.0  # decord read it; without PyAV's view the times stay decord's


def keyframe_sizes(path: str | Path) -> list[tuple[int, int]]:
    """Each (width, height) in turn among the first video stream's keyframes, decoded with PyAV.

    A coded size can only change on a keyframe (a new sequence header), so decoding the
    keyframes alone finds every size a stream holds, at a fraction of a full decode.
    """
    sizes: list[tuple[int, int]] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.skip_frame = "NONKEY"
            for frame in container.decode(stream):
                if not sizes or (frame.width, frame.height) != sizes[-1]:
                    sizes.append((frame.width, frame.height))
    except (av.FFmpegError, IndexError) as err:  # decord read it; PyAV's complaint is only a missed check
        raise VideoDecodeError(f"{path}: truncated/corrupt (its keyframes cannot be decoded: {err})") from err
    return sizes


def keyframe_indices(path: str | Path) -> tuple[list[int], int]:
    """The frames a decoder can start from, and the number of frames (the container's index: no decoding).

    A file read front to back has only frame 0 to start from, as far as this project goes;
    its frames are counted from the demuxed packets (no decoding: a plan needs no more).
    """
    if reads_front_to_back(path):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return [0], sum(1 for packet in container.demux(stream) if packet.size)
    reader = _open(path)
    return sorted(int(k) for k in reader.get_key_indices()), len(reader)


def _refuse_size_changes(path: str | Path, sizes: list[tuple[int, int]]) -> None:
    """sizes: (width, height) of each stretch of the stream, in order."""
    if len(sizes) > 1:
        changes = ", then ".join(f"{w}x{h}" for w, h in sizes)
        raise VideoDecodeError(
            f"{path}: the frame size changes mid-stream ({changes}); decoding would return every "
            f"frame at the first size. Re-encode it to one size (e.g. ffmpeg -vf scale=W:H) first"
        )


def _probe_front_to_back(path: str | Path) -> VideoInfo:
    """`probe` for `FRONT_TO_BACK_FORMATS`: one PyAV pass over the decoded frames, without
    converting them, gives the frame count, each frame's time and every frame size."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            # Times from the container's start, which ffmpeg subtracts from every stream it
            # copies: the audio taken from the source stays in step with these frames.
            origin = (container.start_time or 0) / 1e6
    except IndexError as err:
        raise VideoDecodeError(f"{path}: no video stream") from err
    except av.FFmpegError as err:
        raise VideoDecodeError(f"{path}: truncated/corrupt ({err})") from err
    step = 1 / rate if rate > 0 else 0.04
    times: list[float] = []
    sizes: list[tuple[int, int]] = []
    for _, frame, turns in _pyav_frames(path, None):
        upright = (frame.width, frame.height)[::1 if turns % 2 == 0 else -1]
        if not sizes or sizes[-1] != upright:
            sizes.append(upright)
        times.append(frame.time - origin if frame.time is not None else (times[-1] + step if times else 0.0))
    if not times:
        raise VideoDecodeError(f"{path}: zero frames")
    _refuse_size_changes(path, sizes)
    starts = np.asarray(times, dtype=np.float64)
    if rate <= 0:
        rate = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 and starts[-1] > starts[0] else 25.0
    # Times that do not increase (a recorder's clock set back mid-file) cannot be kept: the
    # frames then go out on the constant grid, every one of them still in its place.
    monotonic = bool((np.diff(starts) > 0).all()) and starts[0] >= 0
    _, lines = _ffmpeg_report(path)
    (width, height) = sizes[0]
    return VideoInfo(
        path=str(path),
        width=width,
        height=height,
        frame_count=len(starts),
        fps=rate,
        fps_rational=fps_to_rational(rate),
        audio_streams=_stream_kinds(lines).count("Audio"),
        duration_s=float(starts[-1]) + 1 / rate if monotonic else len(starts) / rate,
        frame_times=off_grid_frame_times(starts, rate) if monotonic else None,
    )


def probe(path: str | Path) -> VideoInfo:
    """Metadata of a video; raises VideoDecodeError for anything that is not a complete video
    with one frame size."""
    if reads_front_to_back(path):
        return _probe_front_to_back(path)
    reader = _open(path)
    frame_count = len(reader)
    height, width = _frame_size(reader, path)
    fps = float(reader.get_avg_fps())
    starts = _frame_starts(reader, frame_count)
    if starts is not None:
        starts = starts + _video_start(path)
    end_s = frame_count / fps if starts is None else float(starts[-1]) + 1 / fps
    _, lines = _ffmpeg_report(path)
    declared = _declared_video_duration(lines)
    # Matroska's header keeps the full length while the clusters are cut off. The last frame's
    # end, not frame_count / fps, is the length present: a variable-rate clip is not short.
    if declared is not None and end_s < declared - 1.5 / fps - FRAME_TIME_TOLERANCE_S:
        raise VideoDecodeError(
            f"{path}: truncated/corrupt at frame {frame_count}: the video track declares "
            f"{declared:.3f} s but its frames end at {end_s:.3f} s"
        )
    _refuse_size_changes(path, keyframe_sizes(path))
    return VideoInfo(
        path=str(path),
        width=width,
        height=height,
        frame_count=frame_count,
        fps=fps,
        fps_rational=fps_to_rational(fps),
        audio_streams=_stream_kinds(lines).count("Audio"),
        duration_s=end_s,
        frame_times=None if starts is None else off_grid_frame_times(starts, fps),
    )


def read_attachment(path: str | Path, mimetype: str, dest: str | Path) -> bool:
    """Copy the file's first attachment of `mimetype` to `dest`; False when it has none."""
    dest = Path(dest)
    dest.unlink(missing_ok=True)
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error",
         f"-dump_attachment:m:mimetype:{mimetype}", str(dest), "-i", str(path)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=_PROBE_TIMEOUT_S)
    # Without an output file ffmpeg exits 1 after dumping; only other complaints are errors.
    problems = [line for line in result.stderr.splitlines()
                if line.strip() and "At least one output file must be specified" not in line]
    if problems and not dest.exists():
        raise VideoDecodeError(f"{path}: cannot read its attachments ({' | '.join(problems[-3:])})")
    return dest.exists()


def _flush(reader: VideoReader) -> None:
    """Stop decord's decoder thread and drop what it decoded ahead; hand the freed pages back."""
    reader.seek(0)
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def iter_frames(
    path: str | Path, batch_size: int = 32, start: int = 0, stop: int | None = None, via: str = "auto"
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index of first frame, uint8 (n, H, W, 3) RGB) for frames start..stop-1, in order.

    Memory stays at about one batch whatever the video's length, because of a
    flush before every yield. decord's decoder thread otherwise keeps decoding
    every packet it has queued (often the whole file) while the caller works:
    measured on a 4720-frame 640x360 clip with a slow consumer, RSS climbed to
    3.2 GB. The flush costs a re-decode from the keyframe before the next batch:
    nothing when batches start on keyframes (our encoder puts one every 32
    frames), about 0.8 of a decode for a keyframe every 2 s, quadratic time for
    a long video with a single keyframe. Where the flushes would more than double
    the decoding, the frames come from PyAV instead, which decodes only on demand
    and so needs no flush (`_iter_frames_pyav`).
    `via` forces one path ("decord" or "pyav"; benchmarks and tests compare them).
    Container-level truncation (Matroska) is detected by `probe`: call it first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if via not in ("auto", "decord", "pyav"):
        raise ValueError(f"via must be auto, decord or pyav, got {via!r}")
    if via == "auto" and reads_front_to_back(path):
        if stop is not None and not 0 <= start <= stop:
            raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
        yield from _iter_frames_pyav(path, batch_size, start, stop, None, None)
        return
    reader = _open(path)
    total = len(reader)
    stop = total if stop is None else min(stop, total)
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop <= {total}, got start={start}, stop={stop}")
    height, width = _frame_size(reader, path)
    if via == "pyav" or (via == "auto" and
                         flush_redecodes(reader.get_key_indices(), start, stop, batch_size) > stop - start):
        # Decoding frame 0 for the size set decord's thread going; left alive, it decodes the
        # whole file into memory beside PyAV (1.4 GB for 5 minutes of 640x360).
        reader.seek(0)
        del reader
        yield from _iter_frames_pyav(path, batch_size, start, stop, (height, width), total)
        return
    for first in range(start, stop, batch_size):
        try:
            reader.seek_accurate(first)
        except (DECORDError, RuntimeError) as err:
            raise VideoDecodeError(f"{path}: truncated/corrupt, cannot seek to frame {first}") from err
        batch = np.empty((min(batch_size, stop - first), height, width, 3), dtype=np.uint8)
        for i in range(len(batch)):
            try:
                batch[i] = reader.next().asnumpy()
            except (StopIteration, DECORDError) as err:
                detail = "ends early" if isinstance(err, StopIteration) else _decord_reason(err)
                raise VideoDecodeError(
                    f"{path}: truncated/corrupt at frame {first + i} of {total} ({detail})"
                ) from err
        _flush(reader)
        yield first, batch


def flush_redecodes(keyframes: Sequence[int], start: int, stop: int, batch_size: int) -> int:
    """Frames decoded twice by `iter_frames`' decord path: after each flush, the next batch
    is decoded again from the keyframe at or before its first frame."""
    keys = np.sort(np.asarray(keyframes, dtype=np.int64))
    firsts = np.arange(start + batch_size, stop, batch_size, dtype=np.int64)
    if len(keys) == 0 or len(firsts) == 0:
        return 0
    previous = keys[np.clip(np.searchsorted(keys, firsts, side="right") - 1, 0, None)]
    return int((firsts - previous).sum())


def _display_turns(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> int:
    """Quarter turns (for np.rot90) that make a PyAV frame upright as decord returns it: the
    display matrix counts counter-clockwise, the legacy `rotate` tag clockwise; decord leaves
    angles that are not multiples of 90 alone, and so does this."""
    tag = {k.lower(): v for k, v in stream.metadata.items()}.get("rotate", "0")
    try:
        degrees = round(frame.rotation) - int(float(tag))
    except ValueError:
        degrees = round(frame.rotation)
    return (degrees // 90) % 4 if degrees % 90 == 0 else 0


def _pyav_frames(path: str | Path, total: int | None) -> Iterator[tuple[int, av.VideoFrame, int]]:
    """(index, frame, quarter turns to upright) of every frame in order, decoded with PyAV."""
    index = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                yield index, frame, _display_turns(frame, stream)
                index += 1
    except av.FFmpegError as err:
        of = f" of {total}" if total is not None else ""
        raise VideoDecodeError(f"{path}: truncated/corrupt at frame {index}{of} ({err})") from err


def _iter_frames_pyav(
    path: str | Path, batch_size: int, start: int, stop: int | None, size: tuple[int, int] | None,
    total: int | None,
) -> Iterator[tuple[int, np.ndarray]]:
    """`iter_frames` with PyAV: for files decord would re-decode over and over (long keyframe
    gaps) and for those it cannot seek in (`FRONT_TO_BACK_FORMATS`; size, total and stop
    then come from the frames themselves).

    PyAV pulls one frame per call and decodes nothing ahead, so no flush is needed. Its
    RGB equals decord's for 8-bit sources (measured on yuv420p and yuv444p); for 10-bit
    ones the two ffmpeg builds' converters differ by a few levels.
    """
    seen = 0  # frames decoded so far
    batch: list[np.ndarray] = []
    with closing(_pyav_frames(path, total)) as frames:
        for index, frame, turns in frames:
            if stop is not None and index >= stop:
                break
            seen = index + 1
            if index < start:
                continue
            rgb = np.rot90(frame.to_ndarray(format="rgb24"), turns)
            size = size or rgb.shape[:2]
            if rgb.shape[:2] != size:
                raise VideoDecodeError(f"{path}: frame {index} is {rgb.shape[1]}x{rgb.shape[0]}, "
                                       f"frame {start} {size[1]}x{size[0]}")
            batch.append(rgb)
            if len(batch) == batch_size:
                yield seen - batch_size, np.stack(batch)
                batch = []
    if stop is not None and seen < stop:
        raise VideoDecodeError(f"{path}: truncated/corrupt at frame {seen} of {total or stop} (ends early)")
    if batch:
        yield seen - len(batch), np.stack(batch)


def iter_frames_at(path: str | Path, indices: Sequence[int], chunk: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """(indices, frames) for `indices`, `chunk` at a time, frames as uint8 (n, H, W, 3) RGB, from one open decoder.

    Opening a reader indexes the whole file again: reading a sample of 48 frames in chunks
    of 8 with `read_frames` spent half its time there (Wolfgang clip, 1.8 s against 0.8 s).
    Each chunk is followed by the same flush as in `iter_frames`: without it decord's thread
    went on decoding the rest of the file while the caller worked, and the release check of a
    10 s 4K clip held both files decoded in memory (11.6 GB against 2 GB for the main pass).
    """
    indices = list(indices)
    if not indices:
        return
    if reads_front_to_back(path):
        yield from _iter_frames_at_pyav(path, indices, chunk)
        return
    reader = _open(path)
    for first in range(0, len(indices), chunk):
        part = indices[first:first + chunk]
        try:
            batch = reader.get_batch(part).asnumpy()
        except IndexError as err:
            raise VideoDecodeError(f"{path}: holds {len(reader)} frames, frames {part} were asked for") from err
        except DECORDError as err:
            raise VideoDecodeError(f"{path}: truncated/corrupt while reading frames {part}") from err
        _flush(reader)  # see iter_frames
        yield part, batch


def _iter_frames_at_pyav(path: str | Path, indices: list[int], chunk: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """`iter_frames_at` for files that cannot be sought in: one pass from frame 0, converting
    only the frames asked for, each chunk yielded once all of its frames are decoded."""
    wanted = set(indices)
    kept: dict[int, np.ndarray] = {}
    first = 0  # the next chunk to yield starts at indices[first]
    count = 0
    with closing(_pyav_frames(path, None)) as frames:
        for index, frame, turns in frames:
            count = index + 1
            if index in wanted:
                kept[index] = np.rot90(frame.to_ndarray(format="rgb24"), turns)
            while first < len(indices) and all(i in kept for i in indices[first:first + chunk]):
                part = indices[first:first + chunk]
                yield part, np.stack([kept[i] for i in part])
                first += chunk
                for i in set(part) - set(indices[first:]):
                    del kept[i]  # no later chunk asks for it again
            if first >= len(indices):
                return
    missing = [i for i in indices[first:] if i not in kept]
    raise VideoDecodeError(f"{path}: holds {count} frames, frames {missing} were asked for")


def read_frames(path: str | Path, indices: Sequence[int]) -> np.ndarray:
    """Frames at the given indices as uint8 (n, H, W, 3) RGB (random access; for tests and evaluation)."""
    indices = list(indices)
    if not indices:
        info = probe(path)
        return np.empty((0, info.height, info.width, 3), dtype=np.uint8)
    return next(iter_frames_at(path, indices, chunk=len(indices)))[1]
