"""Decode and encode stages: metadata, batching, bit-exact round trips, audio copy, failures."""

from __future__ import annotations

import hashlib
import re
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tasks.datapath.decode import (VideoDecodeError, count_audio_streams, fps_to_rational, iter_frames,
                                   iter_frames_at, probe, read_frames)
from tasks.datapath.encode import LOSSLESS_CODECS, VideoWriter, VideoEncodeError, ffmpeg_exe

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
WOLFGANG = SAMPLES / "WolfgangLanger_Pexels.mp4"
SINGLE_FACE = SAMPLES / "single_face.mp4"
CARPHONE = SAMPLES / "carphone_pristine.mp4"


def _fingerprint(path: Path) -> tuple[int, int, str]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


# Taken at import, before any test runs; compared by the last test.
SOURCE_FINGERPRINTS = {path: _fingerprint(path) for path in (WOLFGANG, SINGLE_FACE, CARPHONE)}


def _encode(path: Path, frames: np.ndarray, fps: str, codec: str = "x264rgb", audio: Path | None = None) -> Path:
    with VideoWriter(path, frames.shape[2], frames.shape[1], fps, audio_source=audio, codec=codec) as writer:
        writer.write(frames[:3])  # a batch, a single frame, then the rest
        writer.write(frames[3])
        writer.write(frames[4:])
    return path


def _audio_packets(path: Path) -> list[tuple[float, int, str]]:
    """(pts in seconds, size, CRC) of every audio packet, read by stream copy (no decoding)."""
    result = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-i", str(path), "-map", "0:a", "-c", "copy", "-f", "framecrc", "-"],
        capture_output=True, text=True, check=True,
    )
    num, den = map(int, re.search(r"^#tb 0: (\d+)/(\d+)", result.stdout, re.M).groups())
    packets = []
    for line in result.stdout.splitlines():
        if not line.startswith("#"):
            _, _, pts, _, size, crc = [field.strip() for field in line.split(",")[:6]]
            packets.append((int(pts) * num / den, int(size), crc))
    return packets


@pytest.fixture(scope="module")
def wolfgang_head() -> np.ndarray:
    return read_frames(WOLFGANG, range(12))


@pytest.mark.parametrize(
    ("path", "size", "frames", "rate", "audio"),
    [
        (WOLFGANG, (640, 360), 472, "24000/1001", 1),
        (SINGLE_FACE, (640, 360), 72, "30/1", 1),
        (CARPHONE, (176, 144), 120, "30000/1001", 0),
    ],
)
def test_probe_samples(path: Path, size: tuple[int, int], frames: int, rate: str, audio: int) -> None:
    info = probe(path)
    assert (info.width, info.height) == size
    assert info.frame_count == frames
    assert info.fps_rational == rate
    assert info.fps == pytest.approx(float(Fraction(rate)))
    assert info.audio_streams == audio == count_audio_streams(path)
    assert info.duration_s == pytest.approx(frames / float(Fraction(rate)))


@pytest.mark.parametrize(
    ("fps", "rational"),
    [(24000 / 1001, "24000/1001"), (30000 / 1001, "30000/1001"), (60000 / 1001, "60000/1001"), (25.0, "25/1"), (12.5, "25/2")],
)
def test_fps_to_rational(fps: float, rational: str) -> None:
    assert fps_to_rational(fps) == rational


@pytest.mark.parametrize(("batch_size", "start", "stop"), [(10, 0, None), (7, 5, 40), (100, 70, None)])
def test_iter_frames_covers_each_frame_once_in_order(batch_size: int, start: int, stop: int | None) -> None:
    expected = read_frames(SINGLE_FACE, range(72))[start:stop]
    batches = list(iter_frames(SINGLE_FACE, batch_size=batch_size, start=start, stop=stop))
    assert [first for first, _ in batches] == list(range(start, 72 if stop is None else stop, batch_size))
    assert all(batch.shape[1:] == (360, 640, 3) and batch.dtype == np.uint8 for _, batch in batches)
    assert all(len(batch) == batch_size for _, batch in batches[:-1])
    assert np.array_equal(np.concatenate([batch for _, batch in batches]), expected)


def test_frames_at_scattered_indices_come_in_chunks_equal_to_reading_them_at_once() -> None:
    # Out of order and across the clip: one open decoder must seek back as well as forward.
    indices = [0, 3, 40, 41, 71, 12, 60]
    parts, chunks = zip(*iter_frames_at(SINGLE_FACE, indices, chunk=3))
    assert parts == ([0, 3, 40], [41, 71, 12], [60]) and [len(c) for c in chunks] == [3, 3, 1]
    assert np.array_equal(np.concatenate(chunks), read_frames(SINGLE_FACE, range(72))[indices])
    assert list(iter_frames_at(SINGLE_FACE, [], chunk=3)) == []
    with pytest.raises(VideoDecodeError, match=r"holds 72 frames, frames \[5, 72\] were asked for"):
        list(iter_frames_at(SINGLE_FACE, [5, 72], chunk=8))


@pytest.mark.parametrize("codec", sorted(LOSSLESS_CODECS))
def test_round_trip_is_bit_exact(tmp_path: Path, wolfgang_head: np.ndarray, codec: str) -> None:
    out = _encode(tmp_path / "public.mkv", wolfgang_head, "24000/1001", codec)
    info = probe(out)
    assert (info.frame_count, info.fps_rational, info.audio_streams) == (12, "24000/1001", 0)
    decoded = np.concatenate([batch for _, batch in iter_frames(out, batch_size=5)])
    assert np.array_equal(decoded, wolfgang_head)


@pytest.mark.parametrize("codec", sorted(LOSSLESS_CODECS))
def test_odd_sized_noise_round_trips(tmp_path: Path, codec: str) -> None:
    noise = np.random.default_rng(7).integers(0, 256, size=(6, 143, 175, 3), dtype=np.uint8)
    out = _encode(tmp_path / "noise.mkv", noise, "30000/1001", codec)
    assert probe(out).fps_rational == "30000/1001"
    assert np.array_equal(read_frames(out, range(6)), noise)


@pytest.mark.parametrize(("source", "streams"), [(WOLFGANG, 1), (SINGLE_FACE, 1), (CARPHONE, 0)])
def test_audio_is_copied_untouched(tmp_path: Path, source: Path, streams: int) -> None:
    frames = np.full((8, 48, 64, 3), 128, dtype=np.uint8)
    out = _encode(tmp_path / "with_audio.mkv", frames, "25/1", audio=source)
    assert count_audio_streams(out) == streams
    assert probe(out).frame_count == 8
    if streams:
        copied, original = _audio_packets(out), _audio_packets(source)
        assert [(size, crc) for _, size, crc in copied] == [(size, crc) for _, size, crc in original]
        # Same start (an mp3's priming offset included), to Matroska's 1 ms precision.
        assert max(abs(a[0] - b[0]) for a, b in zip(copied, original)) <= 0.001


def test_failure_inside_with_leaves_no_file(tmp_path: Path, wolfgang_head: np.ndarray) -> None:
    out = tmp_path / "nested" / "public.mkv"
    with pytest.raises(RuntimeError, match="detector crashed"):
        with VideoWriter(out, 640, 360, "24000/1001") as writer:
            writer.write(wolfgang_head)
            assert not out.exists()  # nothing at the final path until close()
            raise RuntimeError("detector crashed")
    assert list(out.parent.iterdir()) == []


def test_writer_rejects_bad_frames_and_reports_ffmpeg_errors(tmp_path: Path) -> None:
    writer = VideoWriter(tmp_path / "a.mkv", 64, 48, "25/1")
    with pytest.raises(TypeError, match="uint8"):
        writer.write(np.zeros((48, 64, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="H=48, W=64"):
        writer.write(np.zeros((2, 48, 63, 3), dtype=np.uint8))
    writer.abort()

    broken = VideoWriter(tmp_path / "b.mkv", 64, 48, "25/1", audio_source=tmp_path / "missing.mp4")
    with pytest.raises(VideoEncodeError, match="missing.mp4"):
        for _ in range(100):  # ffmpeg exits at once; the pipe breaks within a few writes
            broken.write(np.zeros((10, 48, 64, 3), dtype=np.uint8))
        broken.close()
    assert list(tmp_path.iterdir()) == []


def _truncated(tmp_path: Path, source: Path, fraction: float) -> Path:
    data = source.read_bytes()
    path = tmp_path / f"cut_{source.stem}{source.suffix}"
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _decode_all(path: Path) -> int:
    probe(path)
    return sum(len(batch) for _, batch in iter_frames(path))


def test_not_a_video_empty_and_truncated_files_raise(tmp_path: Path, wolfgang_head: np.ndarray) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(VideoDecodeError, match="not a video"):
        _decode_all(text)
    with pytest.raises(VideoDecodeError, match="empty"):
        _decode_all(empty)
    for source in (WOLFGANG, SINGLE_FACE):  # moov box first, and last
        with pytest.raises(VideoDecodeError, match=source.stem):
            _decode_all(_truncated(tmp_path, source, 0.3))
    # A cut Matroska file still declares its full length: caught, not silently shorter.
    public = _encode(tmp_path / "public.mkv", wolfgang_head, "24000/1001")
    with pytest.raises(VideoDecodeError, match=r"truncated/corrupt at frame \d+: .* declares"):
        _decode_all(_truncated(tmp_path, public, 0.6))


def test_corruption_mid_file_names_the_frame(tmp_path: Path) -> None:
    data = bytearray(WOLFGANG.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 100_000] = bytes(100_000)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    decoded = 0
    with pytest.raises(VideoDecodeError, match=r"damaged\.mp4: truncated/corrupt at frame (\d+) of 472") as caught:
        for _, batch in iter_frames(damaged):
            decoded += len(batch)
    failed_at = int(re.search(r"at frame (\d+)", str(caught.value)).group(1))
    assert 0 < decoded <= failed_at < 472


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        probe(tmp_path / "absent.mp4")


def test_sources_untouched() -> None:
    assert {path: _fingerprint(path) for path in SOURCE_FINGERPRINTS} == SOURCE_FINGERPRINTS
