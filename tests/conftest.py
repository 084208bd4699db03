"""Shared fixtures: tiny clips cut from the bundled footage, one Ray and one Prefect harness per session."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import flows  # noqa: F401  (sets the embedded Prefect/Ray environment defaults before either is imported)

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"


def cut_clip(source: Path, dest: Path, frames: int, start_s: float = 0.0) -> Path:
    """Re-encode the first `frames` frames (from `start_s`) of a sample, keeping its audio."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-ss", str(start_s), "-i", str(source),
           "-frames:v", str(frames), "-c:v", "libx264", "-crf", "12", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-shortest", str(dest)]
    subprocess.run(cmd, check=True)
    return dest


@pytest.fixture(scope="session")
def clips(tmp_path_factory) -> dict[str, Path]:
    """Short real clips: 'wolfgang' (24 frames, audio), 'carphone' (16 frames, 176×144, no audio)."""
    root = tmp_path_factory.mktemp("clips")
    return {
        "wolfgang": cut_clip(SAMPLES / "WolfgangLanger_Pexels.mp4", root / "wolfgang.mp4", 24, start_s=2.0),
        "carphone": cut_clip(SAMPLES / "carphone_pristine.mp4", root / "carphone.mp4", 16),
    }


KEYFRAMED_FRAMES, KEYFRAME_EVERY = 32, 16


@pytest.fixture(scope="session")
def keyframed_clip(tmp_path_factory) -> Path:
    """32 frames of the Wolfgang sample (a face throughout) with a keyframe every 16 and its audio:
    a video that splits (tasks/datapath/segments.py)."""
    import imageio_ffmpeg

    dest = tmp_path_factory.mktemp("keyframed") / "keyframed.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-ss", "2", "-i",
                    str(SAMPLES / "WolfgangLanger_Pexels.mp4"), "-frames:v", str(KEYFRAMED_FRAMES), "-c:v", "libx264",
                    "-crf", "12", "-g", str(KEYFRAME_EVERY), "-keyint_min", str(KEYFRAME_EVERY), "-sc_threshold", "0",
                    "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(dest)], check=True)
    return dest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _temp_dir=f"/tmp/uunet-ray-test-{os.getuid()}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
