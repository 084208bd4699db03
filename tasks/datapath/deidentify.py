"""De-identify and restore: crop head ROIs → 64×64 → U_e / U_d with keyed noise → resize → blend.

Where the originals are sealed, each public face is blended over its ROI with the soft
face-shaped weights of `track.face_region` (outside that region the frame keeps its own
pixels) and smoothed over its sequence (`TemporalSmoother`). In the paper's mode (`--seal
none`) the public face must carry its own frame's original for U_d: it replaces the whole
box, unsmoothed, and U_d's output replaces the whole box again on the way back.

The same crop and paste code serves both directions, so the public and the private
module cannot drift apart: any misalignment between the ROI cropped for x and the ROI
cropped for a costs reconstruction fidelity (paper, Sec. III-C).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.registry import MODEL_NAMES, build_pair, has_parameters
from models.unet import FACE_SIZE
from tasks.datapath.track import Roi, face_region

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "weights" / "uunet.pt"
# U_e alone, trained for the public face where the originals are sealed (models/weights/MODEL_CARD.md).
DEFAULT_PUBLIC_WEIGHTS = DEFAULT_WEIGHTS.with_name("uunet-public.pt")
WEIGHTS_FORMAT = "uunet-pair/1"

NoiseFor = Callable[[int], np.ndarray]  # sequence id → (64, 64) float32 keyed noise


class WeightsError(Exception):
    pass


@dataclass
class FacePair:
    """A loaded (U_e, U_d) pair, in eval mode, on one device."""

    name: str
    encoder: nn.Module
    decoder: nn.Module | None  # None: a public-only U_e (sealed default), no learned reversal
    device: torch.device
    source: str  # weights file, or "built-in" for parameter-free stand-ins
    meta: dict[str, Any] = field(default_factory=dict)  # the weights file's training record (step, s, ...)


def save_face_pair(
    path: str | Path, name: str, encoder: nn.Module, decoder: nn.Module | None,
    config: dict[str, Any] | None = None, meta: dict[str, Any] | None = None, half: bool = False,
) -> Path:
    """Write a weights file the pipeline can load: model name + config + both state dicts.

    `half` stores floating tensors as float16 (half the size; loading casts them back to the
    module's float32): for variants kept for comparison, not for the pipeline's default pair.
    `decoder` None writes a public-only U_e (the sealed default's), which cannot restore.
    """

    def tensors(module: nn.Module) -> dict[str, torch.Tensor]:
        # CPU tensors, so a file trained on a GPU loads anywhere.
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        return {k: v.half() if half and v.is_floating_point() else v for k, v in state.items()}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    torch.save(
        {
            "format": WEIGHTS_FORMAT,
            "model": name,
            "config": dict(config or {}),
            "meta": dict(meta or {}),
            "encoder": tensors(encoder),
            "decoder": None if decoder is None else tensors(decoder),
        },
        tmp,
    )
    tmp.replace(path)
    return path


def load_face_pair(model: str, weights: str | Path | None, device: str | torch.device = "cpu") -> FacePair:
    """Build the named pair; load its weights file when the model has parameters."""
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    device = torch.device(device)
    blob: dict[str, Any] | None = None
    if model != "keyed-permutation":
        path = Path(weights) if weights else DEFAULT_WEIGHTS
        if not path.is_file():
            raise WeightsError(f"weights file for model {model!r} not found: {path}")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
            raise WeightsError(f"{path} is not a {WEIGHTS_FORMAT} weights file")
        if blob["model"] != model:
            raise WeightsError(f"{path} holds model {blob['model']!r}, not {model!r}")
    encoder, decoder = build_pair(model, blob["config"] if blob else None)
    if blob is not None:
        encoder.load_state_dict(blob["encoder"])
        if blob["decoder"] is None:
            decoder = None
        else:
            decoder.load_state_dict(blob["decoder"])
    elif has_parameters(encoder):
        raise WeightsError(f"model {model!r} needs a weights file")
    source = str(Path(weights) if weights else DEFAULT_WEIGHTS) if blob is not None else "built-in"
    return FacePair(model, encoder.to(device).eval(), None if decoder is None else decoder.to(device).eval(),
                    device, source,
                    dict(blob.get("meta") or {}) if blob is not None else {})


def load_pipeline_pair(model: str, weights: str | Path | None, seal: str,
                       device: str | torch.device = "cpu") -> FacePair:
    """The pair the data path runs: `weights` when given; else, for the bundled uunet, the
    public-only U_e where the originals are sealed (the public face then need not carry x)
    if one is bundled (`DEFAULT_PUBLIC_WEIGHTS`), the joint pair's U_e for `--seal none`
    (U_d must reverse its output) or when none is bundled, and the joint pair's U_d for the
    learned restore path in every case.
    """
    if weights or model != "uunet" or seal == "none" or not DEFAULT_PUBLIC_WEIGHTS.is_file():
        pair = load_face_pair(model, weights, device)
        if seal == "none" and pair.decoder is None:
            raise WeightsError(f"{pair.source} holds a public-only U_e: with --seal none nothing but U_d can "
                               f"restore, so the public face must come from a pair file such as {DEFAULT_WEIGHTS}")
        return pair
    joint = load_face_pair(model, DEFAULT_WEIGHTS, device)
    public = load_face_pair(model, DEFAULT_PUBLIC_WEIGHTS, device)
    return FacePair(model, public.encoder, joint.decoder, joint.device, f"{public.source} (U_e) + {joint.source} (U_d)",
                    {"encoder": public.meta, "decoder": joint.meta})


def crop_faces(frame: np.ndarray, rois: Sequence[Roi], device: torch.device) -> torch.Tensor:
    """Crops of one frame → (K, 3, 64, 64) float in [0, 1]."""
    crops = []
    for r in rois:
        patch = torch.from_numpy(np.ascontiguousarray(frame[r.y : r.y + r.h, r.x : r.x + r.w]))
        patch = patch.to(device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
        if (r.h, r.w) != (FACE_SIZE, FACE_SIZE):
            # Antialiasing keeps large faces from aliasing when they shrink to 64×64.
            patch = F.interpolate(patch, size=(FACE_SIZE, FACE_SIZE), mode="bilinear",
                                  align_corners=False, antialias=True)
        crops.append(patch)
    return torch.cat(crops) if crops else torch.empty((0, 3, FACE_SIZE, FACE_SIZE), device=device)


@functools.lru_cache(maxsize=32)
def _region_weights(w: int, h: int) -> torch.Tensor:
    """`face_region` as an (h, w, 1) tensor, kept so a steady face does not convert it every frame."""
    return torch.from_numpy(face_region(w, h).copy()).unsqueeze(-1)


def _face_pixels(face: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """A (3, 64, 64) face in [0, 1] → (h, w, 3) float in [0, 255], resized bilinearly.

    Enlarging on the CPU goes through OpenCV: within 1e-3 of a level of torch's bilinear and
    about 10x faster on a 400 px face (a paste took 2.7 ms, now 1.6; the de-identify stage was
    16 % of the public module on the Wolfgang clip). Shrinking keeps torch's antialiasing.
    """
    if (h, w) == tuple(face.shape[1:]):
        return face.permute(1, 2, 0).mul(255.0)
    if face.device.type == "cpu" and h >= face.shape[1] and w >= face.shape[2]:
        import cv2  # here, not at the top: bench.gpu imports this module on machines with torch alone

        pixels = face.permute(1, 2, 0).mul(255.0).contiguous().numpy()
        return torch.from_numpy(cv2.resize(pixels, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, -1))
    face = F.interpolate(face.unsqueeze(0), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return face[0].permute(1, 2, 0).mul(255.0)


def paste_faces(frame: np.ndarray, rois: Sequence[Roi], faces: torch.Tensor, blend: bool = False) -> None:
    """Resize each 64×64 face to its ROI and write it into `frame` (in place): over the whole
    box, or with `blend` over the face region only (where the weight is 0 the frame keeps
    exactly what it was).
    """
    for r, face in zip(rois, faces):
        pixels = _face_pixels(face, r.w, r.h)
        target = frame[r.y : r.y + r.h, r.x : r.x + r.w]
        if blend:
            source = torch.from_numpy(target).to(face.device).float()  # a strided view: .float() makes the one copy
            # lerp is exactly the source where the weight is 0 and exactly the face where it is 1.
            pixels = torch.lerp(source, pixels, _region_weights(r.w, r.h).to(face.device))
        target[:] = pixels.round_().clamp_(0, 255).to(torch.uint8).cpu().numpy()


SMOOTHING_WEIGHT = 0.3


class TemporalSmoother:
    """Per sequence, each public face as a running mean of U_e's outputs (in ROI coordinates).

    U_e sees each frame's crop afresh, so its face shimmers from frame to frame: viewers read
    that as a broken video, and x264 pays for it (the bundled Wolfgang clip's public stream:
    2.52 MB unsmoothed, 2.16 MB at `weight` 0.3). Only where the originals are sealed: in the
    paper's mode each public face must carry its own frame's original for U_d.
    """

    def __init__(self, weight: float) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"smoothing weight must be in (0, 1], got {weight}")
        self.weight = weight
        self._last: dict[int, torch.Tensor] = {}

    def __call__(self, seq_ids: Sequence[int], faces: torch.Tensor) -> torch.Tensor:
        """Faces (K, 3, 64, 64) in frame order → smoothed; a sequence absent from a call has ended."""
        out = torch.empty_like(faces)
        for k, seq_id in enumerate(seq_ids):
            last = self._last.get(seq_id)
            out[k] = faces[k] if last is None else self.weight * faces[k] + (1 - self.weight) * last
            self._last[seq_id] = out[k]
        present = set(seq_ids)
        self._last = {s: face for s, face in self._last.items() if s in present}
        return out


class FaceSwapper:
    """Runs U_e (anonymize) or U_d (restore) over all ROIs of a group of frames in one batch."""

    def __init__(self, pair: FacePair, max_batch: int = 256) -> None:
        self.pair = pair
        self.max_batch = max_batch

    def anonymize(self, frames: Sequence[np.ndarray], rois: Sequence[Sequence[Roi]], noise_for: NoiseFor,
                  smoother: TemporalSmoother | None = None, blend: bool = False) -> int:
        return self._apply(self.pair.encoder, frames, rois, noise_for, smoother, blend)

    def restore(self, frames: Sequence[np.ndarray], rois: Sequence[Sequence[Roi]], noise_for: NoiseFor) -> int:
        if self.pair.decoder is None:
            raise WeightsError(f"{self.pair.source} holds a public-only U_e (the sealed default's): it has no "
                               f"U_d to restore with; use a pair file such as {DEFAULT_WEIGHTS}")
        return self._apply(self.pair.decoder, frames, rois, noise_for)

    @torch.inference_mode()
    def _apply(self, net: nn.Module, frames: Sequence[np.ndarray], rois: Sequence[Sequence[Roi]],
               noise_for: NoiseFor, smoother: TemporalSmoother | None = None, blend: bool = False) -> int:
        """Replace every ROI of every frame in place; returns the number of faces processed."""
        device = self.pair.device
        crops = [crop_faces(f, r, device) for f, r in zip(frames, rois) if r]
        if not crops:
            return 0
        faces = torch.cat(crops)
        flat_rois = [roi for r in rois for roi in r]
        noise_cache: dict[int, torch.Tensor] = {}
        for roi in flat_rois:
            if roi.seq_id not in noise_cache:
                noise_cache[roi.seq_id] = torch.from_numpy(noise_for(roi.seq_id)).to(device)
        noise = torch.stack([noise_cache[r.seq_id] for r in flat_rois]).unsqueeze(1)
        out = torch.cat([net(faces[i : i + self.max_batch], noise[i : i + self.max_batch])
                         for i in range(0, len(faces), self.max_batch)])
        if smoother is not None:
            out = smoother([r.seq_id for r in flat_rois], out)
        k = 0
        for frame, frame_rois in zip(frames, rois):
            paste_faces(frame, frame_rois, out[k : k + len(frame_rois)], blend)
            k += len(frame_rois)
        return k
