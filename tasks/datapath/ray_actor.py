"""The Ray actor of the data path: one per pool slot, alive for a whole flow run, models
loaded once; it runs whole videos (or the steps of a split one) through the plain loops and
returns small records, so frames never cross Ray's object store.

The only module of `tasks/` that imports Ray.
"""
from __future__ import annotations

import faulthandler
import os
from typing import Any

import ray

from catalogs import CatalogStore
from tasks.datapath.decode import VideoInfo
from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.deidentify import FaceSwapper, load_pipeline_pair
from tasks.datapath.detect import FaceDetector
from tasks.datapath.keys import AuthorityPrivateKey, AuthorityPublicKey, DataKey, WrappedKey
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.release_check import ReleaseVerdict
from tasks.datapath.segments import (
    Segment,
    SegmentDetections,
    SegmentResult,
    check_segment,
    detect_segment,
    render_segment,
)
from tasks.datapath.track import Roi
from tasks.datapath.video_loop import PipelineSettings
from tasks.judges import SFaceJudge


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
        # word; this prints every thread's Python stack to its stderr, which Ray forwards to the log.
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
                  catalog_root: str | None) -> dict[str, Any]:
        catalog = CatalogStore(catalog_root) if catalog_root else None
        record = anonymize_video(source, output, recipients=recipients, video_id=video_id, detector=self.detector,
                                 swapper=self.swapper, settings=self.settings, run_id=run_id,
                                 catalog=catalog, judge=self.judge)
        return record.as_dict()

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

    def check_segment(self, public: str, source: str, video_id: str, data_key: DataKey,
                      frames: list[int]) -> ReleaseVerdict:
        return check_segment(public, source, video_id, data_key, frames, self.settings.public_format,
                             self.detector, self.judge)

    def reconstruct(self, public: str, output: str, private_key: AuthorityPrivateKey,
                    source: str | None = None) -> dict[str, Any]:
        record = reconstruct_video(public, output, private_key=private_key, swapper=self.swapper,
                                   settings=self.settings, source=source)
        return record.as_dict()


# The Ray actor: one per pool slot, alive for the whole flow run, models loaded once.
FaceWorker = ray.remote(FaceWorkerImpl)
