"""What both flows share: Ray start-up, the pool of long-lived actors, scanning, the summary table."""
from __future__ import annotations

import argparse
import os
import queue
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from tasks.datapath.ray_actor import FaceWorker
from tasks.datapath.video_loop import PipelineSettings

VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".ts", ".mts",
                  ".wmv", ".flv", ".3gp", ".y4m"}


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

    def describe(self) -> list[dict[str, Any]]:
        actors = list(self._free.queue)
        return ray.get([a.describe.remote() for a in actors])

    @contextmanager
    def acquire(self) -> Iterator[Any]:
        actor = self._free.get()
        try:
            yield actor
        except ray.exceptions.RayActorError:
            # The actor died (out of memory, killed): replace it so the pool keeps its size.
            actor = self._spawn()
            raise
        finally:
            self._free.put(actor)

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


def public_name(relative: Path) -> Path:
    """The public stream keeps the source's relative path; the container is always Matroska."""
    return relative.with_suffix(".mkv")


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
