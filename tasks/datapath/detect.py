"""Face detection stage: MTCNN with the weights bundled in the `mtcnn` package.

The `mtcnn` package is installed without TensorFlow, so it cannot be
imported; only its weight files are used, found through its import spec.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import joblib
import numpy as np
import torch

from models.mtcnn import MTCNN


def mtcnn_weights_dir() -> Path:
    """Folder holding `pnet.lz4`, `rnet.lz4` and `onet.lz4` of the `mtcnn` package."""
    spec = importlib.util.find_spec("mtcnn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `mtcnn` package is not installed (pip install mtcnn==1.0.0)")
    return Path(spec.submodule_search_locations[0]) / "assets" / "weights"


def load_mtcnn(device: str | torch.device = "cpu", **detector_kwargs) -> MTCNN:
    """An MTCNN in eval mode on `device`, loaded with the package's weights.

    The .lz4 files are joblib pickles: load only the installed package's own.
    """
    folder = mtcnn_weights_dir()
    model = MTCNN(**detector_kwargs)
    model.load_keras_arrays(*(joblib.load(folder / f"{name}.lz4") for name in ("pnet", "rnet", "onet")))
    return model.eval().to(device)


class FaceDetector:
    """Detects faces in numpy frame batches, a sub-batch at a time."""

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 20,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
                 batch_size: int = 16) -> None:
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = load_mtcnn(self.device, min_face_size=min_face_size, thresholds=thresholds)

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        """Per frame a float32 (K, 5) array x1, y1, x2, y2, score, best first.

        frames: uint8 RGB (N, H, W, 3). x2 - x1 and y2 - y1 are the width and
        height the reference MTCNN reports; corners lie inside the frame.
        """
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W, 3) frames, got {frames.dtype} {frames.shape}")
        results: list[np.ndarray] = []
        for start in range(0, len(frames), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(frames[start:start + self.batch_size]))
            for boxes in self.model.detect(batch.to(self.device)):
                results.append(boxes.cpu().numpy().astype(np.float32, copy=False))
        return results
