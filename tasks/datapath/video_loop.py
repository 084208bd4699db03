"""What the public and the private module's per-video loops share: settings, stage timer,
progress bar, timed decoding, the lossless writer and the per-sequence noise.

The loops themselves are `tasks/datapath/anonymize.py` (public) and
`tasks/datapath/reconstruct.py` (private); the Ray actor that runs them is
`tasks/datapath/ray_actor.py`. None of these but the actor imports Ray.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.datapath.decode import VideoInfo, iter_frames
from tasks.datapath.encode import LosslessVideoWriter
from tasks.datapath.keys import Key, keyed_noise


@dataclass(frozen=True)
class PipelineSettings:
    """Everything a worker needs to know, passed once when the actor starts."""

    model: str = "uunet"
    weights: str | None = None
    codec: str = "x264rgb"
    batch_size: int = 16
    min_face_size: int = 20
    max_gap: int = 8
    roi_scale: float = 1.3
    device: str = "auto"  # "auto": CUDA when this worker was given a GPU, CPU otherwise
    torch_threads: int = 0  # 0: leave torch's default
    release_check_frames: int = 48  # at most this many public frames re-checked per video


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



def noise_source(key: Key, video_id: str) -> Callable[[int], np.ndarray]:
    cache: dict[int, np.ndarray] = {}

    def noise_for(seq_id: int) -> np.ndarray:
        if seq_id not in cache:
            cache[seq_id] = keyed_noise(key, video_id, seq_id)
        return cache[seq_id]

    return noise_for


def progress_bar(total: int, desc: str, enabled: bool):
    """A progress bar that renders on the driver when called inside a Ray actor."""
    if not enabled:
        return None
    # Inside an actor Ray is already loaded; a loop run without a cluster must not load it.
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        return ray_tqdm(total=total, desc=desc, unit="frame")
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False)


def timed_batches(path: str | Path, batch_size: int, timer: Timer) -> Iterator[tuple[int, np.ndarray]]:
    """Decoded batches, with the decoding time charged to the "decode" stage."""
    frames = iter_frames(path, batch_size=batch_size)
    while True:
        with timer.stage("decode"):
            item = next(frames, None)
        if item is None:
            return
        yield item


def writer_for(output: str | Path, info: VideoInfo, audio_from: str | Path,
               settings: PipelineSettings) -> LosslessVideoWriter:
    """A lossless writer with the input's size and rate, copying its audio streams if it has any."""
    return LosslessVideoWriter(output, info.width, info.height, info.fps_rational,
                               audio_source=str(audio_from) if info.audio_streams else None,
                               codec=settings.codec)

