"""Faults around the flows: a second run on one folder, a run that dies, a transient failure
(retried by the next run) against a permanent one (not), leftovers of a dead writer."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from prefect.artifacts import Artifact

import flows
import flows.anonymize
from catalogs import CatalogStore, new_run_id, utc_now
from flows.anonymize import anonymize_archive
from flows.runtime import OutputFolderBusy, close_stale_runs, failure_status, markdown_table, output_folder_lock
from tasks.datapath.decode import VideoDecodeError
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
