"""End to end: the real Prefect flows on real (tiny) clips, with Ray actors on 2 CPUs."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from catalogs import CatalogStore
from catalogs.audit import verify_audit_chain
from flows.anonymize import anonymize_archive
from flows.reconstruct import reconstruct_streams
from tasks.datapath.catalog_check import check_output_folder
from tasks.datapath.decode import probe, read_frames
from tasks.datapath.keys import KeyFileError, write_key_pair


@pytest.fixture(scope="module")
def archive(clips, tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    (root / "cam1").mkdir()
    (root / "cam2" / "night").mkdir(parents=True)
    shutil.copy(clips["wolfgang"], root / "cam1" / "entrance.mp4")
    shutil.copy(clips["carphone"], root / "cam2" / "night" / "lobby.mp4")
    (root / "cam2" / "broken.mp4").write_text("this is not a video\n")
    (root / "cam2" / "notes.txt").write_text("ignored: not a video suffix\n")
    return root


@pytest.fixture(scope="module")
def first_run(archive, tmp_path_factory, prefect_harness, ray_session):
    out = tmp_path_factory.mktemp("out")
    # The authority keeps its private key elsewhere: the anonymizer is handed the .pub alone.
    authority = tmp_path_factory.mktemp("authority")
    nightly = tmp_path_factory.mktemp("nightly-host")
    public = write_key_pair(authority / "authority.key", authority / "authority.pub")
    (authority / "authority.pub").rename(nightly / "authority.pub")
    before = {p: p.read_bytes() for p in archive.rglob("*") if p.is_file()}
    rows = anonymize_archive(str(archive), str(out), public_keys=[str(nightly / "authority.pub")],
                             model="keyed-permutation", workers=1)
    return dict(out=out, private_key=authority / "authority.key", public_key=nightly / "authority.pub",
                fingerprint=public.fingerprint, rows=rows, before=before)


def test_every_video_is_anonymized_into_the_same_relative_path(first_run, archive):
    out = first_run["out"]
    assert (out / "public" / "cam1" / "entrance.mkv").is_file()
    assert (out / "public" / "cam2" / "night" / "lobby.mkv").is_file()
    assert not list((out / "public").rglob(".*")), "no temporary files left behind"
    for source, public in [("cam1/entrance.mp4", "cam1/entrance.mkv"), ("cam2/night/lobby.mp4", "cam2/night/lobby.mkv")]:
        s, p = probe(archive / source), probe(out / "public" / public)
        assert (p.frame_count, p.fps_rational, p.width, p.height, p.audio_streams) == (
            s.frame_count, s.fps_rational, s.width, s.height, s.audio_streams)


def test_originals_are_never_modified(first_run, archive):
    for path, content in first_run["before"].items():
        assert path.read_bytes() == content


def test_a_broken_file_is_recorded_as_failed_and_the_run_goes_on(first_run):
    videos = CatalogStore(first_run["out"] / "catalogs").read("videos")
    by_name = {row["source_path"].split("/")[-1]: row for row in videos.to_dict("records")}
    assert set(by_name) == {"entrance.mp4", "lobby.mp4", "broken.mp4"}
    assert by_name["broken.mp4"]["status"] == "failed"
    assert "VideoDecodeError" in by_name["broken.mp4"]["error"]
    assert by_name["entrance.mp4"]["status"] == by_name["lobby.mp4"]["status"] == "done"
    assert by_name["entrance.mp4"]["faces"] > 0 and by_name["entrance.mp4"]["frame_count"] == 24


def test_catalogs_hold_rois_sequences_and_the_run(first_run):
    catalog = CatalogStore(first_run["out"] / "catalogs")
    videos, rois, sequences = catalog.read("videos"), catalog.read("rois"), catalog.read("sequences")
    done = videos[videos["status"] == "done"]
    assert set(rois["video_id"]) <= set(done["video_id"])
    assert len(rois) == int(done["faces"].sum())
    assert set(sequences["video_id"]) == set(rois["video_id"])
    (run,) = catalog.read("runs").to_dict("records")
    assert (run["n_videos"], run["n_done"], run["n_failed"], run["status"]) == (3, 2, 1, "failed")


def test_only_fingerprints_reach_the_catalogs_and_the_public_files_are_sealed_to_them(first_run):
    catalog = CatalogStore(first_run["out"] / "catalogs")
    videos = catalog.read("videos")
    done = videos[videos["status"] == "done"]
    assert set(done["recipients"]) == {first_run["fingerprint"]}
    assert set(done["public_format"]) == {"h264"} and set(done["seal"]) == {"high"}
    assert (done["sealed_bytes"] > 0).all() and (done["public_bytes"] > done["sealed_bytes"]).all()
    key_body = b"".join(first_run["private_key"].read_bytes().splitlines()[1:-1])
    for p in (first_run["out"] / "catalogs").rglob("*.parquet"):
        assert key_body not in p.read_bytes()
    assert (first_run["out"] / "public" / "cam1" / "entrance.mkv").stat().st_mode & 0o777 == 0o644


def test_a_second_run_processes_nothing_and_duplicates_nothing(first_run, archive):
    out = first_run["out"]
    catalog = CatalogStore(out / "catalogs")
    n_videos = len(catalog.read("videos"))
    rows = anonymize_archive(str(archive), str(out), public_keys=[str(first_run["public_key"])],
                             model="keyed-permutation", workers=1)
    assert sorted(r["status"] for r in rows) == ["skipped (done before)"] * 2 + ["skipped (failed before)"]
    assert len(catalog.read("videos")) == n_videos
    assert len(catalog.read("runs")) == 2


def test_reconstruct_flow_restores_from_the_public_streams_alone(first_run, archive):
    out = first_run["out"]
    rows = reconstruct_streams(str(out / "public"), str(out), private_key=str(first_run["private_key"]),
                               model="keyed-permutation", workers=1)
    assert sorted(r["status"] for r in rows) == ["done", "done"]
    assert [r["release"] for r in rows] == ["passed", "passed"], "the anonymize run's release check, via the catalog"
    assert [r["restore_path"] for r in rows] == ["sealed", "sealed"]
    assert all(r["chunks"] and r["chunks"].split("/")[0] == r["chunks"].split("/")[1] for r in rows)
    restored = out / "reconstructed" / "cam1" / "entrance.mkv"
    assert probe(restored).frame_count == 24 and probe(restored).audio_streams == 1
    audit = CatalogStore(out / "catalogs").read("audit")
    assert len(audit) == 2 and (audit["chunks_failed"] == 0).all()
    assert set(audit["key_fingerprint"]) == {first_run["fingerprint"]} and audit["host"].notna().all()
    assert (audit["psnr_roi"] >= 42).all(), "the catalog led the flow to the sources; sealed faces within 42 dB"
    source = read_frames(archive / "cam1" / "entrance.mp4", [0])[0].astype(int)
    public = read_frames(out / "public" / "cam1" / "entrance.mkv", [0])[0].astype(int)
    rebuilt = read_frames(restored, [0])[0].astype(int)
    assert np.abs(rebuilt - source).mean() < np.abs(public - source).mean()
    assert verify_audit_chain(CatalogStore(out / "catalogs")) is None


def test_a_key_that_is_no_recipient_fails_each_video_clearly_and_writes_nothing(first_run, tmp_path):
    out = first_run["out"]
    write_key_pair(tmp_path / "stranger.key", tmp_path / "stranger.pub")
    rows = reconstruct_streams(str(out / "public"), str(tmp_path / "restore"),
                               private_key=str(tmp_path / "stranger.key"), model="keyed-permutation", workers=1)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert all("NotARecipientError" in r["error"] and first_run["fingerprint"] in r["error"] for r in rows)
    assert not (tmp_path / "restore" / "reconstructed").exists() or not list(
        (tmp_path / "restore" / "reconstructed").rglob("*.mkv"))
    audit = CatalogStore(tmp_path / "restore" / "catalogs").read("audit")
    assert list(audit["status"]) == ["failed", "failed"] and list(audit["restore_path"]) == ["none", "none"]


def test_a_public_key_given_as_the_private_key_is_refused_before_any_work(first_run, tmp_path):
    with pytest.raises(KeyFileError, match="is a public key"):
        reconstruct_streams(str(first_run["out"] / "public"), str(tmp_path), private_key=str(first_run["public_key"]),
                            model="keyed-permutation", workers=1)
    assert not (tmp_path / "catalogs").exists()


def test_the_pool_started_before_the_flow_is_the_one_the_flow_takes(ray_session):
    from flows import runtime
    from tasks.datapath.video_loop import PipelineSettings

    settings = PipelineSettings(model="keyed-permutation")
    runtime.prestart_pool(settings, 1)
    (prestarted,) = runtime._prestarted.values()
    pool = runtime.worker_pool(settings, 1)
    try:
        assert pool is prestarted and not runtime._prestarted
        assert pool.size == 1 and len(pool.describe()) == 1
    finally:
        pool.shutdown()
    # Started for other settings (a flow called with other parameters): not handed out.
    runtime.prestart_pool(settings, 1)
    (prestarted,) = runtime._prestarted.values()
    other = runtime.worker_pool(PipelineSettings(model="keyed-permutation", batch_size=8), 1)
    try:
        assert other is not prestarted and other.settings.batch_size == 8 and not runtime._prestarted
        assert len(other.describe()) == 1
    finally:
        other.shutdown()


def test_a_long_video_is_split_across_two_actors(keyframed_clip, tmp_path, prefect_harness, ray_session):
    archive, out = tmp_path / "archive", tmp_path / "out"
    archive.mkdir()
    shutil.copy(keyframed_clip, archive / "long.mp4")
    write_key_pair(tmp_path / "a.key", tmp_path / "a.pub")
    # 32 frames, a keyframe every 16, segments of at least 16: split at frame 16 for two workers.
    (row,) = anonymize_archive(str(archive), str(out), public_keys=[str(tmp_path / "a.pub")],
                               model="keyed-permutation", seal="exact", workers=2, segment_frames=16)
    assert row["status"] == "done" and row["frame_count"] == 32 and row["faces"] >= 32
    assert probe(out / "public" / "long.mkv").frame_count == 32
    assert not list((out / "public").rglob(".*")), "no segment part left behind"
    rois = CatalogStore(out / "catalogs").read("rois")
    assert sorted(rois.frame_index.unique()) == list(range(32))
    assert list((out / "catalogs").rglob("*s00001-*.parquet")), "the second segment's worker wrote its ROI rows"
    assert check_output_folder(out) == []  # the catalogs account for the joined file and nothing else
    # Restoring a split video bit for bit: tests/datapath/test_segments.py (without a cluster, to stay fast).


def test_two_sources_never_share_a_public_file():
    from flows.runtime import public_names

    sources = [Path("cam/door.mp4"), Path("cam/door.avi"), Path("cam/lobby.mp4"), Path("yard.ts"), Path("gate.mov")]
    ids = ["a", "b", "c", "d", "e"]
    # door.mp4 and door.avi would both be door.mkv; yard.mkv already holds another video of an
    # earlier run; gate.mkv holds this very video (same content, renamed source): no clash.
    written = {Path("yard.mkv"): "other", Path("gate.mkv"): "e"}
    assert public_names(sources, ids, written) == [
        Path("cam/door.mp4.mkv"), Path("cam/door.avi.mkv"), Path("cam/lobby.mkv"), Path("yard.ts.mkv"),
        Path("gate.mkv")]


def test_the_command_line_runs_an_archive_end_to_end(clips, tmp_path, capsys, prefect_harness, ray_session):
    """`python -m flows.anonymize` as a user runs it: keys checked, Prefect's server and the
    actors prestarted, the flow, the summary table, the exit status."""
    from flows.anonymize import main

    archive, out = tmp_path / "archive", tmp_path / "out"
    archive.mkdir()
    shutil.copy(clips["carphone"], archive / "lobby.mp4")
    write_key_pair(tmp_path / "a.key", tmp_path / "a.pub")
    assert main([str(archive), str(out), "--public-key", str(tmp_path / "a.pub"), "--model", "keyed-permutation",
                 "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "lobby.mp4" in printed and "1 video in" in printed
    (row,) = CatalogStore(out / "catalogs").read("videos").to_dict("records")
    assert row["status"] == "done" and row["frame_count"] == 16


def test_the_command_line_module_is_read_from_the_interpreters_arguments():
    from flows.prefect_server import command_line_module

    assert command_line_module(["/venv/bin/python", "-m", "flows.anonymize", "in", "out"]) == "flows.anonymize"
    assert command_line_module(["python3", "-u", "-m", "flows.roundtrip", "samples", "out"]) == "flows.roundtrip"
    assert command_line_module(["python", "-m", "pytest", "-q"]) == "pytest"
    assert command_line_module(["python", "script.py", "-m", "flows.anonymize"]) is None
    assert command_line_module(["python", "-c", "import flows"]) is None
    assert command_line_module(["python"]) is None


def _servers_of(prefect_home: Path) -> list[int]:
    """Pids of live Prefect API servers whose PREFECT_HOME is `prefect_home`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"prefect.server.api.server:create_app" in (proc / "cmdline").read_bytes()
                    and f"PREFECT_HOME={prefect_home}".encode() in (proc / "environ").read_bytes().split(b"\0")):
                found.append(int(proc.name))
        except OSError:  # ended while we looked, or not ours to read
            continue
    return found


def test_a_command_line_run_starts_prefects_server_before_its_imports_and_stops_it(tmp_path):
    """`python -m flows.anonymize` starts Prefect's temporary server from flows/__init__.py
    (flows/prefect_server.py), runs its flow against it, and leaves no server behind, also
    when the flow fails."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    write_key_pair(tmp_path / "a.key", tmp_path / "a.pub")
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PYTHONPATH=str(root))
    # An archive that does not exist: the flow runs and fails at once, no Ray needed.
    done = subprocess.run([sys.executable, "-m", "flows.anonymize", str(tmp_path / "none"), str(tmp_path / "out"),
                           "--public-key", str(tmp_path / "a.pub")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 1
    assert "archive folder not found" in done.stderr
    assert "Beginning flow run" in done.stderr  # the flow ran against a Prefect API ...
    assert "Starting temporary server" not in done.stderr  # ... ours: Prefect did not start its own
    assert "View at" not in done.stderr  # it serves no UI: no link to one
    assert (home / "prefect.db").is_file()  # with the database under the embedded PREFECT_HOME
    assert _servers_of(home) == []


def test_exit_promptly_runs_the_exit_handlers_flushes_and_keeps_the_status():
    """The flows' command lines end with `exit_promptly`: it skips the interpreter's teardown,
    but not what is registered at exit (the server's stop, Ray's shutdown), not output still
    in a pipe's buffer, and not a non-daemon thread's work."""
    import subprocess
    import sys

    script = (
        "import atexit, threading, time\n"
        "from flows.runtime import exit_promptly\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start()\n"
        "print('summary', end=' ')\n"
        "exit_promptly(3)\n"
        "print('never')\n")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "summary thread done\nhandler ran\n"


def test_the_largest_videos_are_asked_for_first():
    from flows.anonymize import largest_first

    sizes = {"a.mp4": 10, "b.mp4": 300, "c.mp4": 20, "d.mp4": 300}
    names = list(sizes)
    assert [names[i] for i in largest_first(list(sizes.values()))] == ["b.mp4", "d.mp4", "c.mp4", "a.mp4"]


def test_a_video_may_be_split_across_its_share_of_the_actors_or_those_left_over():
    from flows.anonymize import split_shares

    # A long file among two short ones, 2 actors: 2 x 0.92 of the bytes rounds to 2, while the
    # old rule (actors left over by the other videos: 2 - 3 + 1 = 0) kept it on one.
    assert split_shares([9_808_183, 588_804, 208_428], 2) == [2, 1, 1]
    # The bundled samples: Wolfgang is 0.67 of the bytes, 1.3 actors: not split.
    assert split_shares([1_630_000, 588_804, 208_428], 2) == [1, 1, 1]
    # Fewer videos than actors: each gets those the others leave over (4 - 2 + 1 = 3) ...
    assert split_shares([100, 100], 4) == [3, 3]
    # ... or its share when that is more (round(8 x 0.7) = 6 against 8 - 4 + 1 = 5).
    assert split_shares([70, 10, 10, 10], 8) == [6, 5, 5, 5]
    assert split_shares([0], 3) == [3]  # empty files: no share, the left-over rule alone
    assert split_shares([5, 5, 5, 5], 1) == [1, 1, 1, 1]


def test_roundtrips_prestarted_actors_have_the_settings_its_anonymize_flow_asks_for():
    """flows.roundtrip prestarts the public module's actors with pipeline_settings' defaults;
    a pool is taken only for equal settings, so they must be anonymize_archive's defaults."""
    import inspect

    from flows.anonymize import anonymize_archive, pipeline_settings

    defaults = {name: p.default for name, p in inspect.signature(anonymize_archive.fn).parameters.items()}
    names = [n for n in inspect.signature(pipeline_settings).parameters if n not in
             ("model", "weights", "public_format", "seal")]
    assert pipeline_settings("uunet", None, "h264", "high") == pipeline_settings(
        "uunet", None, "h264", "high", *(defaults[n] for n in names))
