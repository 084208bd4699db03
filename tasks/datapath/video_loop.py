"""What the public and the private module's per-video loops share: settings, stage timer,
progress bar, timed decoding, the writer, temporary names and the per-sequence noise.

The loops themselves are `tasks/datapath/anonymize.py` (public) and
`tasks/datapath/reconstruct.py` (private); the Ray actor that runs them is
`tasks/datapath/ray_actor.py`. None of these but the actor imports Ray.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.datapath.decode import VideoInfo, iter_frames
from tasks.datapath.encode import VideoWriter
from tasks.datapath.keys import DataKey


@dataclass(frozen=True)
class PipelineSettings:
    """Everything a worker needs to know, passed once when the actor starts."""

    model: str = "uunet"
    weights: str | None = None
    public_format: str = "h264"  # h264 (release), or lossless x264rgb / ffv1 (with the in-pixel payload)
    seal: str = "high"  # the originals: high (>= 42 dB), exact (bit-exact), none (the paper's U_d only)
    restore_format: str = "x264rgb"  # the authorities' working copy: lossless, so it adds no loss of its own
    batch_size: int = 16
    min_face_size: int = 20
    max_gap: int = 8
    # Full detection on every 4th frame, and on the frames between where two of those disagree
    # (tasks/datapath/detect.py, DetectionSchedule); 1 detects every frame. At most max_gap + 1.
    detect_every: int = 4
    roi_scale: float = 1.3
    device: str = "auto"  # "auto": CUDA when this worker was given a GPU, CPU otherwise
    torch_threads: int = 0  # 0: leave torch's default
    release_check_frames: int = 48  # at most this many public frames re-checked per video
    # A video of at least twice this many frames is split at keyframes into segments of at least
    # this many, which the workers process at once (tasks/datapath/segments.py); 0: never split.
    segment_frames: int = 240
    # "bar" in a terminal; "lines" (a plain line every few seconds) where the log is a file. The
    # flows choose by whether their own stderr is a terminal: an actor's never is.
    progress_style: str = "bar"

    def __post_init__(self) -> None:
        if not 1 <= self.detect_every <= self.max_gap + 1:
            # The tracker fills only gaps up to max_gap: a longer stride would leave frames unhidden.
            raise ValueError(f"detect_every must be between 1 and max_gap + 1 = {self.max_gap + 1}, "
                             f"got {self.detect_every}")


class Timer:
    """Wall time per stage, summed over a video."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start



# glibc serves blocks above its mmap threshold with mmap (returned whole when freed), but
# raises that threshold to the size of each mmapped block freed, up to 32 MiB: after the first
# frames, a video's per-frame arrays come from the heap and fragment it, so peak memory grew
# with video length (bench.memory, Wolfgang x10: +23 % peak RSS; held at 1 MiB: +2 %, but
# every detector tensor over 1 MiB then paid fresh page faults: 10.1 fps instead of 10.8;
# held at 4 MiB: 12.1 fps, bench.throughput on the same clip).
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
HEAP_MMAP_THRESHOLD = 4 << 20


@functools.cache
def bound_heap_fragmentation() -> bool:
    """Hold glibc's mmap threshold fixed (process-wide, once); False where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def noise_source(data_key: DataKey) -> Callable[[int], np.ndarray]:
    """Each sequence's noise channel, drawn once per video."""
    cache: dict[int, np.ndarray] = {}

    def noise_for(seq_id: int) -> np.ndarray:
        if seq_id not in cache:
            cache[seq_id] = data_key.noise(seq_id)
        return cache[seq_id]

    return noise_for


@contextmanager
def temporary_beside(path: str | Path, suffix: str) -> Iterator[Path]:
    """A hidden, unique name in `path`'s folder (same file system: the final rename is atomic), always removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".partial{suffix}")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


class LineProgress:
    """Progress as plain log lines, at most one every `every_s` seconds and one at the end: what a
    log file or a scheduler's console can hold (a terminal bar there is escape codes and repeats)."""

    def __init__(self, total: int, desc: str, every_s: float = 10.0, stream=None) -> None:
        self.total, self.desc, self.every_s = total, desc, every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last >= self.every_s:
            self._line()

    def close(self) -> None:
        self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        elapsed = max(self.last - self.start, 1e-9)
        percent = 100.0 * self.done / self.total if self.total else 100.0
        print(f"{self.desc}: {self.done}/{self.total} frames ({percent:.0f} %), {self.done / elapsed:.1f} fps",
              file=self.stream, flush=True)


def progress_bar(total: int, desc: str, enabled: bool, style: str = "bar"):
    """Progress for one video: a bar (`style` "bar"; rendered on the driver when called inside a
    Ray actor) for a terminal, plain lines ("lines") for a log, or None when not `enabled`."""
    if not enabled:
        return None
    if style == "lines":
        return LineProgress(total, desc)
    # Inside an actor Ray is already loaded; a loop run without a cluster must not load it.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc, unit="frame")
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False)


def timed_batches(path: str | Path, batch_size: int, timer: Timer, start: int = 0,
                  stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Decoded batches of frames start..stop-1, with the decoding time charged to the "decode" stage."""
    frames = iter_frames(path, batch_size=batch_size, start=start, stop=stop)
    while True:
        with timer.stage("decode"):
            item = next(frames, None)
        if item is None:
            return
        yield item


def writer_for(output: str | Path, info: VideoInfo, audio_from: str | Path, video_format: str) -> VideoWriter:
    """A writer with the input's size, rate and frame times, copying its audio streams if it has any."""
    return VideoWriter(output, info.width, info.height, info.fps_rational,
                       audio_source=str(audio_from) if info.audio_streams else None, codec=video_format,
                       frame_times=info.frame_times)

