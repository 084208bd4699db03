"""What both flows share: Ray start-up, the pool of long-lived actors, scanning, the summary
table, and what keeps a run safe: one run per output folder, stale leftovers of a dead run
cleared, and failures told apart (the input's fault, or the run's)."""
from __future__ import annotations

import argparse
import atexit
import collections
import fcntl
import math
import os
import queue
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
import ray

from catalogs import VIDEO_SUCCESS_STATUSES, CatalogStore, utc_now
from tasks.datapath.decode import VideoDecodeError
from tasks.datapath.keys import EnvelopeError, KeyFileError, NotARecipientError
from tasks.datapath.ray_actor import FaceWorker, sweep_vitals
from tasks.datapath.reconstruct import NothingToRestore
from tasks.datapath.video_loop import PipelineSettings

LOCK_NAME = ".uunet-run.lock"
# What a failure says about the input itself: the next run would get the same answer, so it
# is recorded as `failed` and not tried again (unless asked). Anything else (a full disk,
# ffmpeg killed, a dead worker, out of memory) is the run's fault: `interrupted`, and the
# next run tries the video again.
PERMANENT_FAILURES: tuple[type[BaseException], ...] = (
    VideoDecodeError, NothingToRestore, NotARecipientError, EnvelopeError, KeyFileError, FileNotFoundError,
    ValueError)


FAILURE_STATUSES = frozenset({"failed", "interrupted"})


def exit_promptly(code: int | None) -> NoReturn:
    """`sys.exit(code)` for a flow's command line, less the interpreter's final teardown.

    What is registered to run at exit still runs, in the same order: Ray's shutdown, the
    Prefect server's stop, logging's flush. Skipped is only the teardown after it, about 1 s
    of a 12-frame run's 14 s here (torch's, Ray's and onnxruntime's native state), which
    nothing needs: every output was written, renamed and closed before `main` returned.
    """
    for thread in threading.enumerate():  # as the interpreter would, before the handlers
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


class OutputFolderBusy(RuntimeError):
    """Another run holds the output folder."""


def failure_status(cause: BaseException) -> str:
    """`failed` (the input is at fault: permanent) or `interrupted` (transient: retried next run)."""
    return "failed" if isinstance(cause, PERMANENT_FAILURES) else "interrupted"


@contextmanager
def output_folder_lock(out: Path, flow: str, run_id: str) -> Iterator[Path]:
    """Hold `out`'s run lock for the body, or raise OutputFolderBusy naming the holder.

    flock, not a marker file: the kernel drops the lock when its process dies, however it
    dies, so a crashed run never blocks the next one.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the body)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a run that has not written its name yet"
        handle.close()
        raise OutputFolderBusy(f"{out} is in use by another run ({holder}): wait for it to finish, or write "
                               "to another output folder") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{flow} run {run_id}, pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC\n")
        handle.flush()
        yield path
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def close_stale_runs(catalog: CatalogStore, out: Path) -> list[str]:
    """Mark `running` runs of this output folder as `crashed`; call holding its lock, so none
    of them can be alive. Returns their run ids."""
    runs = catalog.read("runs")
    if runs.empty:
        return []
    latest = runs.sort_values("started_at", kind="stable").drop_duplicates("run_id", keep="last")
    stale = latest[(latest["status"] == "running") & (latest["output_dir"] == str(out))]
    for row in stale.to_dict("records"):
        row = {k: (None if pd.isna(v) else v) for k, v in row.items()}
        catalog.write_part("runs", row["run_id"], "summary", [dict(
            row, status="crashed", error="the run stopped without closing its row (killed, or its host died)")])
    return [str(r) for r in stale["run_id"]]


def hidden_partials(folder: Path, output: Path | None = None) -> list[Path]:
    """Hidden temporary files our writers leave only when their process dies: all of them under
    `folder`, or only `output`'s."""
    if not folder.is_dir():
        return []
    if output is not None:
        return [p for p in output.parent.glob(f".*{output.name}.*") if ".partial" in p.name]
    return [p for p in folder.rglob(".*") if p.is_file() and ".partial" in p.name]


@contextmanager
def run_in_output_folder(catalog: CatalogStore, out: Path, outputs: Path, run_row: dict[str, Any],
                         logger: Any) -> Iterator[Callable[[list[dict[str, Any]], int, int], None]]:
    """One run's hold on its output folder, for both flows.

    Takes the lock, closes the rows of runs that were killed, removes the hidden partials
    under `outputs` that dead writers left (no writer is alive: we hold the lock), and writes
    the `running` row. Yields `finish(rows, n_videos, n_skipped)`, which writes the closing
    row; if the body raises instead, the row is closed as `crashed` with the error.
    """
    run_id = run_row["run_id"]
    with output_folder_lock(out, run_row["flow"], run_id):
        for stale in close_stale_runs(catalog, out):
            logger.warning("run %s stopped without finishing (killed, or its host died): marked crashed", stale)
        for partial in hidden_partials(outputs):
            logger.warning("removing %s, left by a run that died while writing it", partial)
            partial.unlink(missing_ok=True)
        catalog.write_part("runs", run_id, "summary", [run_row])

        def finish(rows: list[dict[str, Any]], n_videos: int, n_skipped: int) -> None:
            n_failed = sum(r["status"] in FAILURE_STATUSES for r in rows)
            catalog.write_part("runs", run_id, "summary", [dict(
                run_row, finished_at=utc_now(), n_videos=n_videos, n_done=len(rows) - n_failed,
                n_failed=n_failed, n_skipped=n_skipped, status="failed" if n_failed else "done")])

        try:
            yield finish
        except BaseException as err:  # the row must not stay "running": say how the run ended
            with suppress(OSError):  # a full disk may refuse even this; the next run closes it
                catalog.write_part("runs", run_id, "summary", [dict(
                    run_row, finished_at=utc_now(), status="crashed", error=f"{type(err).__name__}: {err}")])
            raise


def clear_attempt(catalog: CatalogStore, run_id: str, video_id: str, output: Path) -> None:
    """Before an attempt at a video, and after its last failed one: no partial file and no
    ROI or sequence rows of an earlier attempt of this run."""
    for partial in hidden_partials(output.parent, output):
        partial.unlink(missing_ok=True)
    for table in ("rois", "sequences"):
        catalog.remove_parts(table, run_id, video_id)

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".vob", ".ts", ".mts", ".m2ts",
                  ".wmv", ".asf", ".flv", ".3gp", ".y4m"}


def scan_videos(root: Path, exclude: Sequence[Path] = ()) -> list[Path]:
    """Video files under `root` by suffix, sorted; folders in `exclude` (our own outputs) are skipped."""
    excluded = [p.resolve() for p in exclude]
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in VIDEO_SUFFIXES or path.name.startswith("."):
            continue
        resolved = path.resolve()
        if any(resolved.is_relative_to(e) for e in excluded):
            continue
        found.append(path)
    return found


def start_ray(address: str | None, num_cpus: int | None = None) -> dict[str, float]:
    """Join `address` (or RAY_ADDRESS) when given, else start a private local Ray; return its resources."""
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=True)
        else:
            # Our own temp dir: the default /tmp/ray may be shared with other jobs on the machine.
            temp_dir = Path(tempfile.gettempdir()) / f"uunet-ray-{os.getuid()}"
            ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                     _temp_dir=str(temp_dir), log_to_driver=True)
    return ray.cluster_resources()


_prestarted: dict[tuple[PipelineSettings, int | None, str | None], ActorPool] = {}


def prestart_pool(settings: PipelineSettings, workers: int | None = None, ray_address: str | None = None) -> None:
    """Start Ray and ask for the actors now, for `worker_pool` to take later.

    A command-line run calls this before its flow starts: the actors then load their models
    (torch, MTCNN, the face pair: most of Ray's start-up here) while Prefect starts its
    temporary server, instead of after it. Ray itself is started on this, the main, thread:
    its processes die with the thread that started them (PR_SET_PDEATHSIG), so a helper
    thread that ended would take Ray down with it.
    """
    start_ray(ray_address)
    _prestarted[(settings, workers, ray_address)] = ActorPool(settings, workers)  # returns before they load


def worker_pool(settings: PipelineSettings, workers: int | None = None, ray_address: str | None = None) -> ActorPool:
    """The pool `prestart_pool` started for these arguments, or a new one (Ray started if needed)."""
    pool = _prestarted.pop((settings, workers, ray_address), None)
    for other in list(_prestarted):  # started for other settings: not this run's
        _prestarted.pop(other).shutdown()
    if pool is None:
        start_ray(ray_address)
        pool = ActorPool(settings, workers)
    return pool


class ActorPool:
    """Long-lived FaceWorker actors, handed out one task at a time (thread-safe).

    With GPUs in the cluster each actor takes a fraction of one (so several share a card);
    without, each takes `cpus_per_worker` CPUs and torch uses as many threads. One CPU and
    one thread per actor is the default: MTCNN's small convolutions scale poorly across
    threads (measured on 2 cores: 2 threads were erratic, up to 60× slower under load,
    1 thread a steady ~20 ms/frame), so videos run in parallel instead.
    """

    def __init__(self, settings: PipelineSettings, workers: int | None = None,
                 gpus_per_worker: float = 0.5, cpus_per_worker: int | None = None) -> None:
        sweep_vitals()  # the crash and memory files of long-dead actors (ray_actor.why_worker_died reads them)
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0.0), int(resources.get("CPU", 1))
        if gpus > 0:
            options = {"num_gpus": gpus_per_worker, "num_cpus": 1}
            default_workers = max(1, int(gpus / gpus_per_worker))
            threads = settings.torch_threads
        else:
            per = cpus_per_worker or 1
            options = {"num_gpus": 0, "num_cpus": per}
            default_workers = max(1, cpus // per)
            threads = settings.torch_threads or per
        self.settings = PipelineSettings(**{**settings.__dict__, "torch_threads": threads})
        self.options = options
        self.size = workers or default_workers
        self._free: queue.Queue = queue.Queue()
        for _ in range(self.size):
            self._free.put(self._spawn())

    def _spawn(self):
        return FaceWorker.options(**self.options).remote(self.settings)

    def idle(self) -> int:
        """Actors free at this moment (at least 1: a caller's work waits for one otherwise)."""
        return max(1, self._free.qsize())

    def describe(self) -> list[dict[str, Any]]:
        actors = list(self._free.queue)
        return ray.get([a.describe.remote() for a in actors])

    @contextmanager
    def acquire(self) -> Iterator[Any]:
        actor = self._free.get()
        try:
            yield actor
        except ray.exceptions.RayActorError:
            # The actor died (out of memory, killed, a native crash: the caller logs which, from
            # ray_actor.why_worker_died): replace it so the pool keeps its size.
            actor = self._spawn()
            raise
        finally:
            self._free.put(actor)

    def call(self, method: str, *args: Any) -> Any:
        """`method` of a free actor with `args`, its result once done (blocking; thread-safe)."""
        with self.acquire() as actor:
            return ray.get(getattr(actor, method).remote(*args))

    def shutdown(self) -> None:
        while not self._free.empty():
            ray.kill(self._free.get())


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both modules take: which face pair, how to encode, where to run."""
    parser.add_argument("--model", default=PipelineSettings.model,
                        help="face pair: uunet (bundled weights) or keyed-permutation")
    parser.add_argument("--weights", help="weights file for --model uunet (default models/weights/uunet.pt)")
    parser.add_argument("--batch-size", type=int, default=PipelineSettings.batch_size)
    parser.add_argument("--workers", type=int, help="number of actors (default: from the cluster's CPUs/GPUs)")
    parser.add_argument("--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS or a local Ray)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def public_name(relative: Path, clashes: bool = False) -> Path:
    """The public stream keeps the source's relative path; the container is always Matroska.

    Where another video would get the same name (door.mp4 beside door.avi, or a name an
    earlier run gave another video), the source's suffix stays in it: door.avi.mkv.
    """
    return relative.with_name(relative.name + ".mkv") if clashes else relative.with_suffix(".mkv")


def written_public_names(catalog: CatalogStore, public_root: Path) -> dict[Path, str]:
    """Relative public path -> video id, for every video the catalog records as written there."""
    videos = catalog.read("videos", columns=["video_id", "status", "output_path"])
    root = public_root.resolve()
    written = {}
    for video_id, status, output in zip(videos["video_id"], videos["status"], videos["output_path"]):
        if status in VIDEO_SUCCESS_STATUSES and isinstance(output, str) and Path(output).resolve().is_relative_to(root):
            written[Path(output).resolve().relative_to(root)] = str(video_id)
    return written


def public_names(relatives: Sequence[Path], video_ids: Sequence[str], written: dict[Path, str]) -> list[Path]:
    """`public_name` of each source, `clashes` worked out: two sources of this scan on one
    plain name, or the plain name already written for another video (`written`: relative
    public path -> the video id it holds)."""
    plain = [public_name(r) for r in relatives]
    counts = collections.Counter(plain)
    return [public_name(r, counts[name] > 1 or written.get(name, video_id) != video_id)
            for r, name, video_id in zip(relatives, plain, video_ids)]


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain fixed-width table: (key, header) columns."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return "inf" if value == float("inf") else f"{value:.2f}"
        return str(value)

    table = [[h for _, h in columns]] + [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """The summary table as Markdown, for a Prefect artifact (the UI of a served deployment)."""
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def publish_summary(flow: str, run_id: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """The run's summary table as a Markdown artifact; a run with no Prefect API (a plain
    function call) skips it."""
    from prefect.artifacts import create_markdown_artifact

    failed = sum(r.get("status") in FAILURE_STATUSES for r in rows)
    heading = f"## {flow} run {run_id}\n\n{len(rows)} videos, {failed} failed or interrupted.\n\n"
    create_markdown_artifact(markdown=heading + markdown_table(rows, columns), key=f"{flow}-summary",
                             description=f"what the {flow} run {run_id} did, one row per video")
