"""Reversal from the sealed originals, through the real public and private modules, judged by
the same independent recognizers as the learned path.

For each clip, its held-out part (the last quarter, as for the learned path) is cut as a
source of its own; the public module writes it in the release format with the originals
sealed at one quality, and the private module restores it with the authority's private
key into the lossless working copy. Every ROI of every frame is then compared with the
source as decoded, at frame resolution: pooled PSNR inside the ROIs, the share that came
back bit-exact, and on every `stride`-th frame SFace's and dlib's verdict on (source crop,
restored crop) for ROIs of at least `MIN_IDENTITY_SIDE` pixels. Flicker: inside each ROI, the
mean absolute change from the previous frame (same sequence, the current frame's box), in
the public file and in the source: a public face that shimmers changes more than the
face it replaces. Keyless attack: what someone holding the public file and the shipped weights
but no key can do. On every judged frame, our MTCNN finds the faces of the public frame, each
box becomes a head ROI as the tracker makes it, and the shipped U_d runs on those ROIs with
the noise of a random key and with zero noise; the judges compare each result with the
source at the same ROI. The same judges also compare
the source crop with the public crop as released (the face blended over the face region,
the rest of the box the source): with the originals sealed, that public face is not the
paper's (see `tasks/datapath/deidentify.py`), so its privacy is measured here, on its own.
Realism: on every judged frame, MTCNN and YuNet (which we did not train) run on the source
and on the public frame; each source face inside a ROI counts once, and is found again when
a public detection overlaps it with IoU >= `DETECTION_IOU`. `sheets_dir` gets one contact
sheet per clip (`contact_sheet`): original | public | restored around the faces of a few frames.
"""
from __future__ import annotations

import math
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from catalogs import CatalogStore
from tasks.datapath.anonymize import anonymize_video
from tasks.datapath.decode import iter_frames_at, probe
from tasks.datapath.deidentify import FaceSwapper
from tasks.datapath.detect import FaceDetector
from tasks.datapath.encode import ffmpeg_exe
from tasks.datapath.keys import DataKey, generate_key_pair, parse_private_key
from tasks.datapath.reconstruct import reconstruct_video
from tasks.datapath.release_check import MIN_IDENTITY_SIDE
from tasks.datapath.track import Roi, head_roi, iou
from tasks.datapath.video_loop import PipelineSettings
from tasks.evaluation.held_out import HELD_OUT_FRACTION
from tasks.evaluation.metrics import box_change
from tasks.judges import DlibJudge, SFaceJudge, YuNetDetector

_READ_CHUNK = 16
DETECTION_IOU = 0.5
SHEET_FRAMES = 4  # rows of a contact sheet, spread over the clip's judged frames
SHEET_ROW_HEIGHT = 160


@dataclass
class SealedReversal:
    quality: str
    public_format: str
    clips: int
    faces: int  # ROIs restored, every frame
    psnr_db: float  # pooled over every ROI pixel; inf when all exact
    exact_fraction: float  # ROIs whose every pixel came back
    judged: int  # ROIs SFace and dlib compared
    sface_same: float
    dlib_same: float
    chunks_failed: int
    public_sface_same: float = math.nan  # x↔a: the released public crop judged the same person
    public_dlib_same: float = math.nan
    attack_judged: int = 0  # faces MTCNN found in the public frames, each attacked twice
    attack_random_sface: float = math.nan  # U_d with a random key's noise: judged the same person
    attack_random_dlib: float = math.nan
    attack_zero_sface: float = math.nan  # U_d with zero noise
    attack_zero_dlib: float = math.nan
    public_flicker: float = math.nan  # mean |frame t - frame t-1| inside the ROIs, 0-255, public file
    source_flicker: float = math.nan  # the same in the source
    mtcnn_source_faces: int = 0  # source faces inside a ROI that MTCNN finds, judged frames
    mtcnn_public_found: float = math.nan  # of those, the share MTCNN finds again in the public frame
    yunet_source_faces: int = 0
    yunet_public_found: float = math.nan
    contact_sheets: tuple[str, ...] = ()


def held_out_part(source: Path, dest: Path) -> Path:
    """The last HELD_OUT_FRACTION of `source`'s frames, near-losslessly (x264 qp 0), no audio."""
    first = math.floor(probe(source).frame_count * (1 - HELD_OUT_FRACTION))
    # setpts restarts the clock: Matroska's duration tag must match the frames kept.
    select = f"select=gte(n\\,{first}),setpts=PTS-STARTPTS"
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", str(source), "-an",
                    "-vf", select, "-fps_mode", "passthrough", "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p",
                    str(dest)], check=True, capture_output=True)
    return dest


def measure_sealed_reversal(clips: list[Path], quality: str, detector: FaceDetector, swapper: FaceSwapper,
                            sface: SFaceJudge, dlib: DlibJudge, base: PipelineSettings,
                            stride: int = 2, yunet: YuNetDetector | None = None,
                            sheets_dir: Path | None = None) -> SealedReversal:
    settings = PipelineSettings(**{**base.__dict__, "public_format": "h264", "seal": quality})
    authority = parse_private_key(generate_key_pair()[0])
    faces = exact = judged = sface_same = dlib_same = chunks_failed = public_sface = public_dlib = 0
    squared_error, pixels = 0.0, 0
    change = {"public": 0.0, "source": 0.0}
    change_values = 0
    attack = {"random_sface": 0, "random_dlib": 0, "zero_sface": 0, "zero_dlib": 0}
    attack_judged = 0
    random_noise = DataKey.generate().noise
    yunet = yunet or YuNetDetector()
    detection = {"mtcnn_source": 0, "mtcnn_public": 0, "yunet_source": 0, "yunet_public": 0}
    sheets: list[str] = []
    with tempfile.TemporaryDirectory(prefix="uunet-eval-sealed-") as tmp:
        for index, clip in enumerate(clips):
            work = Path(tmp) / f"clip{index}"
            work.mkdir()
            source = held_out_part(Path(clip), work / "source.mkv")
            catalog = CatalogStore(work / "catalogs")
            video_id = f"{index:064x}"
            anonymize_video(source, work / "public.mkv", recipients=[authority.public], video_id=video_id,
                            detector=detector, swapper=swapper, settings=settings, run_id="evaluate",
                            catalog=catalog, progress=False, judge=sface)
            restored = reconstruct_video(work / "public.mkv", work / "restored.mkv", private_key=authority,
                                         swapper=swapper, settings=settings, progress=False)
            chunks_failed += restored.chunks_failed
            rois = catalog.read("rois")
            by_frame: dict[int, list[tuple[int, int, int, int, int]]] = {}
            for r in rois.itertuples():
                by_frame.setdefault(int(r.frame_index), []).append(
                    (int(r.x), int(r.y), int(r.w), int(r.h), int(r.seq_id)))
            frames = sorted(by_frame)
            previous: tuple[int, np.ndarray, np.ndarray] | None = None  # frame index, source, public
            judged_frames = [f for f in frames if f % stride == 0]
            sheet_frames = set(judged_frames[:: max(1, len(judged_frames) // SHEET_FRAMES)][:SHEET_FRAMES])
            sheet_rows: list[np.ndarray] = []
            readers = [iter_frames_at(path, frames, _READ_CHUNK)
                       for path in (source, work / "restored.mkv", work / "public.mkv")]
            for (chunk, sources), (_, restored_frames), (_, publics) in zip(*readers):
                for f, src, back, pub in zip(chunk, sources, restored_frames, publics):
                    if previous is not None and previous[0] == f - 1:
                        earlier = {seq for *_, seq in by_frame[f - 1]}
                        for x, y, w, h, seq in by_frame[f]:
                            if seq in earlier:
                                for name, before, now in (("source", previous[1], src), ("public", previous[2], pub)):
                                    total, n = box_change(before, now, (x, y, w, h))
                                    change[name] += total
                                change_values += n
                    previous = (f, src, pub)
                    if f % stride == 0:
                        (public_boxes,) = detector.detect(pub[None])
                        found = _keyless_attack(pub, src, public_boxes, swapper, sface, dlib, random_noise,
                                                settings.roi_scale, attack)
                        attack_judged += found
                        (source_boxes,) = detector.detect(src[None])
                        rois_here = [r[:4] for r in by_frame[f]]
                        _count_refound(source_boxes, public_boxes, rois_here, detection, "mtcnn")
                        _count_refound(yunet.detect(src), yunet.detect(pub), rois_here, detection, "yunet")
                    if sheets_dir is not None and f in sheet_frames:
                        sheet_rows.append(contact_row(src, pub, back, [r[:4] for r in by_frame[f]]))
                    for x, y, w, h, _ in by_frame[f]:
                        a = src[y:y + h, x:x + w]
                        b = np.ascontiguousarray(back[y:y + h, x:x + w])
                        diff = a.astype(np.float64) - b.astype(np.float64)
                        squared_error += float((diff ** 2).sum())
                        pixels += diff.size
                        faces += 1
                        exact += bool(np.array_equal(a, b))
                        if f % stride == 0 and min(w, h) >= MIN_IDENTITY_SIDE:
                            judged += 1
                            a = np.ascontiguousarray(a)
                            public = np.ascontiguousarray(pub[y:y + h, x:x + w])
                            sface_x, dlib_x = sface.embed(a), dlib.embed(a)
                            sface_same += sface.same_person(sface_x, sface.embed(b))
                            dlib_same += dlib.same_person(dlib_x, dlib.embed(b))
                            public_sface += sface.same_person(sface_x, sface.embed(public))
                            public_dlib += dlib.same_person(dlib_x, dlib.embed(public))
            if sheets_dir is not None and sheet_rows:
                sheets.append(str(write_contact_sheet(sheet_rows, Path(sheets_dir) / f"contact-{Path(clip).stem}.png")))
    mse = squared_error / max(pixels, 1)
    return SealedReversal(
        quality=quality, public_format=settings.public_format, clips=len(clips), faces=faces,
        psnr_db=math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
        exact_fraction=exact / max(faces, 1), judged=judged, sface_same=sface_same / max(judged, 1),
        dlib_same=dlib_same / max(judged, 1), chunks_failed=chunks_failed,
        public_sface_same=public_sface / max(judged, 1), public_dlib_same=public_dlib / max(judged, 1),
        attack_judged=attack_judged,
        **{f"attack_{name}": hits / attack_judged if attack_judged else math.nan for name, hits in attack.items()},
        public_flicker=change["public"] / change_values if change_values else math.nan,
        source_flicker=change["source"] / change_values if change_values else math.nan,
        mtcnn_source_faces=detection["mtcnn_source"],
        mtcnn_public_found=detection["mtcnn_public"] / detection["mtcnn_source"] if detection["mtcnn_source"] else math.nan,
        yunet_source_faces=detection["yunet_source"],
        yunet_public_found=detection["yunet_public"] / detection["yunet_source"] if detection["yunet_source"] else math.nan,
        contact_sheets=tuple(sheets))


def _count_refound(source_boxes: np.ndarray, public_boxes: np.ndarray, rois: list[tuple[int, int, int, int]],
                   counts: dict[str, int], name: str) -> None:
    """Source detections whose centre lies in a ROI, and those a public detection overlaps (IoU rule above)."""
    for box in source_boxes:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        if not any(x <= cx < x + w and y <= cy < y + h for x, y, w, h in rois):
            continue  # a face the pipeline did not replace is the release check's business, not realism's
        counts[f"{name}_source"] += 1
        counts[f"{name}_public"] += any(iou(box[:4], other[:4]) >= DETECTION_IOU for other in public_boxes)


def contact_row(source: np.ndarray, public: np.ndarray, restored: np.ndarray,
                rois: list[tuple[int, int, int, int]]) -> np.ndarray:
    """One frame's row of a contact sheet: the region around its faces, original | public | restored."""
    height, width = source.shape[:2]
    x1 = min(x for x, _, _, _ in rois)
    y1 = min(y for _, y, _, _ in rois)
    x2 = max(x + w for x, _, w, _ in rois)
    y2 = max(y + h for _, y, _, h in rois)
    # Twice the faces' extent, so the border of the face region and its surroundings show.
    pad_x, pad_y = (x2 - x1) // 2, (y2 - y1) // 2
    x1, y1, x2, y2 = max(0, x1 - pad_x), max(0, y1 - pad_y), min(width, x2 + pad_x), min(height, y2 + pad_y)
    scale = SHEET_ROW_HEIGHT / (y2 - y1)
    size = (max(1, round((x2 - x1) * scale)), SHEET_ROW_HEIGHT)
    import cv2  # only the sheets need it

    tiles = [cv2.resize(np.ascontiguousarray(img[y1:y2, x1:x2]), size, interpolation=cv2.INTER_AREA)
             for img in (source, public, restored)]
    gap = np.full((SHEET_ROW_HEIGHT, 4, 3), 255, np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)


def write_contact_sheet(rows: list[np.ndarray], path: Path) -> Path:
    """Rows (of unequal widths) stacked on white, as a PNG at `path`."""
    from PIL import Image

    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(padded)).save(path, format="PNG")
    return path


def _keyless_attack(public: np.ndarray, source: np.ndarray, boxes: np.ndarray, swapper: FaceSwapper,
                    sface: SFaceJudge, dlib: DlibJudge, random_noise, roi_scale: float, hits: dict[str, int]) -> int:
    """Attack one public frame at MTCNN's `boxes` on it (rule in the module docstring); adds to
    `hits`, returns the faces attacked."""
    height, width = public.shape[:2]
    rois = [Roi(0, i, *head_roi(box, width, height, roi_scale), None, False) for i, box in enumerate(boxes)]
    rois = [r for r in rois if min(r.w, r.h) >= MIN_IDENTITY_SIDE]
    if not rois:
        return 0
    regions = [(slice(r.y, r.y + r.h), slice(r.x, r.x + r.w)) for r in rois]
    originals = [(sface.embed(np.ascontiguousarray(source[g])), dlib.embed(np.ascontiguousarray(source[g])))
                 for g in regions]
    zero = np.zeros_like(random_noise(0))
    for name, noise_for in (("random", random_noise), ("zero", lambda seq_id: zero)):
        attacked = public.copy()
        swapper.restore([attacked], [rois], noise_for)
        for region, (sface_x, dlib_x) in zip(regions, originals):
            a = np.ascontiguousarray(attacked[region])
            hits[f"{name}_sface"] += sface.same_person(sface_x, sface.embed(a))
            hits[f"{name}_dlib"] += dlib.same_person(dlib_x, dlib.embed(a))
    return len(rois)
