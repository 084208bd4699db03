"""Footage as real archives hold it: variable frame rate, display rotation, a size that changes
mid-stream. Each clip is made here from the bundled footage with the ffmpeg we ship."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import (
    VideoDecodeError,
    flush_redecodes,
    iter_frames,
    iter_frames_at,
    keyframe_indices,
    probe,
    read_frames,
)
from tasks.datapath.deidentify import FaceSwapper, load_face_pair
from tasks.datapath.encode import VideoWriter, audio_codec, ffmpeg_exe
from tasks.datapath.keys import generate_key_pair, parse_private_key
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.video_loop import PipelineSettings
from tests.datapath.test_anonymize_reconstruct import FixedBoxDetector
from tests.datapath.test_decode_encode import SINGLE_FACE, _audio_packets

FPS = 30
STRETCH_FROM = 25  # frames from here on last three nominal frames each


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-v", "error", "-y", *args], check=True)


def _expected_start(n: int) -> float:
    return (n if n < STRETCH_FROM else STRETCH_FROM + (n - STRETCH_FROM) * 3) / FPS


@pytest.fixture(scope="module")
def vfr_clips(tmp_path_factory) -> dict[str, Path]:
    """40 frames of single_face with audio; the timestamps stretched 3x after frame 25, as .mkv and .mp4."""
    root = tmp_path_factory.mktemp("vfr")
    stretch = f"setpts='if(lt(N,{STRETCH_FROM}),N,{STRETCH_FROM}+(N-{STRETCH_FROM})*3)/({FPS}*TB)'"
    clips = {}
    for suffix in ("mkv", "mp4"):
        clips[suffix] = root / f"vfr.{suffix}"
        _ffmpeg("-i", str(SINGLE_FACE), "-frames:v", "40", "-vf", stretch, "-fps_mode", "vfr", "-c:v", "libx264",
                "-preset", "ultrafast", "-c:a", "aac", str(clips[suffix]))
    return clips


@pytest.mark.parametrize("suffix", ["mkv", "mp4"])
def test_a_variable_rate_clip_is_accepted_with_each_frames_own_time(vfr_clips, suffix: str) -> None:
    info = probe(vfr_clips[suffix])  # nominal fps x frame count is 1.33 s, the track 3.0 s: not truncated
    assert info.frame_count == 40 and info.frame_times is not None
    assert np.allclose(info.frame_times, [_expected_start(n) for n in range(40)], atol=0.0015)
    assert info.duration_s == pytest.approx(_expected_start(39) + 1 / info.fps, abs=0.002)


def _rewrite(source: Path, info, out: Path) -> Path:
    """`source` through the writer as the public module writes it: h264, its audio, its frame times."""
    with VideoWriter(out, info.width, info.height, info.fps_rational, audio_source=source, codec="h264",
                     frame_times=info.frame_times) as writer:
        for _, batch in iter_frames(source, batch_size=16):
            writer.write(batch)
    return out


@pytest.mark.parametrize("suffix", ["mkv", "mp4"])
def test_the_writer_keeps_the_sources_frame_times_and_its_audio(tmp_path: Path, vfr_clips, suffix: str) -> None:
    source = vfr_clips[suffix]
    info = probe(source)
    frames = read_frames(source, range(info.frame_count))
    out = _rewrite(source, info, tmp_path / "out.mkv")
    written = probe(out)
    assert written.frame_count == 40 and written.frame_times is not None
    assert np.allclose(written.frame_times, info.frame_times, atol=0.0011)  # Matroska keeps milliseconds
    # Re-stamping moves packets, never pixels: the frames decode as encoding them on the grid would.
    assert np.abs(read_frames(out, range(40)).astype(int) - frames).mean() < 3.0
    # The audio packets are copied as they are; Matroska rounds their times to the millisecond.
    copied, original = _audio_packets(out), _audio_packets(source)
    assert [p[1:] for p in copied] == [p[1:] for p in original]
    assert np.allclose([p[0] for p in copied], [p[0] for p in original], atol=0.0006)


def test_a_picture_that_starts_after_its_sound_keeps_its_start(tmp_path: Path) -> None:
    # decord counts frame times from the first frame: a phone clip whose video starts 0.5 s
    # after its audio came out with the picture half a second early.
    source = tmp_path / "late.mp4"
    _ffmpeg("-i", str(SINGLE_FACE), "-frames:v", "30", "-vf", "setpts=PTS+0.5/TB", "-c:v", "libx264",
            "-preset", "ultrafast", "-c:a", "aac", str(source))
    info = probe(source)
    assert info.frame_times is not None and info.frame_times[0] == pytest.approx(0.5, abs=0.001)
    out = _rewrite(source, info, tmp_path / "out.mkv")
    assert np.allclose(probe(out).frame_times, info.frame_times, atol=0.0011)
    assert np.allclose([p[0] for p in _audio_packets(out)], [p[0] for p in _audio_packets(source)], atol=0.0006)


def test_public_and_restored_files_keep_a_variable_rate_sources_times_and_audio(tmp_path: Path, vfr_clips) -> None:
    source = vfr_clips["mkv"]
    authority = parse_private_key(generate_key_pair()[0])
    swapper = FaceSwapper(load_face_pair("keyed-permutation", None))
    settings = PipelineSettings(model="keyed-permutation", batch_size=16, release_check_frames=4)
    record = anonymize_video(source, tmp_path / "public.mkv", recipients=[authority.public], video_id="ab" * 32,
                             detector=FixedBoxDetector(), swapper=swapper, settings=settings, run_id="vfr",
                             progress=False)
    reconstruct_video(tmp_path / "public.mkv", tmp_path / "restored.mkv", private_key=authority, swapper=swapper,
                      settings=settings, progress=False)
    times = probe(source).frame_times
    for name in ("public.mkv", "restored.mkv"):
        written = probe(tmp_path / name)
        assert record.frame_count == written.frame_count == 40
        assert written.frame_times is not None and np.allclose(written.frame_times, times, atol=0.0011)
        assert [p[1:] for p in _audio_packets(tmp_path / name)] == [p[1:] for p in _audio_packets(source)]


def test_frame_times_that_do_not_match_the_frames_written_are_an_error(tmp_path: Path) -> None:
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    writer = VideoWriter(tmp_path / "x.mkv", 16, 16, "30/1", codec="x264rgb", frame_times=[0.0, 0.5])
    writer.write(frames)
    with pytest.raises(Exception, match="3 frames written but 2 frame times"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def rotated_clips(tmp_path_factory) -> dict[str, Path]:
    """single_face (stored 640x360), tagged to display turned: an mp4 display matrix (90 degrees
    counter-clockwise) and a legacy Matroska `rotate` tag (90 degrees clockwise)."""
    root = tmp_path_factory.mktemp("rotated")
    plain = root / "plain.mkv"
    _ffmpeg("-i", str(SINGLE_FACE), "-frames:v", "12", "-c:v", "libx264", "-preset", "ultrafast", "-an", str(plain))
    matrix, tag = root / "matrix.mp4", root / "tag.mkv"
    _ffmpeg("-display_rotation:v:0", "90", "-i", str(plain), "-c", "copy", str(matrix))
    _ffmpeg("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(tag))
    return {"plain": plain, "matrix": matrix, "tag": tag}


@pytest.mark.parametrize(("kind", "turns"), [("matrix", 1), ("tag", -1)])
def test_rotated_clips_decode_upright_at_their_upright_size(rotated_clips, kind: str, turns: int) -> None:
    info = probe(rotated_clips[kind])
    assert (info.width, info.height) == (360, 640)
    stored = read_frames(rotated_clips["plain"], range(12))
    upright = np.rot90(stored, turns, axes=(1, 2))
    assert np.array_equal(read_frames(rotated_clips[kind], range(12)), upright)
    batches = [batch for _, batch in iter_frames(rotated_clips[kind], batch_size=5)]
    assert np.array_equal(np.concatenate(batches), upright)


@pytest.mark.parametrize("kind", ["matrix", "tag"])
def test_the_pyav_path_turns_rotated_clips_upright_as_decord_does(rotated_clips, kind: str) -> None:
    by_decord = np.concatenate([b for _, b in iter_frames(rotated_clips[kind], batch_size=5, via="decord")])
    by_pyav = np.concatenate([b for _, b in iter_frames(rotated_clips[kind], batch_size=5, via="pyav")])
    assert by_pyav.shape == by_decord.shape and np.array_equal(by_pyav, by_decord)


def test_flush_redecodes_counts_the_frames_decoded_again_after_each_flush() -> None:
    # Batches start at 0, 32, 64, 96; each one after the first restarts from the keyframe before it.
    assert flush_redecodes([0], 0, 100, 32) == 32 + 64 + 96
    assert flush_redecodes([0, 50], 0, 100, 32) == 32 + (64 - 50) + (96 - 50)
    assert flush_redecodes(range(0, 100, 32), 0, 100, 32) == 0  # our encoder's keyframes
    assert flush_redecodes([0], 10, 20, 32) == 0  # a single batch is never flushed


@pytest.fixture(scope="module")
def one_keyframe(tmp_path_factory) -> Path:
    """150 frames of single_face (looped) with a keyframe at frame 0 only (as long phone or camera exports)."""
    path = tmp_path_factory.mktemp("gop") / "one_keyframe.mp4"
    _ffmpeg("-stream_loop", "2", "-i", str(SINGLE_FACE), "-frames:v", "150", "-an", "-c:v", "libx264", "-preset", "ultrafast",
            "-x264-params", "keyint=infinite:min-keyint=infinite:scenecut=0", str(path))
    return path


def test_a_single_keyframe_file_is_read_by_pyav_with_decords_pixels(one_keyframe: Path) -> None:
    assert flush_redecodes([0], 0, 150, 32) > 150  # so "auto" takes the PyAV path
    auto = list(iter_frames(one_keyframe, batch_size=32))
    assert [first for first, _ in auto] == [0, 32, 64, 96, 128] and len(auto[-1][1]) == 22
    assert np.array_equal(np.concatenate([b for _, b in auto]), read_frames(one_keyframe, range(150)))
    window = list(iter_frames(one_keyframe, batch_size=16, start=40, stop=70, via="pyav"))
    assert [first for first, _ in window] == [40, 56]
    assert np.array_equal(np.concatenate([b for _, b in window]), read_frames(one_keyframe, range(40, 70)))


def test_the_pyav_path_reports_a_file_that_ends_early(tmp_path: Path, one_keyframe: Path) -> None:
    cut = tmp_path / "cut.mp4"
    data = one_keyframe.read_bytes()
    # Keep the index (moov, at the end for ffmpeg's default mp4) but zero out the later frames' data.
    cut.write_bytes(data[:len(data) // 3] + bytes(len(data) - len(data) // 3 - 20_000) + data[-20_000:])
    with pytest.raises(VideoDecodeError, match="truncated/corrupt"):
        for _ in iter_frames(cut, batch_size=32, via="pyav"):
            pass


def test_random_access_reads_do_not_leave_decord_decoding_the_rest_of_the_file(tmp_path: Path) -> None:
    """The release check reads a sample of frames, then works on them; decord's thread must not
    use that time to decode the whole file into memory (11.6 GB for a 10 s 4K clip, before)."""
    clip = tmp_path / "long.mp4"  # 1224 frames of 640x360: 846 MB if all of it were decoded
    _ffmpeg("-stream_loop", "16", "-i", str(SINGLE_FACE), "-an", "-c:v", "libx264", "-preset", "ultrafast", str(clip))
    # VmHWM, not ru_maxrss: Linux carries the parent's peak (pytest's, with torch) into a child's ru_maxrss.
    script = ("import sys, time\n"
              "from tasks.datapath.decode import iter_frames_at\n"
              "for _ in iter_frames_at(sys.argv[1], [0, 300, 600, 900, 1200], chunk=1):\n"
              "    time.sleep(1.0)\n"
              "print([int(line.split()[1]) // 1024 for line in open('/proc/self/status')\n"
              "       if line.startswith('VmHWM:')][0])\n")
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", script, str(clip)], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": root})
    peak_mb = int(done.stdout.split()[-1])
    assert peak_mb < 300, f"peak RSS {peak_mb} MB while reading 5 frames (measured: 71 MB with the flush, 511 without)"


@pytest.fixture(scope="module")
def size_change(tmp_path_factory) -> Path:
    """A transport stream that switches from 320x180 to 640x360 after 20 frames."""
    root = tmp_path_factory.mktemp("sizes")
    small, large = root / "small.ts", root / "large.ts"
    _ffmpeg("-i", str(SINGLE_FACE), "-frames:v", "20", "-vf", "scale=320:180", "-c:v", "libx264", "-an", str(small))
    _ffmpeg("-ss", "1", "-i", str(SINGLE_FACE), "-frames:v", "20", "-c:v", "libx264", "-an", str(large))
    joined = root / "joined.ts"
    joined.write_bytes(small.read_bytes() + large.read_bytes())
    return joined


def test_a_size_change_mid_stream_is_refused_not_cropped(size_change: Path) -> None:
    with pytest.raises(VideoDecodeError, match=r"frame size changes mid-stream \(320x180, then 640x360\)"):
        probe(size_change)


def _order(frames: np.ndarray, reference: np.ndarray) -> list[int]:
    """For each frame, the index of the reference frame it is closest to (mean absolute difference)."""
    ref = reference.astype(np.int16)
    return [int(np.argmin(np.abs(ref - f.astype(np.int16)).mean(axis=(1, 2, 3)))) for f in frames]


@pytest.fixture(scope="module")
def unindexed_clips(tmp_path_factory) -> dict[str, Path]:
    """24 moving frames of the Wolfgang sample (and its lossless original), in containers without a
    frame index: MPEG-2 in .ts, .mpg and .vob, H.264 in .ts, WMV, and a .ts spliced from two
    recordings whose clocks are 1000 s apart."""
    root = tmp_path_factory.mktemp("unindexed")
    source = root / "source.mkv"
    _ffmpeg("-ss", "2", "-i", str(SINGLE_FACE.parent / "WolfgangLanger_Pexels.mp4"), "-frames:v", "24",
            "-c:v", "ffv1", "-c:a", "flac", str(source))
    clips = {"source": source}
    for name, args in {"mpeg2.ts": ["-c:v", "mpeg2video", "-q:v", "2", "-c:a", "mp2", "-f", "mpegts"],
                       "mpeg2.mpg": ["-c:v", "mpeg2video", "-q:v", "2", "-c:a", "mp2", "-f", "mpeg"],
                       "mpeg2.vob": ["-c:v", "mpeg2video", "-q:v", "2", "-c:a", "mp2", "-f", "vob"],
                       "h264.ts": ["-c:v", "libx264", "-crf", "12", "-c:a", "aac", "-f", "mpegts"],
                       "clip.wmv": ["-c:v", "wmv2", "-q:v", "2", "-c:a", "wmav2"]}.items():
        clips[name] = root / name
        _ffmpeg("-i", str(source), *args, str(clips[name]))
    first, second = root / "first.ts", root / "second.ts"
    _ffmpeg("-i", str(source), "-frames:v", "12", "-c:v", "mpeg2video", "-q:v", "2", "-an", "-f", "mpegts", str(first))
    _ffmpeg("-ss", "0.5", "-i", str(source), "-c:v", "mpeg2video", "-q:v", "2", "-an", "-output_ts_offset", "1000",
            "-f", "mpegts", str(second))
    clips["spliced.ts"] = root / "spliced.ts"
    clips["spliced.ts"].write_bytes(first.read_bytes() + second.read_bytes())
    return clips


@pytest.mark.parametrize("name", ["mpeg2.ts", "mpeg2.mpg", "mpeg2.vob", "h264.ts", "clip.wmv"])
def test_files_without_a_frame_index_are_read_frame_for_frame(unindexed_clips, name: str) -> None:
    # decord returned these frames shifted by up to 8 (or failed at frame 0 on the H.264 .ts).
    path, reference = unindexed_clips[name], read_frames(unindexed_clips["source"], range(24))
    info = probe(path)
    assert (info.frame_count, info.width, info.height, info.audio_streams) == (24, 640, 360, 1)
    assert keyframe_indices(path) == ([0], 24)  # no seeking: such a file is never split across workers
    frames = np.concatenate([batch for _, batch in iter_frames(path, batch_size=5)])
    assert _order(frames, reference) == list(range(24))
    assert np.abs(frames.astype(np.int16) - reference).mean() < 4  # the codec's loss, not other frames
    picked = [0, 7, 8, 23]
    chunks = list(iter_frames_at(path, picked, 3))
    assert [part for part, _ in chunks] == [[0, 7, 8], [23]]
    assert np.array_equal(np.concatenate([batch for _, batch in chunks]), frames[picked])


def test_a_stream_spliced_from_two_recordings_keeps_both_in_order_with_the_jump(unindexed_clips) -> None:
    # decord gave the second recording's frames first, then its last frame 12 times, status done.
    path, reference = unindexed_clips["spliced.ts"], read_frames(unindexed_clips["source"], range(24))
    info = probe(path)
    assert info.frame_count == 24 and info.frame_times is not None
    times = np.asarray(info.frame_times)
    assert np.all(np.diff(times) > 0) and 999 < times[12] - times[11] < 1001  # the clocks' jump, kept
    frames = np.concatenate([batch for _, batch in iter_frames(path, batch_size=8)])
    # The first 12 source frames, then the source from 0.5 s (frame 12 at 24 fps): every frame in its place.
    assert _order(frames, reference) == list(range(24))


def test_camera_audio_matroska_cannot_restamp_is_kept_losslessly_as_flac(tmp_path: Path, vfr_clips) -> None:
    # G.711 µ-law beside a variable-rate picture, as IP cameras record: re-stamping the packets
    # (PyAV) failed with "'matroska' format does not support 'pcm_mulaw' codec", status failed.
    source = tmp_path / "ipcam.mov"
    _ffmpeg("-i", str(vfr_clips["mp4"]), "-c:v", "copy", "-c:a", "pcm_mulaw", "-ar", "8000", "-ac", "1", str(source))
    assert audio_codec(source) == "flac" and audio_codec(vfr_clips["mkv"]) == "copy"
    info = probe(source)
    assert info.frame_times is not None
    out = _rewrite(source, info, tmp_path / "out.mkv")
    assert np.allclose(probe(out).frame_times, info.frame_times, atol=0.0011)

    def samples(path: Path) -> np.ndarray:  # the decoded sound, as 16-bit PCM
        result = subprocess.run([ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:a", "-f", "s16le", "-"],
                                capture_output=True, check=True)
        return np.frombuffer(result.stdout, dtype=np.int16)

    kept, original = samples(out), samples(source)
    assert len(kept) == len(original) > 8000 and np.array_equal(kept, original)  # FLAC: every sample as decoded
