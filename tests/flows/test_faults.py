"""Faults around the flows: a second run on one folder, a run that dies, a transient failure
(retried by the next run) against a permanent one (not), leftovers of a dead writer, a worker
killed mid-file."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import pandas as pd
import pytest
from prefect.artifacts import Artifact

import flows
import flows.anonymize
from catalogs import CatalogStore, new_run_id, utc_now
from catalogs.audit import verify_audit_chain
from flows.anonymize import anonymize_archive
from flows.reconstruct import reconstruct_streams
from flows.runtime import (
    OutputFolderBusy,
    close_stale_runs,
    failure_status,
    hidden_partials,
    markdown_table,
    output_folder_lock,
)
from tasks.datapath.catalog_check import check_output_folder
from tasks.datapath.decode import VideoDecodeError, probe
from tasks.datapath.encode import VideoEncodeError
from tasks.datapath.keys import write_key_pair
from tasks.datapath.reconstruct import NothingToRestore


def test_failures_of_the_input_are_permanent_and_the_rest_transient() -> None:
    assert failure_status(VideoDecodeError("x: truncated/corrupt")) == "failed"
    assert failure_status(NothingToRestore("x")) == "failed"
    assert failure_status(OSError(errno.ENOSPC, "No space left on device")) == "interrupted"
    assert failure_status(VideoEncodeError("ffmpeg exited with code 1")) == "interrupted"
    assert failure_status(MemoryError()) == "interrupted"


def test_a_second_run_on_a_busy_output_folder_is_refused_naming_the_holder(tmp_path, prefect_harness) -> None:
    (tmp_path / "archive").mkdir()
    with output_folder_lock(tmp_path / "out", "anonymize", "nightly-run"), pytest.raises(
            OutputFolderBusy, match=r"in use by another run \(anonymize run nightly-run, pid \d+"):
        anonymize_archive(str(tmp_path / "archive"), str(tmp_path / "out"),
                          public_keys=[str(_key(tmp_path))], model="keyed-permutation")
    # Released: the next run goes ahead (an empty archive: nothing to do).
    assert anonymize_archive(str(tmp_path / "archive"), str(tmp_path / "out"),
                             public_keys=[str(_key(tmp_path))], model="keyed-permutation") == []
    # Its summary is a Markdown artifact, for the UI of a served deployment.
    run_id = CatalogStore(tmp_path / "out" / "catalogs").read("runs")["run_id"].item()
    artifact = Artifact.get("anonymize-summary")
    assert artifact is not None and f"anonymize run {run_id}" in artifact.data
    assert "0 videos, 0 failed or interrupted" in artifact.data and "| video | frames |" in artifact.data


def test_the_markdown_summary_escapes_cells_and_marks_missing_values() -> None:
    table = markdown_table([dict(name="a|b.mp4", faces=None, fps=2.5)], [("name", "video"), ("faces", "faces"),
                                                                        ("fps", "fps")])
    assert table.splitlines() == ["| video | faces | fps |", "|---|---|---|", "| a\\|b.mp4 | - | 2.50 |"]


def _key(tmp_path):
    pub = tmp_path / "keys" / "authority.pub"
    if not pub.exists():
        pub.parent.mkdir(exist_ok=True)
        write_key_pair(pub.parent / "authority.key", pub)
    return pub


def test_a_run_that_crashes_closes_its_row_and_a_killed_one_is_closed_by_the_next(tmp_path, monkeypatch,
                                                                                   prefect_harness) -> None:
    out = tmp_path / "out"
    catalog = CatalogStore(out / "catalogs")
    killed = new_run_id()  # a run whose process was killed: its row says "running" for ever
    catalog.write_part("runs", killed, "summary", [dict(
        run_id=killed, flow="anonymize", started_at=utc_now(), output_dir=str(out), params_json="{}",
        host="h", status="running")])
    (tmp_path / "archive").mkdir()

    def scan_fails(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(flows.anonymize, "scan_videos", scan_fails)
    with pytest.raises(OSError, match="Input/output error"):
        anonymize_archive(str(tmp_path / "archive"), str(out), public_keys=[str(_key(tmp_path))],
                          model="keyed-permutation")
    runs = catalog.read("runs").set_index("run_id")
    assert len(runs) == 2 and runs.loc[killed, "status"] == "crashed"
    crashed = runs.drop(index=killed).iloc[0]
    assert crashed["status"] == "crashed" and "Input/output error" in crashed["error"]
    assert pd.notna(crashed["finished_at"])
    assert close_stale_runs(catalog, out) == []  # nothing left running


def test_a_transient_failure_is_retried_by_the_next_run_and_a_dead_writers_leftovers_removed(
        clips, tmp_path, prefect_harness, ray_session) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    (archive / "cam").mkdir(parents=True)
    shutil.copy(clips["carphone"], archive / "cam" / "lobby.mp4")
    (archive / "broken.mp4").write_text("not a video\n")
    # The public folder for cam/ cannot be created (a file is in the way): an I/O failure of the run.
    (out / "public").mkdir(parents=True)
    (out / "public" / "cam").write_text("in the way")
    key = str(_key(tmp_path))
    rows = {r["name"]: r for r in anonymize_archive(str(archive), str(out), public_keys=[key],
                                                   model="keyed-permutation", workers=1)}
    assert rows["lobby.mp4"]["status"] == "interrupted" and "FileExistsError" in rows["lobby.mp4"]["error"]
    assert rows["broken.mp4"]["status"] == "failed"
    catalog = CatalogStore(out / "catalogs")
    assert catalog.read("rois").empty and catalog.read("sequences").empty  # nothing of the failed attempt
    (out / "public" / "cam").unlink()
    (out / "public" / "cam").mkdir()
    leftover = out / "public" / "cam" / ".lobby.mkv.x1y2.partial.mkv"  # what a killed writer leaves
    leftover.write_bytes(b"\0" * 1000)
    rows = {r["name"]: r for r in anonymize_archive(str(archive), str(out), public_keys=[key],
                                                   model="keyed-permutation", workers=1)}
    assert rows["lobby.mp4"]["status"] == "done"  # tried again: its failure was the run's
    assert rows["broken.mp4"]["status"] == "skipped (failed before)"  # not: it would fail again
    assert not leftover.exists() and [p.name for p in (out / "public" / "cam").iterdir()] == ["lobby.mkv"]
    videos = catalog.read("videos")
    assert sorted(videos["status"]) == ["done", "failed", "interrupted"]
    assert set(catalog.read("rois")["run_id"]) == {videos.loc[videos["status"] == "done", "run_id"].item()}


def test_worker_log_prefixes_are_not_coloured_when_the_log_is_a_file(tmp_path) -> None:
    script = ("import os, ray, flows\n"
              "ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)\n"
              "@ray.remote\n"
              "def hello():\n"
              "    print('hello from a worker', flush=True)\n"
              "ray.get(hello.remote())\n"
              "import time; time.sleep(2)\n"  # the driver prints forwarded lines asynchronously
              "print('prefix colour', os.environ['RAY_COLOR_PREFIX'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_COLOR_PREFIX", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(Path(flows.__file__).resolve().parents[1])
    log = tmp_path / "run.log"
    with log.open("w") as out:
        subprocess.run([sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, env=env,
                       cwd=tmp_path, check=True, timeout=120)
    text = log.read_text()
    assert "prefix colour 0" in text and "hello from a worker" in text
    assert "\x1b[" not in text


def _busy_worker_pid(method: str) -> int | None:
    """The actor process running `method` now: Ray titles it `ray::FaceWorkerImpl.<method>`."""
    title = f"ray::FaceWorkerImpl.{method}".encode()
    for proc in Path("/proc").iterdir():
        with suppress(OSError):
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(title):
                return int(proc.name)
    return None


def _kill_mid_file(folder: Path, method: str, sig: int) -> dict[str, int]:
    """Start a thread that sends `sig` to the worker once its hidden partial output appears under `folder`."""
    killed: dict[str, int] = {}

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            pid = _busy_worker_pid(method) if hidden_partials(folder) else None
            if pid:
                os.kill(pid, sig)
                killed["pid"] = pid
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    return killed


def test_a_worker_that_dies_mid_file_is_diagnosed_and_each_video_ends_once(clips, tmp_path, prefect_harness,
                                                                           ray_session) -> None:
    import imageio_ffmpeg

    archive, out, restored = tmp_path / "archive", tmp_path / "out", tmp_path / "restored"
    archive.mkdir()
    # 96 frames of 176×144: the worker is killed as soon as it writes, a few seconds before it would finish.
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-stream_loop", "5", "-i", str(clips["carphone"]),
                    "-c", "copy", str(archive / "hall.mp4")], check=True)
    key = _key(tmp_path)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("prefect").addHandler(handler)
    try:
        killed = _kill_mid_file(out / "public", "anonymize", signal.SIGSEGV)
        (row,) = anonymize_archive(str(archive), str(out), public_keys=[str(key)], model="keyed-permutation",
                                   workers=1)
        assert killed, "the worker was killed mid-video"
        assert row["status"] == "done" and row["frame_count"] == 96
        # The log says why the video was retried: faulthandler's stack, read back from the actor's file.
        (why,) = [m for m in messages if "died mid-video" in m]
        assert "a native crash (Segmentation fault)" in why and "retried on a fresh worker" in why
        killed = _kill_mid_file(restored, "reconstruct", signal.SIGKILL)
        (restore,) = reconstruct_streams(str(out / "public"), str(restored), private_key=str(key.with_suffix(".key")),
                                         model="keyed-permutation", workers=1)
        assert killed, "the worker was killed mid-restore"
        (why,) = [m for m in messages if "died mid-file" in m]
        assert "killed from outside, without a crash stack" in why and "GB free" in why
    finally:
        logging.getLogger("prefect").removeHandler(handler)
    assert restore["status"] == "done" and probe(restored / "reconstructed" / "hall.mkv").frame_count == 96
    catalog = CatalogStore(out / "catalogs")
    videos = catalog.read("videos")
    assert list(videos["status"]) == ["done"]  # done exactly once, no row of the killed attempt
    rois = catalog.read("rois")
    assert sorted(rois["frame_index"]) == list(range(96))  # one face a frame, nothing of the first attempt
    assert not hidden_partials(out) and not hidden_partials(restored)
    assert check_output_folder(out) == []
    audit = CatalogStore(restored / "catalogs").read("audit")  # every attempt audited, the killed one too
    assert list(audit["status"]) == ["interrupted", "done"] and "worker died" in audit["error"].iloc[0]
    assert verify_audit_chain(CatalogStore(restored / "catalogs")) is None


class _DeadActor(Exception):
    """What Ray raises when an actor dies: its text, and the dead actor's id."""

    def __init__(self, text: str, actor_id: str | None) -> None:
        super().__init__(text)
        self.actor_id = actor_id


def test_a_death_is_put_down_to_memory_only_when_the_machine_was_nearly_out_of_it(tmp_path, monkeypatch) -> None:
    import json

    from tasks.datapath import ray_actor

    monkeypatch.setattr(ray_actor, "VITALS_DIR", tmp_path)
    gib = 2**30
    crash, vitals = ray_actor.vitals_paths("a1")
    crash.write_text("")  # faulthandler wrote nothing: no native crash
    vitals.write_text(json.dumps({"time": 100.0, "pid": 7, "rss": 20 * gib, "available": 1 * gib, "total": 24 * gib}))
    why = ray_actor.why_worker_died(_DeadActor("The actor died unexpectedly", "a1"), now=103.0)
    # 1 GB of 24 is under the 5 % line: the kernel's OOM killer is the likely cause.
    assert why == ("killed, most likely for memory (the kernel's OOM killer): it held 20.0 GB, the machine had "
                   "1.0 GB of 24.0 GB free 3 s before")
    vitals.write_text(json.dumps({"time": 100.0, "pid": 7, "rss": 2 * gib, "available": 2 * gib, "total": 24 * gib}))
    assert ray_actor.why_worker_died(_DeadActor("", "a1"), now=101.0).startswith("killed from outside")
    assert "memory monitor" in ray_actor.why_worker_died(_DeadActor("... the node running low on memory ...", "a1"))
    assert "another node" in ray_actor.why_worker_died(_DeadActor("", "elsewhere"))
    # A day after the last sample, the dead actor's files go; a live one's stay.
    os.utime(vitals, (0, 0))
    ray_actor.vitals_paths("live")[1].write_text("{}")
    ray_actor.sweep_vitals()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.vitals"]
