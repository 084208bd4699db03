"""MTCNN face detector: a PyTorch port of the `mtcnn` 1.0.0 package (Keras).

The three networks and every pre/post-processing step follow that package so
its bundled weights give the same boxes. Where the port departs from it, the
comment says so. Frames of one call share H and W: on a GPU each pyramid
level runs P-Net once over the whole batch (on CPU frame by frame, which is
faster there), and R-Net / O-Net run once over the candidates of all frames
together, with NMS batched over frames.

Output boxes are float pixel coordinates (x1, y1, x2, y2) as the reference
computes them: x2 - x1 is the width the reference reports (no +1), and the
corners are clamped to [0, W - 1] x [0, H - 1] like the reference's default
`fit_to_image=True`. Rounding x1, y1, x2 - x1, y2 - y1 gives the reference's
integer (x, y, w, h).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Box pairs compared at once in NMS: bounds memory when one frame has
# thousands of P-Net candidates.
_NMS_PAIRS_PER_PASS = 4_000_000


# ---------------------------------------------------------------- networks --


def _conv_from_keras(conv: nn.Conv2d, kernel: np.ndarray, bias: np.ndarray) -> None:
    # Keras kernels are (H, W, in, out); torch wants (out, in, H, W).
    conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
    conv.bias.copy_(torch.from_numpy(bias))


def _linear_from_keras(linear: nn.Linear, kernel: np.ndarray, bias: np.ndarray) -> None:
    # Keras Dense kernels are (in, out); torch wants (out, in).
    linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
    linear.bias.copy_(torch.from_numpy(bias))


def _prelu_from_keras(prelu: nn.PReLU, alpha: np.ndarray) -> None:
    prelu.weight.copy_(torch.from_numpy(alpha.reshape(-1).copy()))


def _max_pool_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Max pool with TensorFlow "same" padding (padding never wins the max)."""
    if kernel == stride == 2:
        # The 2x2 windows tile the image: the maximum of strided views, rows then columns, an
        # odd edge kept as is ("same" pads after it, and padding never wins). On CPU, max_pool2d
        # on P-Net's large channels_last levels was 5x slower: a 640x360 frame detects in 25.2
        # instead of 26.5 ms. (A PReLU written as clamps, faster alone, made it slower: 30 ms.)
        height, width = x.shape[-2:]
        rows = torch.maximum(x[..., 0:height - 1:2, :], x[..., 1::2, :])
        if height % 2:
            rows = torch.cat([rows, x[..., height - 1:, :]], dim=-2)
        pooled = torch.maximum(rows[..., 0:width - 1:2], rows[..., 1::2])
        if width % 2:
            pooled = torch.cat([pooled, rows[..., width - 1:]], dim=-1)
        return pooled
    padding = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dim first
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        padding += [total // 2, total - total // 2]
    if not any(padding[::2]):
        # Padding only after: ceil_mode gives the same windows without a
        # padded copy (which would also lose the channels_last layout).
        return F.max_pool2d(x, kernel, stride, ceil_mode=True)
    return F.max_pool2d(F.pad(x, padding, value=float("-inf")), kernel, stride)


def _flatten_keras(x: torch.Tensor) -> torch.Tensor:
    # The Keras models permute H and W before flattening, so the dense layers
    # expect (W, H, C) order; any other order silently gives wrong faces.
    return x.permute(0, 3, 2, 1).flatten(1)


class PNet(nn.Module):
    """Proposal network: fully convolutional, 12x12 window, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.box_head = nn.Conv2d(32, 4, 1)
        self.class_head = nn.Conv2d(32, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) normalized -> box offsets (N, 4, h, w), face probability (N, h, w)."""
        x = _max_pool_same(self.prelu1(self.conv1(x)), 2, 2)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.box_head(x), torch.softmax(self.class_head(x), dim=1)[:, 1]

    @torch.no_grad()
    def load_keras_arrays(self, arrays: list[np.ndarray]) -> None:
        """Load the 13 arrays of `pnet.lz4`, in Keras layer order."""
        a = list(arrays)
        if len(a) != 13:
            raise ValueError(f"P-Net expects 13 arrays, got {len(a)}")
        for i, (conv, prelu) in enumerate([(self.conv1, self.prelu1), (self.conv2, self.prelu2),
                                           (self.conv3, self.prelu3)]):
            _conv_from_keras(conv, a[3 * i], a[3 * i + 1])
            _prelu_from_keras(prelu, a[3 * i + 2])
        _conv_from_keras(self.box_head, a[9], a[10])
        _conv_from_keras(self.class_head, a[11], a[12])


class RNet(nn.Module):
    """Refinement network on 24x24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.fc4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.box_head = nn.Linear(128, 4)
        self.class_head = nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, 3, 24, 24) normalized -> box offsets (K, 4), face probability (K,)."""
        x = _max_pool_same(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)  # "valid" in Keras
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.fc4(_flatten_keras(x)))
        return self.box_head(x), torch.softmax(self.class_head(x), dim=1)[:, 1]

    @torch.no_grad()
    def load_keras_arrays(self, arrays: list[np.ndarray]) -> None:
        """Load the 16 arrays of `rnet.lz4`, in Keras layer order."""
        a = list(arrays)
        if len(a) != 16:
            raise ValueError(f"R-Net expects 16 arrays, got {len(a)}")
        for i, (conv, prelu) in enumerate([(self.conv1, self.prelu1), (self.conv2, self.prelu2),
                                           (self.conv3, self.prelu3)]):
            _conv_from_keras(conv, a[3 * i], a[3 * i + 1])
            _prelu_from_keras(prelu, a[3 * i + 2])
        _linear_from_keras(self.fc4, a[9], a[10])
        _prelu_from_keras(self.prelu4, a[11])
        _linear_from_keras(self.box_head, a[12], a[13])
        _linear_from_keras(self.class_head, a[14], a[15])


class ONet(nn.Module):
    """Output network on 48x48 crops: boxes, five landmarks, score."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.fc5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.box_head = nn.Linear(256, 4)
        self.landmark_head = nn.Linear(256, 10)
        self.class_head = nn.Linear(256, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K, 3, 48, 48) -> box offsets (K, 4), landmarks (K, 10) in box units, probability (K,)."""
        x = _max_pool_same(self.prelu1(self.conv1(x)), 3, 2)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2)  # "valid" in Keras
        x = _max_pool_same(self.prelu3(self.conv3(x)), 2, 2)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.fc5(_flatten_keras(x)))
        probability = torch.softmax(self.class_head(x), dim=1)[:, 1]
        return self.box_head(x), self.landmark_head(x), probability

    @torch.no_grad()
    def load_keras_arrays(self, arrays: list[np.ndarray]) -> None:
        """Load the 21 arrays of `onet.lz4`, in Keras layer order."""
        a = list(arrays)
        if len(a) != 21:
            raise ValueError(f"O-Net expects 21 arrays, got {len(a)}")
        for i, (conv, prelu) in enumerate([(self.conv1, self.prelu1), (self.conv2, self.prelu2),
                                           (self.conv3, self.prelu3), (self.conv4, self.prelu4)]):
            _conv_from_keras(conv, a[3 * i], a[3 * i + 1])
            _prelu_from_keras(prelu, a[3 * i + 2])
        _linear_from_keras(self.fc5, a[12], a[13])
        _prelu_from_keras(self.prelu5, a[14])
        _linear_from_keras(self.box_head, a[15], a[16])
        _linear_from_keras(self.landmark_head, a[17], a[18])
        _linear_from_keras(self.class_head, a[19], a[20])


# ------------------------------------------------------- image operations --


def _cell_bounds(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Start and end, in input pixels, of each output cell of TF's ResizeArea.

    float32 like TensorFlow's kernel, so the cell borders round the same way.
    """
    step = np.float32(in_size) / np.float32(out_size)
    starts = np.arange(out_size, dtype=np.float32) * step
    ends = np.arange(1, out_size + 1, dtype=np.float32) * step
    return starts, ends, step


@lru_cache(maxsize=256)
def _area_taps(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices (out, taps) and weights of ResizeArea along one axis.

    Each output cell averages the input cells it covers, weighted by the
    covered fraction. torch's "area" mode (adaptive average pooling) rounds
    cell borders to whole pixels instead, which moves boxes by 1-3 px.
    An index that rounding pushes past the last pixel is clamped, as in TF.
    """
    starts, ends, step = _cell_bounds(in_size, out_size)
    first = np.floor(starts).astype(np.int64)
    taps = int((np.ceil(ends).astype(np.int64) - first).max())
    index = first[:, None] + np.arange(taps)[None, :]
    covered = np.minimum(index + 1, ends[:, None]) - np.maximum(index, starts[:, None])
    weight = (np.clip(covered, 0, None) / step).astype(np.float32)
    return torch.from_numpy(np.clip(index, 0, in_size - 1)), torch.from_numpy(weight)


@lru_cache(maxsize=256)
def _area_integral_points(in_size: int, out_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Whole-pixel index and fraction of both borders of each output cell."""
    starts, ends, step = _cell_bounds(in_size, out_size)
    start_index, end_index = np.floor(starts), np.floor(ends)
    return (torch.from_numpy(start_index.astype(np.int64)), torch.from_numpy(starts - start_index),
            torch.from_numpy(end_index.astype(np.int64)), torch.from_numpy(ends - end_index),
            float(step))


def _resize_rows(prefix: torch.Tensor, images: torch.Tensor, out_size: int) -> torch.Tensor:
    """ResizeArea along H of float (n, C, H, W) images, from their row prefix sums.

    A cell [s, e) sums to P(e) - P(s) with P(t) = prefix[floor t] +
    frac(t) * row[floor t]. The whole-row part is an exact integer
    difference, so every pyramid level reads only two rows per output row
    instead of the full image (the cost that dominated detection).
    """
    height = images.shape[2]
    start, start_frac, end, end_frac, step = _area_integral_points(height, out_size)
    start, end = start.to(images.device), end.to(images.device)
    shape = (1, 1, out_size, 1)
    whole = prefix.index_select(2, end)
    whole -= prefix.index_select(2, start)
    total = whole.float()
    # A border at t = H (or just past it, from float rounding) reads the last
    # row again: TensorFlow clamps that index the same way.
    total.addcmul_(images.index_select(2, end.clamp(max=height - 1)), end_frac.to(images.device).view(shape))
    total.addcmul_(images.index_select(2, start), start_frac.to(images.device).view(shape), value=-1)
    return total.div_(step)


def _resize_columns(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """ResizeArea along the last axis of a float (n, C, h, W) tensor, by weighted taps.

    Done on the transpose, where each tap copies whole rows rather than
    scattered elements (about 1.4x faster). Returns a transposed view.
    """
    index, weight = _area_taps(x.shape[-1], out_size)
    index, weight = index.to(x.device), weight.to(x.device)
    rows = x.transpose(-1, -2).contiguous()  # (n, C, W, h)
    n, c, _, h = rows.shape
    gathered = rows.index_select(2, index.flatten()).view(n, c, out_size, index.shape[1], h)
    return (gathered * weight[:, :, None]).sum(3).transpose(-1, -2)


def area_pyramid(frames: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """TensorFlow-equivalent AREA resizes of uint8 (N, H, W, 3) frames.

    Returns one float (N, 3, h, w) tensor of raw 0-255 values per size
    (a transposed view; P-Net's input conversion makes it contiguous).
    """
    images = frames.permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    prefix = F.pad(torch.cumsum(images, dim=2, dtype=torch.int32), (0, 0, 1, 0))
    images = images.float()
    return [_resize_columns(_resize_rows(prefix, images, h), w) for h, w in sizes]


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, frame_index: torch.Tensor,
                    size: int, fill: float = 0.0) -> torch.Tensor:
    """TensorFlow `crop_and_resize` (bilinear, `fill` outside the image) on pixel boxes.

    images: (N, H, W, C) of any dtype; boxes: (K, 4) x1, y1, x2, y2 in pixels;
    returns float (K, C, size, size). Like the reference, boxes are normalized
    by W and H (not W - 1), then mapped back onto the (W - 1)-wide pixel grid.
    """
    n, h, w, c = images.shape
    steps = torch.arange(size, device=images.device, dtype=torch.float32)

    def positions(start: torch.Tensor, end: torch.Tensor, extent: int) -> torch.Tensor:
        start, end = start / extent, end / extent
        return (start * (extent - 1))[:, None] + steps * ((end - start) * (extent - 1) / (size - 1))[:, None]

    ys = positions(boxes[:, 1], boxes[:, 3], h)  # (K, size)
    xs = positions(boxes[:, 0], boxes[:, 2], w)
    inside = ((ys >= 0) & (ys <= h - 1))[:, :, None] & ((xs >= 0) & (xs <= w - 1))[:, None, :]
    y0, x0 = ys.floor(), xs.floor()
    y_lerp, x_lerp = (ys - y0)[:, :, None, None], (xs - x0)[:, None, :, None]
    y0 = y0.long().clamp(0, h - 1)
    x0 = x0.long().clamp(0, w - 1)
    y1 = ys.ceil().long().clamp(0, h - 1)
    x1 = xs.ceil().long().clamp(0, w - 1)

    flat = images.reshape(n * h * w, c)
    base = (frame_index.long() * (h * w))[:, None, None]

    def pixels(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return flat[base + rows[:, :, None] * w + cols[:, None, :]].float()  # (K, size, size, C)

    top_left, top_right = pixels(y0, x0), pixels(y0, x1)
    bottom_left, bottom_right = pixels(y1, x0), pixels(y1, x1)
    top = top_left + (top_right - top_left) * x_lerp
    bottom = bottom_left + (bottom_right - bottom_left) * x_lerp
    crops = torch.where(inside[:, :, :, None], top + (bottom - top) * y_lerp, fill)
    return crops.permute(0, 3, 1, 2)  # channels_last memory, which the convolutions prefer


# ------------------------------------------------------------- box helpers --


def pairwise_overlap(a: torch.Tensor, b: torch.Tensor, method: str) -> torch.Tensor:
    """Overlap of (..., K, 4) with (..., M, 4) boxes -> (..., K, M).

    "union" is IoU, "min" divides by the smaller area. Areas are
    (x2 - x1) * (y2 - y1), without the +1 of some MTCNN ports.
    """
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    top_left = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    bottom_right = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    if method == "union":
        return inter / (area_a[..., :, None] + area_b[..., None, :] - inter)
    if method == "min":
        return inter / torch.minimum(area_a[..., :, None], area_b[..., None, :])
    raise ValueError(f"unknown overlap method {method!r}")


def grouped_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                threshold: float, method: str = "union") -> torch.Tensor:
    """Indices of the boxes kept by the reference's NMS, run within each group.

    The reference drops a box when it overlaps more than `threshold` with ANY
    higher-scored box of its group, kept or not (not the usual greedy NMS).
    That rule has no sequential dependency, so it is one masked matrix per
    group. Returned indices are ordered by group, then by descending score.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    _, counts = torch.unique_consecutive(groups[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    group_row = torch.repeat_interleave(torch.arange(len(counts), device=boxes.device), counts)
    slot = torch.arange(len(order), device=boxes.device) - starts[group_row]

    width = int(counts.max())
    padded = boxes.new_zeros(len(counts), width, 4)
    padded[group_row, slot] = boxes[order]
    valid = torch.zeros(len(counts), width, dtype=torch.bool, device=boxes.device)
    valid[group_row, slot] = True
    earlier = torch.ones(width, width, dtype=torch.bool, device=boxes.device).triu(1)

    keep = torch.empty_like(valid)
    groups_per_pass = max(1, _NMS_PAIRS_PER_PASS // (width * width))
    rows_per_pass = max(1, _NMS_PAIRS_PER_PASS // width)  # only < width for huge groups
    for g in range(0, len(counts), groups_per_pass):
        block, present = padded[g:g + groups_per_pass], valid[g:g + groups_per_pass]
        beaten = torch.zeros_like(present)
        for i in range(0, width, rows_per_pass):
            # clash[., i, j]: better-ranked box i overlaps box j (NaN compares False).
            clash = pairwise_overlap(block[:, i:i + rows_per_pass], block, method) > threshold
            clash &= earlier[i:i + rows_per_pass] & present[:, i:i + rows_per_pass, None]
            beaten |= clash.any(dim=1)
        keep[g:g + groups_per_pass] = present & ~beaten
    return order[keep[group_row, slot]]


def square_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Grow the short side about the centre so each box is square."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + w * 0.5 - side * 0.5
    y1 = boxes[:, 1] + h * 0.5 - side * 0.5
    return torch.stack([x1, y1, x1 + side, y1 + side], dim=1)


def refine_boxes(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply R-Net/O-Net offsets, in units of the box size (+1 as the reference)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    return boxes + offsets * torch.stack([w, h, w, h], dim=1)


def pyramid_scales(height: int, width: int, min_face_size: int, scale_factor: float,
                   window: int = 12) -> list[float]:
    """The reference's image pyramid: scale k = (12 / min_face) * factor**k.

    The level count depends on the image alone (not min_face_size), as in the
    reference; levels smaller than the 12 px window are dropped here, where the
    reference would fail on the whole image.
    """
    min_dim = min(width, height)
    count = round(-((math.log(min_dim / window) / math.log(scale_factor)) + 1))
    first = window / min_face_size
    scales = [first * scale_factor ** k for k in range(max(count, 0))]
    return [s for s in scales if int(height * s) >= window and int(width * s) >= window]


def _network_input(frames: torch.Tensor, boxes: torch.Tensor, frame_index: torch.Tensor,
                   size: int) -> torch.Tensor:
    """Crops for R-Net / O-Net, normalized as the Keras nets expect.

    The reference crops the normalized image with zeros outside it; cropping
    the raw frames with 127.5 outside and normalizing the small crops is the
    same arithmetic without converting whole frames to float.
    """
    return crop_and_resize(frames, boxes, frame_index, size, fill=127.5).sub_(127.5).div_(128.0)


@contextmanager
def _full_float32(device: torch.device) -> Iterator[None]:
    """Turn TF32 off on CUDA for the duration of a detection.

    PyTorch runs float32 convolutions in TF32 on CUDA by default; through the
    cascade that moved boxes by up to 10 px against the CPU. The flags are
    process-wide, so they are restored afterwards.
    """
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------- detector --


class MTCNN(nn.Module):
    """Three-stage MTCNN over batches of same-size RGB frames."""

    def __init__(self, min_face_size: int = 20, scale_factor: float = 0.709,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.8),
                 pyramid: Callable[[torch.Tensor, list[tuple[int, int]]], list[torch.Tensor]] = area_pyramid) -> None:
        """`pyramid`: `area_pyramid` or a faster equivalent with the same contract (the caller
        may hand in OpenCV's float INTER_AREA, which agrees within 0.01 of 255 on CPU)."""
        super().__init__()
        self.pyramid = pyramid
        self.min_face_size = min_face_size
        self.scale_factor = scale_factor
        self.thresholds = tuple(thresholds)
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()

    def load_keras_arrays(self, pnet: list[np.ndarray], rnet: list[np.ndarray],
                          onet: list[np.ndarray]) -> None:
        """Load the three weight lists of the `mtcnn` package."""
        self.pnet.load_keras_arrays(pnet)
        self.rnet.load_keras_arrays(rnet)
        self.onet.load_keras_arrays(onet)

    @torch.no_grad()
    def detect(self, frames: torch.Tensor, return_landmarks: bool = False
               ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Faces in a uint8 (N, H, W, 3) RGB batch on the module's device.

        Returns per frame a float32 (K, 5) tensor x1, y1, x2, y2, score sorted
        by descending score (see the module docstring for the box convention).
        With `return_landmarks`, also per frame (K, 5, 2) landmark (x, y):
        left eye, right eye, nose, mouth left, mouth right.
        """
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected (N, H, W, 3) frames, got {tuple(frames.shape)}")
        n, h, w, _ = frames.shape
        if n == 0:
            return ([], []) if return_landmarks else []

        with _full_float32(frames.device):
            boxes, frame_index = self._propose(frames)
            if len(boxes):
                boxes, scores, frame_index = self._refine(frames, boxes, frame_index)
            if len(boxes):
                boxes, scores, landmarks, frame_index = self._output(frames, boxes, frame_index)
            else:  # boxes and frame_index are already empty
                scores, landmarks = boxes.new_zeros(0), boxes.new_zeros(0, 10)

        # The reference's default fit_to_image clamps corners to the last pixel.
        limit = boxes.new_tensor([w - 1, h - 1, w - 1, h - 1])
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        result = torch.cat([boxes, scores[:, None]], dim=1)
        counts = torch.bincount(frame_index, minlength=n).tolist()
        per_frame = list(torch.split(result, counts))  # already ordered by frame, score
        if not return_landmarks:
            return per_frame
        points = torch.stack([landmarks[:, :5], landmarks[:, 5:]], dim=2)
        return per_frame, list(torch.split(points, counts))

    def _propose(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the pyramid -> square candidate boxes and their frame index."""
        n, h, w, _ = frames.shape
        scales = pyramid_scales(h, w, self.min_face_size, self.scale_factor)
        # On CPU, one frame per pass keeps the pyramid and P-Net's activations in
        # cache (about 2x faster than 32 at once) and makes the boxes independent
        # of the batch size (oneDNN's blocking, hence rounding, follows it).
        # A GPU wants the whole batch at once.
        step = 1 if frames.device.type == "cpu" else n
        found = [self._pnet_candidates(frames[first:first + step], first, scales)
                 for first in range(0, n, step)]
        boxes, scores, groups = (torch.cat(parts) for parts in zip(*found))
        keep = grouped_nms(boxes, scores, groups, 0.5)  # per frame and level
        boxes, scores, frame_index = boxes[keep], scores[keep], groups[keep] // len(scales)
        keep = grouped_nms(boxes, scores, frame_index, 0.7)  # per frame, across levels
        return square_boxes(boxes[keep]), frame_index[keep]

    def _pnet_candidates(self, frames: torch.Tensor, first_frame: int, scales: list[float]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boxes, scores and group ids (frame * levels + level) above P-Net's threshold."""
        _, h, w, _ = frames.shape
        # The reference truncates the scaled sizes (ceil moves boxes).
        levels = self.pyramid(frames, [(int(h * s), int(w * s)) for s in scales])
        # Seeded empty so that frames without any candidate still concatenate.
        boxes = [torch.zeros(0, 4, device=frames.device)]
        scores = [torch.zeros(0, device=frames.device)]
        groups = [torch.zeros(0, dtype=torch.long, device=frames.device)]
        for level, (scale, scaled) in enumerate(zip(scales, levels)):
            # channels_last runs P-Net's convolutions about 1.6x faster on CPU.
            scaled = scaled.sub_(127.5).div_(128.0).contiguous(memory_format=torch.channels_last)
            offsets, probability = self.pnet(scaled)
            frame, y, x = torch.nonzero(probability > self.thresholds[0], as_tuple=True)
            # Cell (x, y) covers pixels 2x+1 .. 2x+12 in the reference's convention.
            cell = torch.stack([2 * x + 1, 2 * y + 1, 2 * x + 12, 2 * y + 12], dim=1).float()
            boxes.append((cell + offsets[frame, :, y, x] * 11.0) / scale)
            scores.append(probability[frame, y, x])
            groups.append((frame + first_frame) * len(scales) + level)
        return torch.cat(boxes), torch.cat(scores), torch.cat(groups)

    def _refine(self, frames: torch.Tensor, boxes: torch.Tensor, frame_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """R-Net on 24x24 crops of every candidate of every frame at once."""
        offsets, scores = self.rnet(_network_input(frames, boxes, frame_index, 24))
        boxes = refine_boxes(boxes, offsets)
        passed = scores > self.thresholds[1]
        boxes, scores, frame_index = boxes[passed], scores[passed], frame_index[passed]
        keep = grouped_nms(boxes, scores, frame_index, 0.7)
        return square_boxes(boxes[keep]), scores[keep], frame_index[keep]

    def _output(self, frames: torch.Tensor, boxes: torch.Tensor, frame_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """O-Net on 48x48 crops: final boxes, scores and landmarks."""
        offsets, points, scores = self.onet(_network_input(frames, boxes, frame_index, 48))
        w = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        h = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        # Landmarks are placed in the box O-Net saw, before its own offsets.
        landmarks = torch.cat([w * points[:, :5] + boxes[:, :1] - 1,
                               h * points[:, 5:] + boxes[:, 1:2] - 1], dim=1)
        boxes = refine_boxes(boxes, offsets)
        passed = scores > self.thresholds[2]
        boxes, scores = boxes[passed], scores[passed]
        landmarks, frame_index = landmarks[passed], frame_index[passed]
        keep = grouped_nms(boxes, scores, frame_index, 0.7, method="min")
        return boxes[keep], scores[keep], landmarks[keep], frame_index[keep]
