"""Encode stage: RGB frames piped into ffmpeg, written to Matroska; the sealed data attached.

Formats: `h264` (libx264 yuv420p CRF 18, the release default: plays anywhere, near the
source's size) and two lossless ones that keep an in-pixel payload bit-exact,
`x264rgb` (`libx264rgb -qp 0`, rgb24) and `ffv1` (bgr0). ffmpeg is the static binary
shipped by imageio-ffmpeg, driven through ffmpeg-python. A file appears at its final path
only when complete (temp file + rename).

A source that is not constant-rate (`VideoInfo.frame_times`) is encoded on the constant
grid, then its packets are re-stamped with the source's frame times (`retime`, PyAV, no
re-encoding): ffmpeg's rawvideo pipe carries no per-frame time, and without the source's
times the copied audio drifts from the picture.

The sealed data travels as a Matroska attachment (`attach`), so one file is the unit of
release and a plain remux (`ffmpeg -i in.mkv -map 0 -c copy out.mkv`) keeps it.
"""

from __future__ import annotations

import collections
import io
import os
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import IO

import av
import ffmpeg
import imageio_ffmpeg
import numpy as np

# At -qp 0 every x264 preset is lossless; slower ones only buy smaller files. Encode only,
# 472 frames 640x360 on 2 busy cores: ultrafast 376-563 fps (76 MB), superfast 119-196 fps
# (62 MB), veryfast 124-187 fps (61 MB); ffv1 186-288 fps (51 MB).
# A keyframe every 32 frames (+2% size) lets decode.iter_frames resume each 32-frame batch
# without re-decoding: 472 fps instead of 125 fps with x264's default of 250 (same run).
LOSSLESS_CODECS: dict[str, dict[str, str | int]] = {
    "x264rgb": {"c:v": "libx264rgb", "qp": 0, "preset": "ultrafast", "g": 32, "pix_fmt": "rgb24"},
    # ffv1 has no packed rgb24; bgr0 holds the same bytes plus a padding byte.
    "ffv1": {"c:v": "ffv1", "level": 3, "g": 32, "pix_fmt": "bgr0"},
}
# CRF 18 is x264's "visually lossless" point. x264's default keyframe interval (250): on the
# bundled Wolfgang clip a keyframe every 32 frames made the file 19 % larger (2.05 against
# 1.73 MB at veryfast; medium was no smaller at 32 and 2 % smaller at 250, at twice the time).
RELEASE_CODECS: dict[str, dict[str, str | int]] = {
    "h264": {"c:v": "libx264", "crf": 18, "preset": "veryfast", "pix_fmt": "yuv420p"},
}
VIDEO_FORMATS = {**RELEASE_CODECS, **LOSSLESS_CODECS}
ATTACHMENT_MIMETYPE = "application/x-uunet-sealed"
_STDERR_TAIL_LINES = 30


class VideoEncodeError(Exception):
    """ffmpeg failed or was misused; the message ends with the tail of ffmpeg's stderr."""


def ffmpeg_exe() -> str:
    """Path of the static ffmpeg shipped by imageio-ffmpeg (there is no system ffmpeg)."""
    return imageio_ffmpeg.get_ffmpeg_exe()


def _drain(stream: IO[bytes], tail: collections.deque[str]) -> None:
    # ffmpeg blocks once its stderr pipe is full; reading it here keeps frames flowing.
    for raw in stream:
        tail.append(raw.decode("utf-8", "replace").rstrip())


def pixel_format(video_format: str, width: int, height: int) -> str:
    """The encoder's pixel format; yuv420p cannot hold an odd size, so such frames keep full chroma."""
    pix_fmt = str(VIDEO_FORMATS[video_format]["pix_fmt"])
    if pix_fmt == "yuv420p" and (width % 2 or height % 2):
        return "yuv444p"
    return pix_fmt


def audio_codec(source: str | Path) -> str:
    """How the writer carries `source`'s audio: "copy", or "flac" (lossless) where one of its
    streams cannot be re-stamped into Matroska by PyAV (`retime`, `join_segments`): G.711
    (pcm_mulaw, pcm_alaw), G.726, ADPCM, AMR and WMA, common in IP cameras and phones."""
    try:
        container = av.open(str(source))
    except av.FFmpegError:
        return "copy"  # ffmpeg itself then says what is wrong with the source, naming it
    with container:
        streams = list(container.streams.audio)
        if not streams:
            return "copy"
        target = av.open(io.BytesIO(), "w", format="matroska")  # a codec check only: nothing is written
        try:
            for stream in streams:
                target.add_stream_from_template(stream)
        except ValueError:  # "'matroska' format does not support 'wmav2' codec"
            return "flac"
        finally:
            target.close()
    return "copy"


class VideoWriter:
    """Context manager writing uint8 RGB frames to a .mkv, optionally with copied audio.

    with VideoWriter(out, width, height, info.fps_rational, audio_source=src, codec="h264") as writer:
        writer.write(batch)
    """

    def __init__(
        self,
        out_path: str | Path,
        width: int,
        height: int,
        fps_rational: str,
        audio_source: str | Path | None = None,
        codec: str = "x264rgb",
        frame_times: Sequence[float] | None = None,
    ) -> None:
        """`frame_times`: each frame's start (s), when the video is not at i / fps (see `retime`)."""
        if codec not in VIDEO_FORMATS:
            raise ValueError(f"unknown video format {codec!r}; choose one of {sorted(VIDEO_FORMATS)}")
        self.out_path = Path(out_path)
        self.width, self.height = width, height
        self.fps_rational = fps_rational
        self.frame_times = None if frame_times is None else list(frame_times)
        self.frames_written = 0
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        # Same directory as out_path so the final rename is atomic; unique so writers never collide.
        handle, temp = tempfile.mkstemp(
            dir=self.out_path.parent, prefix=f".{self.out_path.name}.", suffix=".partial.mkv"
        )
        os.close(handle)
        self._temp_path = Path(temp)

        video = ffmpeg.input(
            "pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps_rational
        )
        streams = [video]
        if audio_source is not None:
            # "a?" maps every audio stream and tolerates a source that has none.
            streams.append(ffmpeg.input(str(audio_source))["a?"])
        output = ffmpeg.output(
            *streams,
            str(self._temp_path),
            format="matroska",  # the temp name's suffix must not decide the container
            fps_mode="passthrough",  # one input frame, one output frame: no drops, no duplicates
            **{"c:a": audio_codec(audio_source) if audio_source is not None else "copy"},
            **{**VIDEO_FORMATS[codec], "pix_fmt": pixel_format(codec, width, height)},
        ).global_args("-hide_banner", "-nostats", "-loglevel", "warning")
        self._process = output.run_async(
            cmd=ffmpeg_exe(), pipe_stdin=True, pipe_stderr=True, overwrite_output=True
        )
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._drainer = threading.Thread(
            target=_drain, args=(self._process.stderr, self._stderr_tail), daemon=True
        )
        self._drainer.start()
        self._finished = False

    def write(self, frames: np.ndarray) -> None:
        """Append one frame (H, W, 3) or a batch (N, H, W, 3) of uint8 RGB."""
        if self._finished:
            raise VideoEncodeError(f"{self.out_path}: writer is already closed")
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
            raise TypeError(f"frames must be a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}")
        batch = frames[np.newaxis] if frames.ndim == 3 else frames
        if batch.ndim != 4 or batch.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"frames must be (H, W, 3) or (N, H, W, 3) with H={self.height}, W={self.width}; "
                f"got shape {frames.shape}"
            )
        try:
            self._process.stdin.write(np.ascontiguousarray(batch).data)
        except BrokenPipeError as err:
            self.abort()  # ffmpeg has exited; abort collects its stderr and removes the temp file
            raise self._error("ffmpeg stopped accepting frames") from err
        self.frames_written += len(batch)

    def close(self) -> Path:
        """Finish the file and move it to out_path; returns out_path."""
        if self._finished:
            raise VideoEncodeError(f"{self.out_path}: writer is already closed")
        if self.frames_written == 0:
            self.abort()
            raise VideoEncodeError(f"{self.out_path}: no frames were written")
        returncode = self._stop(kill=False)
        if returncode != 0:
            self._temp_path.unlink(missing_ok=True)
            raise self._error(f"ffmpeg exited with code {returncode}")
        if self.frame_times is not None:
            if len(self.frame_times) != self.frames_written:
                self._temp_path.unlink(missing_ok=True)
                raise VideoEncodeError(f"{self.out_path}: {self.frames_written} frames written but "
                                       f"{len(self.frame_times)} frame times given")
            try:
                retime(self._temp_path, self.frame_times, float(Fraction(self.fps_rational)))
            except BaseException:
                self._temp_path.unlink(missing_ok=True)
                raise
        os.replace(self._temp_path, self.out_path)
        return self.out_path

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file; out_path is left untouched."""
        if not self._finished:
            self._stop(kill=True)
        self._temp_path.unlink(missing_ok=True)

    def _stop(self, kill: bool) -> int:
        """End ffmpeg (by closing its input, or by killing it) and collect its stderr."""
        if kill:
            self._process.kill()
        try:
            self._process.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg already exited; its return code says why
        returncode = self._process.wait()
        self._drainer.join()
        self._finished = True
        return returncode

    def _error(self, what: str) -> VideoEncodeError:
        tail = "\n".join(self._stderr_tail) or "(no stderr)"
        return VideoEncodeError(f"{self.out_path}: {what}; ffmpeg stderr tail:\n{tail}")

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def frame_clock(frame_times: Sequence[float] | None, fps: float, where: str | Path):
    """index -> start (s) of frame `index`: `frame_times[index]`, or index / fps when None. Decode
    times before frame 0 (B-frame delay, negative indices) are spaced below every gap, so they
    stay increasing."""
    if frame_times is None:
        return lambda index: index / fps
    times = np.asarray(frame_times, dtype=np.float64)
    step = float(np.diff(times).min()) if len(times) > 1 else 1.0 / fps

    def start(index: int) -> float:
        if index >= len(times):
            raise VideoEncodeError(f"{where}: frame {index} has no frame time ({len(times)} given)")
        return float(times[index]) if index >= 0 else float(times[0]) + index * step
    return start


def retime(path: str | Path, frame_times: Sequence[float], fps: float) -> None:
    """Re-stamp the video packets of a constant-rate Matroska file at `path` (frame i at i / fps)
    with `frame_times[i]`, in place (a hidden temp file, then rename); other streams are copied as
    they are. Decode-order timestamps that precede frame 0 (B-frame delay) stay before it."""
    path = Path(path)
    frame_time = frame_clock(frame_times, fps, path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".retime.mkv")
    os.close(handle)
    try:
        with av.open(str(path)) as source, av.open(temp, "w", format="matroska") as target:
            video = source.streams.video[0]
            copies = {s.index: target.add_stream_from_template(s) for s in source.streams
                      if s.type in ("video", "audio")}
            base = video.time_base

            def stamp(ts: int | None) -> int | None:
                if ts is None:
                    return None
                return round(frame_time(round(float(ts * base) * fps)) / base)

            for packet in source.demux(*[s for s in source.streams if s.index in copies]):
                if packet.pts is None and packet.dts is None:
                    continue  # the demuxer's end-of-stream marker
                if packet.stream.index == video.index:
                    packet.pts, packet.dts = stamp(packet.pts), stamp(packet.dts)
                packet.stream = copies[packet.stream.index]
                target.mux(packet)
    except av.FFmpegError as err:
        Path(temp).unlink(missing_ok=True)
        raise VideoEncodeError(f"{path}: re-stamping the frame times failed: {err}") from err
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    os.replace(temp, path)


def join_segments(parts: Sequence[str | Path], starts: Sequence[int], out_path: str | Path, fps: float,
                  frame_times: Sequence[float] | None = None) -> int:
    """Join the video-only segment files of a split video into `out_path`, without re-encoding;
    returns the number of video packets (one per frame).

    Segment k's frame i is the video's frame `starts[k] + i`, stamped at its source time
    (`frame_times`, or i / fps on a constant grid): the packets are copied in order and only their
    times rewritten, as `retime` does. Each segment starts on a keyframe, and its first decode
    times (B-frame delay; Matroska's demuxer gives none for the first packets) would fall before
    the previous segment's last: they are set one tick past it. Matroska stores presentation
    times only, so these decode times are never written; the muxer only needs them increasing.
    """
    frame_time = frame_clock(frame_times, fps, out_path)
    packets = 0
    try:
        with av.open(str(out_path), "w", format="matroska") as target:
            stream = None
            last_dts: int | None = None
            for part, start in zip(parts, starts, strict=True):
                with av.open(str(part)) as source:
                    video = source.streams.video[0]
                    if stream is None:
                        stream = target.add_stream_from_template(video)
                    base = video.time_base
                    for packet in source.demux(video):
                        if packet.pts is None and packet.dts is None:
                            continue  # the demuxer's end-of-stream marker
                        out_base = stream.time_base or base
                        pts, dts = ((None if ts is None else
                                     round(frame_time(start + round(float(ts * base) * fps)) / out_base))
                                    for ts in (packet.pts, packet.dts))
                        if last_dts is None and dts is None:
                            dts = pts
                        elif last_dts is not None and (dts is None or dts <= last_dts):
                            dts = last_dts + 1
                        last_dts = dts
                        packet.pts, packet.dts = pts, dts
                        packet.stream = stream
                        target.mux(packet)
                        packets += 1
    except av.FFmpegError as err:
        Path(out_path).unlink(missing_ok=True)
        raise VideoEncodeError(f"{out_path}: joining the segments failed: {err}") from err
    return packets


def _container_start(path: str | Path) -> float:
    with av.open(str(path)) as container:
        return (container.start_time or 0) / 1e6


def attach(video: str | Path, attachment: str | Path, out_path: str | Path, name: str,
           audio_from: str | Path | None = None) -> Path:
    """Remux `video` (every stream, no re-encoding) with `attachment` added, into `out_path` atomically;
    with every audio stream of `audio_from` after them (a split video's segments carry none)."""
    out_path = Path(out_path)
    handle, temp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".partial.mkv")
    os.close(handle)
    audio_in, audio_map = ([], []) if audio_from is None else (["-i", str(audio_from)], ["-map", "1:a?"])
    # ffmpeg starts every input at 0. The audio's source keeps its own start that way, and
    # `video` (frames stamped from the source's start) would lose a late first frame:
    # `-itsoffset` puts the frames back where they are.
    shift = ["-itsoffset", f"{_container_start(video):.6f}"] if audio_from is not None else []
    command = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *shift, "-i", str(video),
               *audio_in,
               "-map", "0", *audio_map, "-c", "copy", "-attach", str(attachment),
               "-metadata:s:t:0", f"mimetype={ATTACHMENT_MIMETYPE}", "-metadata:s:t:0", f"filename={name}",
               "-f", "matroska", temp]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if result.returncode != 0:
        Path(temp).unlink(missing_ok=True)
        raise VideoEncodeError(f"{out_path}: attaching the sealed data failed: {result.stderr.strip()[-2000:]}")
    os.chmod(temp, 0o644)  # a release: readable by all (mkstemp made it owner-only)
    os.replace(temp, out_path)
    return out_path
