"""One video split at keyframes across workers: the plan, the sealed merge, and a split run
against the same video run whole (no Ray: the workers are in-process)."""
from __future__ import annotations

import copy
import threading
from pathlib import Path

import decord
import numpy as np
import pytest

from catalogs import CatalogStore
from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import probe, read_frames
from tasks.datapath.encode import VideoWriter, attach, join_segments
from tasks.datapath.keys import DataKey, generate_key_pair, parse_private_key, unwrap_data_key, wrap_data_key
from tasks.datapath.ray_actor import FaceWorkerImpl
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.seal import SealedVideo, SealError, SealWriter, merge_sealed
from tasks.datapath.segments import INDEX_STRIDE, Segment, anonymize_split, plan_segments, split_plan
from tasks.datapath.track import Roi
from tasks.datapath.video_loop import PipelineSettings

AUTHORITY = parse_private_key(generate_key_pair()[0])
VIDEO = "cd" * 32
FRAMES, KEYFRAME_EVERY = 32, 16  # conftest's keyframed_clip


def spans(segments: list[Segment]) -> list[tuple[int, int]]:
    return [(s.start, s.stop) for s in segments]


def test_the_plan_splits_at_the_keyframe_nearest_an_even_share():
    wolfgang_keys = [0, 72, 144, 216, 288, 360, 432]
    # 472 / 2 = 236: 216 is nearer than 288, and leaves 216 and 256 frames, both >= 200.
    assert spans(plan_segments(wolfgang_keys, 472, workers=2, min_frames=200)) == [(0, 216), (216, 472)]
    assert spans(plan_segments(range(0, 900, 100), 900, workers=3, min_frames=200)) == [
        (0, 300), (300, 600), (600, 900)]
    # A tie between two keyframes goes to the earlier one.
    assert spans(plan_segments([0, 16, 32], 48, workers=2, min_frames=16)) == [(0, 16), (16, 48)]


def test_the_plan_keeps_a_video_whole_when_it_cannot_split():
    keys = [0, 72, 144, 216, 288, 360, 432]
    assert spans(plan_segments(keys, 472, workers=1, min_frames=200)) == [(0, 472)]  # one worker
    assert spans(plan_segments(keys, 472, workers=2, min_frames=0)) == [(0, 472)]  # splitting off
    assert spans(plan_segments(keys, 472, workers=2, min_frames=240)) == [(0, 472)]  # shorter than 2 x 240
    assert spans(plan_segments([0], 1000, workers=2, min_frames=100)) == [(0, 1000)]  # a single keyframe
    # Keyframes only near the ends: no border leaves both sides long enough.
    assert spans(plan_segments([0, 10, 990], 1000, workers=2, min_frames=100)) == [(0, 1000)]


def test_the_plan_cuts_a_long_video_into_more_segments_than_workers():
    # 1000 frames, at most 300 per segment: 4 segments (ceil(1000 / 300)), borders at 250, 500, 750.
    assert spans(plan_segments(range(0, 1000, 50), 1000, workers=2, min_frames=100, max_frames=300)) == [
        (0, 250), (250, 500), (500, 750), (750, 1000)]


def _rois(frame_index: int) -> list[Roi]:
    return [Roi(frame_index, 0, 10 + frame_index, 20, 40, 44, None, False)]


_ENVELOPES: dict[tuple[str, str], list] = {}


def _seal_part(path: Path, frames: np.ndarray, first: int, data_key: DataKey, index_base: int,
               video_id: str = VIDEO) -> None:
    # Wrapping draws fresh randomness: a video's segments share the one envelope, as in anonymize_split.
    envelope = _ENVELOPES.setdefault((data_key.key_id, video_id),
                                     wrap_data_key(data_key, [AUTHORITY.public], video_id))
    writer = SealWriter(path, video_id, data_key, envelope, "exact", index_base=index_base)
    for i, frame in enumerate(frames):
        writer.add(first + i, frame, _rois(first + i))
    writer.close()


def test_merged_sealed_segments_restore_like_one_file(clips, tmp_path):
    frames = read_frames(clips["wolfgang"], range(8))
    data_key = DataKey.generate()
    # One sequence crosses the border: chunk index 0 in both segments but for the base.
    _seal_part(tmp_path / "a.uuseal", frames[:5], 0, data_key, 0)
    _seal_part(tmp_path / "b.uuseal", frames[5:], 5, data_key, INDEX_STRIDE)
    size = merge_sealed([tmp_path / "a.uuseal", tmp_path / "b.uuseal"], tmp_path / "merged.uuseal", data_key)
    assert size == (tmp_path / "merged.uuseal").stat().st_size
    sealed = SealedVideo(tmp_path / "merged.uuseal")
    sealed.unlock(unwrap_data_key(sealed.envelope, AUTHORITY, sealed.video_id))
    restored = {f: items for f, items in sealed.crops_by_frame()}
    assert sealed.failures == [] and sealed.chunk_count == 2
    assert sorted(restored) == list(range(8))
    for f, [(roi, pixels)] in restored.items():
        assert (roi.x, roi.seq_id) == (10 + f, 0)
        np.testing.assert_array_equal(pixels, frames[f, 20:64, 10 + f:50 + f])
    assert sorted(sealed.roi_lists()) == list(range(8))


def test_a_merge_refuses_segments_that_would_collide_or_belong_to_another_video(clips, tmp_path):
    frames = read_frames(clips["wolfgang"], range(4))
    data_key = DataKey.generate()
    _seal_part(tmp_path / "a.uuseal", frames[:2], 0, data_key, 0)
    _seal_part(tmp_path / "same-base.uuseal", frames[2:], 2, data_key, 0)
    _seal_part(tmp_path / "other.uuseal", frames[2:], 2, data_key, INDEX_STRIDE, video_id="ef" * 32)
    with pytest.raises(SealError, match="same kind, sequence and index"):
        merge_sealed([tmp_path / "a.uuseal", tmp_path / "same-base.uuseal"], tmp_path / "m1.uuseal", data_key)
    with pytest.raises(SealError, match="header differs"):
        merge_sealed([tmp_path / "a.uuseal", tmp_path / "other.uuseal"], tmp_path / "m2.uuseal", data_key)


SETTINGS = PipelineSettings(model="keyed-permutation", seal="exact", detect_every=1, segment_frames=KEYFRAME_EVERY,
                            release_check_frames=6, progress_style="lines")


@pytest.fixture(scope="module")
def worker() -> FaceWorkerImpl:
    return FaceWorkerImpl(SETTINGS)


def in_process(worker: FaceWorkerImpl, fail_on: str | None = None):
    """A `call` for anonymize_split that runs the worker's methods here, one at a time."""
    lock = threading.Lock()

    def call(method: str, *args):
        with lock:
            if method == fail_on:
                raise RuntimeError(f"{method} failed (test)")
            return getattr(worker, method)(*args)
    return call


@pytest.fixture(scope="module")
def split_and_whole(keyframed_clip, worker, tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    segments = split_plan(keyframed_clip, 2, SETTINGS)
    runs = {}
    for name in ("split", "whole"):
        catalog = CatalogStore(out / name / "catalogs")
        if name == "split":
            record = anonymize_split(keyframed_clip, out / name / "public.mkv", segments, in_process(worker), 2,
                                     recipients=[AUTHORITY.public], video_id=VIDEO, settings=SETTINGS,
                                     run_id="run", catalog=catalog)
        else:
            record = anonymize_video(keyframed_clip, out / name / "public.mkv", recipients=[AUTHORITY.public],
                                     video_id=VIDEO, detector=worker.detector, swapper=worker.swapper,
                                     settings=SETTINGS, run_id="run", catalog=catalog, judge=worker.judge,
                                     progress=False)
        runs[name] = dict(record=record, catalog=catalog, public=out / name / "public.mkv")
    return dict(segments=segments, out=out, **runs)


def test_a_split_video_keeps_every_frame_its_times_and_its_audio(split_and_whole, keyframed_clip):
    assert spans(split_and_whole["segments"]) == [(0, 16), (16, FRAMES)]
    record, public = split_and_whole["split"]["record"], split_and_whole["split"]["public"]
    source, written = probe(keyframed_clip), probe(public)
    assert record.frame_count == written.frame_count == source.frame_count == FRAMES
    assert written.audio_streams == source.audio_streams == 1
    times = [decord.VideoReader(str(p)).get_frame_timestamp(range(FRAMES))[:, 0] for p in (keyframed_clip, public)]
    assert np.abs(times[0] - times[1]).max() < 0.002  # Matroska keeps milliseconds
    assert not [p.name for p in public.parent.iterdir() if p.name.startswith(".")], "no partial file left"


def test_a_split_video_has_the_rois_and_sequences_of_the_whole_one(split_and_whole):
    def rows(name: str, table: str, columns: list[str]) -> list[tuple]:
        frame = split_and_whole[name]["catalog"].read(table)[columns]
        return sorted(map(tuple, frame.itertuples(index=False)))

    roi_columns = ["frame_index", "seq_id", "x", "y", "w", "h"]
    split_rois = rows("split", "rois", roi_columns)
    assert split_rois == rows("whole", "rois", roi_columns)
    # The face present throughout is one sequence across the border at frame 16, so one virtual identity.
    assert {seq for f, seq, *_ in split_rois if f in (15, 16)} == {0}
    sequence_columns = ["seq_id", "first_frame", "last_frame", "n_frames"]
    assert rows("split", "sequences", sequence_columns) == rows("whole", "sequences", sequence_columns)
    split, whole = split_and_whole["split"]["record"], split_and_whole["whole"]["record"]
    assert (split.faces, split.sequences, split.frames_with_faces) == (whole.faces, whole.sequences,
                                                                        whole.frames_with_faces)
    assert split.frames_checked == whole.frames_checked >= 3  # the same sample, shared out among the workers


def test_a_split_video_restores_bit_exact_from_its_merged_sealed_data(split_and_whole, keyframed_clip, worker):
    public, out = split_and_whole["split"]["public"], split_and_whole["out"]
    restored = reconstruct_video(public, out / "restored.mkv", private_key=AUTHORITY, swapper=worker.swapper,
                                 settings=SETTINGS, progress=False)
    assert (restored.restore_path, restored.frames, restored.chunks_failed) == ("sealed", FRAMES, 0)
    rois = split_and_whole["split"]["catalog"].read("rois")
    frames = [0, 15, 16, 17, FRAMES - 1]
    back, source = read_frames(out / "restored.mkv", frames), read_frames(keyframed_clip, frames)
    for i, f in enumerate(frames):
        for r in rois[rois.frame_index == f].itertuples():
            region = (slice(r.y, r.y + r.h), slice(r.x, r.x + r.w))
            np.testing.assert_array_equal(back[i][region], source[i][region])


def test_a_failed_segment_leaves_nothing_behind(keyframed_clip, worker, tmp_path):
    catalog = CatalogStore(tmp_path / "catalogs")
    with pytest.raises(RuntimeError, match="render_segment failed"):
        anonymize_split(keyframed_clip, tmp_path / "public" / "x.mkv", split_plan(keyframed_clip, 2, SETTINGS),
                        in_process(worker, fail_on="render_segment"), 2, recipients=[AUTHORITY.public],
                        video_id=VIDEO, settings=SETTINGS, run_id="run", catalog=catalog)
    assert list((tmp_path / "public").iterdir()) == []


@pytest.mark.parametrize("late", [0.0, 0.5])  # 0.5: the picture starts half a second after the sound
def test_joined_segments_keep_a_variable_rate_sources_times_and_audio(tmp_path, late: float):
    from tests.datapath.test_decode_encode import SINGLE_FACE, _audio_packets
    from tests.datapath.test_real_world_footage import FPS, STRETCH_FROM, _ffmpeg

    source = tmp_path / "vfr.mp4"
    stretch = f"setpts='if(lt(N,{STRETCH_FROM}),N,{STRETCH_FROM}+(N-{STRETCH_FROM})*3)/({FPS}*TB)+{late}/TB'"
    _ffmpeg("-i", str(SINGLE_FACE), "-frames:v", "40", "-vf", stretch, "-fps_mode", "vfr", "-c:v", "libx264",
            "-preset", "ultrafast", "-g", "10", "-keyint_min", "10", "-sc_threshold", "0", "-c:a", "aac", str(source))
    info = probe(source)
    assert info.frame_times is not None and info.frame_times[0] == pytest.approx(late, abs=0.0011)
    starts, parts = [0, 20], []
    for k, (start, stop) in enumerate([(0, 20), (20, 40)]):
        parts.append(tmp_path / f"seg{k}.mkv")
        with VideoWriter(parts[-1], info.width, info.height, info.fps_rational, codec="h264") as writer:
            writer.write(read_frames(source, range(start, stop)))
    assert join_segments(parts, starts, tmp_path / "joined.mkv", info.fps, info.frame_times) == 40
    (tmp_path / "sealed").write_bytes(b"stands in for the sealed data")
    attach(tmp_path / "joined.mkv", tmp_path / "sealed", tmp_path / "public.mkv", "sealed", audio_from=source)
    written = probe(tmp_path / "public.mkv")
    assert written.frame_count == 40 and written.frame_times is not None
    assert np.allclose(written.frame_times, info.frame_times, atol=0.0011)  # Matroska keeps milliseconds
    assert np.abs(read_frames(tmp_path / "public.mkv", range(40)).astype(int)
                  - read_frames(source, range(40))).mean() < 3.0
    # Every audio packet as it was, and where it was: the late picture did not slide onto the sound.
    kept, original = _audio_packets(tmp_path / "public.mkv"), _audio_packets(source)
    assert [p[1:] for p in kept] == [p[1:] for p in original]
    assert np.allclose([p[0] for p in kept], [p[0] for p in original], atol=0.0011)


def test_a_split_lossless_video_carries_each_frames_payload_and_reverses_by_the_learned_path(keyframed_clip,
                                                                                              worker, tmp_path):
    settings = PipelineSettings(model="keyed-permutation", public_format="x264rgb", seal="none", detect_every=1,
                                segment_frames=KEYFRAME_EVERY, release_check_frames=4, progress_style="lines")
    lossless = copy.copy(worker)  # the same models (none depends on the format or the seal), other settings
    lossless.settings = settings
    record = anonymize_split(keyframed_clip, tmp_path / "public.mkv", split_plan(keyframed_clip, 2, settings),
                             in_process(lossless), 2, recipients=[AUTHORITY.public], video_id=VIDEO,
                             settings=settings, run_id="run", catalog=None)
    assert record.frame_count == FRAMES and record.faces >= FRAMES and not record.needs_review
    restored = reconstruct_video(tmp_path / "public.mkv", tmp_path / "restored.mkv", private_key=AUTHORITY,
                                 swapper=lossless.swapper, settings=settings, progress=False)
    # Each segment hid its frames' payloads under their frame numbers in the whole video.
    assert (restored.restore_path, restored.frames_with_payload, restored.frames_payload_invalid) == (
        "learned", FRAMES, 0)
    assert restored.rois_restored == record.faces
