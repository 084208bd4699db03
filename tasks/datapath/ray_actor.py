"""The Ray actor of the data path: one per pool slot, alive for a whole flow run, models
loaded once; it runs whole videos (or the steps of a split one) through the plain loops and
returns small records, so frames never cross Ray's object store.

The only module of `tasks/` that imports Ray.
"""
from __future__ import annotations

import faulthandler
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray

from catalogs import CatalogStore
from tasks.datapath.decode import VideoInfo
from tasks.datapath.anonymize import VideoRecord, anonymize_video, check_release
from tasks.datapath.deidentify import FaceSwapper, load_pipeline_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import AuthorityPrivateKey, AuthorityPublicKey, DataKey, WrappedKey
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.release_check import ReleaseVerdict
from tasks.datapath.segments import (
    Segment,
    SegmentDetections,
    SegmentResult,
    detect_segment,
    render_segment,
)
from tasks.datapath.track import Roi
from tasks.datapath.video_loop import PipelineSettings
from tasks.judges import SFaceJudge


# Each actor leaves two small files here, named by its Ray actor id, so that the driver can
# say why a worker died: Ray itself cannot tell a SIGKILL from a segfault ("connection error
# code 2"), and the kernel's OOM message is not readable inside a container.
VITALS_DIR = Path(tempfile.gettempdir()) / f"uunet-workers-{os.getuid()}"
VITALS_EVERY_S = 1.0
LOW_MEMORY_FRACTION = 0.05  # the machine's available memory under this share of it: a memory death
STALE_VITALS_S = 24 * 3600  # a dead actor's files are kept a day for whoever reads the log late


def vitals_paths(actor_id: str) -> tuple[Path, Path]:
    """(faulthandler's stack dump, the last memory sample) of one actor."""
    return VITALS_DIR / f"{actor_id}.crash", VITALS_DIR / f"{actor_id}.vitals"


def memory_sample() -> dict[str, Any] | None:
    """This process's resident memory and the machine's available and total memory, in bytes
    (Linux /proc; None elsewhere)."""
    try:
        status = Path("/proc/self/status").read_text()
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    kib = {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"^(\w+):\s+(\d+) kB", status + meminfo, re.M)}
    if not {"VmRSS", "MemAvailable", "MemTotal"} <= kib.keys():
        return None
    return {"time": time.time(), "pid": os.getpid(), "rss": kib["VmRSS"], "available": kib["MemAvailable"],
            "total": kib["MemTotal"]}


class WorkerVitals:
    """Inside an actor: faulthandler writes a native crash's stacks to the actor's crash file,
    and a daemon thread rewrites its memory sample every `VITALS_EVERY_S` seconds."""

    def __init__(self, actor_id: str) -> None:
        VITALS_DIR.mkdir(mode=0o700, exist_ok=True)
        crash, self.path = vitals_paths(actor_id)
        self._crash = crash.open("w", encoding="utf-8")  # kept open: faulthandler writes to its fd
        faulthandler.enable(file=self._crash, all_threads=True)
        threading.Thread(target=self._sample_forever, name="uunet-vitals", daemon=True).start()

    def _sample_forever(self) -> None:
        partial = self.path.with_suffix(".vitals.tmp")
        while True:
            sample = memory_sample()
            if sample is not None:
                partial.write_text(json.dumps(sample), encoding="utf-8")
                os.replace(partial, self.path)  # the reader never sees half a sample
            time.sleep(VITALS_EVERY_S)


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GB"


def why_worker_died(err: BaseException, now: float | None = None) -> str:
    """One line (plus a native crash's stack) on why the actor behind `err` (a RayActorError) died.

    Read from the files the actor left on this machine; an actor on another node left them
    there, and the line says so.
    """
    text = str(err)
    if "memory monitor" in text or "low on memory" in text:
        return "killed by Ray's memory monitor: the machine ran low on memory"
    actor_id = getattr(err, "actor_id", None)
    if not actor_id:
        return f"no actor id in Ray's error: {text.splitlines()[0] if text else type(err).__name__}"
    crash_path, vitals_path = vitals_paths(actor_id)
    crash = crash_path.read_text(encoding="utf-8", errors="replace") if crash_path.exists() else ""
    fatal = re.search(r"^Fatal Python error: (.+)$", crash, re.M)
    if fatal:
        current = crash[crash.find("Current thread"):] if "Current thread" in crash else crash
        frames = [line.strip() for line in current.splitlines() if line.strip().startswith("File ")]
        # The innermost frame of our own code says more than Ray's or torch's.
        ours = [f for f in frames if "site-packages" not in f and "/lib/python" not in f]
        where = f" at {(ours or frames)[0]}" if frames else ""
        stack = "\n".join(frames[:12])
        return f"a native crash ({fatal.group(1)}){where}; every thread's stack is in {crash_path}\n{stack}"
    try:
        sample = json.loads(vitals_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no crash stack and no memory record on this machine (ran on another node? see {VITALS_DIR} there)"
    age = (now if now is not None else time.time()) - sample["time"]
    held = (f"it held {_gb(sample['rss'])}, the machine had {_gb(sample['available'])} of {_gb(sample['total'])} "
            f"free {age:.0f} s before")
    if sample["available"] < LOW_MEMORY_FRACTION * sample["total"]:
        return f"killed, most likely for memory (the kernel's OOM killer): {held}"
    return f"killed from outside, without a crash stack (SIGKILL, `ray stop`, a lost node): {held}"


def sweep_vitals(now: float | None = None) -> None:
    """Remove the files of actors whose memory sample stopped more than `STALE_VITALS_S` ago
    (a live actor rewrites its sample every second; its crash file stays empty, never touched)."""
    if not VITALS_DIR.is_dir():
        return
    limit = (now if now is not None else time.time()) - STALE_VITALS_S
    for vitals in VITALS_DIR.glob("*.vitals"):
        try:
            if vitals.stat().st_mtime < limit:
                vitals.unlink()
                vitals.with_suffix(".crash").unlink(missing_ok=True)
        except FileNotFoundError:  # another pool swept it first
            pass


def _pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class FaceWorkerImpl:
    """Holds the detector and the face pair once; the Ray actor below is this class, remote."""

    def __init__(self, settings: PipelineSettings) -> None:
        import torch

        # A native crash (decoder, torch, ffmpeg bindings) otherwise kills the worker without a
        # word: as a Ray actor its stacks go to a file the driver reads (why_worker_died); run
        # in-process (tests), to stderr.
        actor_id = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        if actor_id:
            self._vitals = WorkerVitals(actor_id)
        else:
            faulthandler.enable(all_threads=True)

        self.settings = settings
        if settings.torch_threads > 0:
            import cv2

            torch.set_num_threads(settings.torch_threads)
            # OpenCV (the detector's pyramid, YuNet, SFace) would otherwise start a thread per core
            # in every actor, and the actors already share the cores between them.
            cv2.setNumThreads(settings.torch_threads)
        self.device = _pick_device(settings.device)
        self.pair = load_pipeline_pair(settings.model, settings.weights, settings.seal, self.device)
        self.swapper = FaceSwapper(self.pair)
        self._detector: FaceDetector | None = None
        self._judge: SFaceJudge | None = None

    @property
    def detector(self) -> FaceDetector:
        # The private module never detects: load MTCNN only when the public module needs it.
        if self._detector is None:
            self._detector = FaceDetector(device=self.device, min_face_size=self.settings.min_face_size,
                                          batch_size=self.settings.batch_size)
        return self._detector

    @property
    def judge(self) -> SFaceJudge:
        # Only the public module's release check needs SFace and YuNet.
        if self._judge is None:
            self._judge = SFaceJudge()
        return self._judge

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "model": self.pair.name, "weights": self.pair.source, "pid": os.getpid()}

    def anonymize(self, source: str, output: str, recipients: list[AuthorityPublicKey], video_id: str, run_id: str,
                  catalog_root: str | None, data_key: DataKey | None = None,
                  release_check: bool = True) -> VideoRecord:
        """The whole video (`anonymize_video`); with `release_check=False` the caller, who gave
        the data key, shares the check out (`check_frames`)."""
        catalog = CatalogStore(catalog_root) if catalog_root else None
        return anonymize_video(source, output, recipients=recipients, video_id=video_id, detector=self.detector,
                               swapper=self.swapper, settings=self.settings, run_id=run_id, catalog=catalog,
                               judge=self.judge, data_key=data_key, release_check=release_check)

    # A split video (tasks/datapath/segments.py): its steps, each on whichever worker is free.
    def detect_segment(self, source: str, segment: Segment) -> SegmentDetections:
        return detect_segment(source, segment, self.detector, self.settings)

    def render_segment(self, source: str, segment: Segment, rois: list[tuple[int, list[Roi]]], video_part: str,
                       sealed_part: str, info: VideoInfo, video_id: str, data_key: DataKey, envelope: list[WrappedKey],
                       run_id: str, catalog_root: str | None) -> SegmentResult:
        catalog = CatalogStore(catalog_root) if catalog_root else None
        return render_segment(source, segment, rois, video_part, sealed_part, info=info, video_id=video_id,
                              data_key=data_key, envelope=envelope, swapper=self.swapper, settings=self.settings,
                              run_id=run_id, catalog=catalog)

    # The release check on a share of a written video's sampled frames (anonymize.check_release_shared).
    def check_frames(self, public: str, source: str, video_id: str, data_key: DataKey,
                     frames: list[int]) -> ReleaseVerdict:
        return check_release(public, source, video_id, data_key, frames, self.settings.public_format,
                             self.detector, self.judge)

    def reconstruct(self, public: str, output: str, private_key: AuthorityPrivateKey,
                    source: str | None = None) -> dict[str, Any]:
        record = reconstruct_video(public, output, private_key=private_key, swapper=self.swapper,
                                   settings=self.settings, source=source)
        return record.as_dict()


# The Ray actor: one per pool slot, alive for the whole flow run, models loaded once.
FaceWorker = ray.remote(FaceWorkerImpl)
