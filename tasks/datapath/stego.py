"""Hide each frame's ROI list in the pixels of a lossless public stream, authenticated.

Reversal must crop exactly the boxes that were de-identified (Proença 2021,
Sec. III-C), so every public frame carries them: the paper's message
`n,x1,y1,w1,h1,...` extended with a sequence id per ROI and a header naming
the frame, the video and the payload key. On the wire:

    32-bit length | key envelope | 32-bit length | ASCII message | 16-byte HMAC-SHA256 tag

written MSB first into the least significant bits of a pseudo-random sequence of
(y, x, channel) slots over the whole frame. The envelope is the video's data key wrapped
for each authority (`keys.wrap_data_key`): with it, a lossless public file whose sealed
attachment was stripped still reverses by the learned path, from any single frame. The
tag, under a key derived from the data key, covers envelope and message, so a damaged or
forged payload is rejected, never trusted. The slot order is public (seeded by the frame
size): an outsider can read where the faces were, which the public frame shows anyway,
but not forge a payload or learn a key. Only lossless public streams keep LSBs intact.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import operator
import re
from dataclasses import dataclass

import numpy as np

from tasks.datapath.keys import Key, derive_seed

VERSION = "UU2"
LENGTH_BITS = 32
TAG_BYTES = 16
TAG_BITS = 8 * TAG_BYTES
# 8 KiB of message is room for hundreds of ROIs; capping the carrier sequence
# keeps the per-video setup small however large the frame is.
MAX_CARRIER_BITS = 64 * 1024
_TAG_DOMAIN = b"uunet-stego-v2"
_CARRIER_SEED = Key(b"uunet-public-carrier-order-v2\x00\x00\x00")
_NUMBER = r"(?:0|[1-9][0-9]*)"  # canonical decimals only: one message, one encoding
_MESSAGE = re.compile(
    rf"{VERSION};f=({_NUMBER});v=([0-9a-f]{{1,64}});k=([0-9a-f]{{16}});((?:{_NUMBER},)+)"
)
_VIDEO_ID = re.compile(r"[0-9a-f]{1,64}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class PayloadError(Exception):
    """A frame's payload cannot be written or trusted."""


class PayloadMissing(PayloadError):
    """No payload readable with this key: wrong key, or the frame never carried one."""


class PayloadForged(PayloadError):
    """A payload is present but its HMAC does not match: damaged or tampered with."""


class PayloadMismatch(PayloadError):
    """An authentic payload that belongs elsewhere (another frame, video or key)."""


@dataclass(frozen=True)
class RoiRecord:
    """One de-identified box (absolute pixels) and the sequence it belongs to."""

    x: int
    y: int
    w: int
    h: int
    seq_id: int

    def __post_init__(self) -> None:
        for name in ("x", "y", "w", "h", "seq_id"):
            # operator.index accepts numpy integers and rejects floats.
            object.__setattr__(self, name, operator.index(getattr(self, name)))
        if min(self.x, self.y, self.seq_id) < 0 or min(self.w, self.h) < 1:
            raise ValueError(f"invalid ROI {self}")


@dataclass(frozen=True)
class FramePayload:
    """Everything one public frame carries."""

    frame_index: int
    video_id: str
    key_id: str
    rois: tuple[RoiRecord, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "frame_index", operator.index(self.frame_index))
        object.__setattr__(self, "rois", tuple(self.rois))
        if self.frame_index < 0:
            raise ValueError(f"frame index must be >= 0, got {self.frame_index}")
        if not _VIDEO_ID.fullmatch(self.video_id):
            raise ValueError(f"video id must be 1-64 lowercase hex chars, got {self.video_id!r}")
        if not _KEY_ID.fullmatch(self.key_id):
            raise ValueError(f"key id must be 16 lowercase hex chars, got {self.key_id!r}")
        if not all(isinstance(roi, RoiRecord) for roi in self.rois):
            raise TypeError("rois must be RoiRecord instances")


def format_message(payload: FramePayload) -> str:
    """The ASCII message, e.g. `UU1;f=12;v=ab;k=<key id>;2,10,16,9,15,0,25,45,8,14,1,`."""
    header = f"{VERSION};f={payload.frame_index};v={payload.video_id};k={payload.key_id};"
    rois = "".join(f"{r.x},{r.y},{r.w},{r.h},{r.seq_id}," for r in payload.rois)
    return f"{header}{len(payload.rois)},{rois}"


def parse_message(message: str) -> FramePayload:
    """Parse a message strictly; anything `format_message` would not produce is rejected."""
    match = _MESSAGE.fullmatch(message)
    if match is None:
        raise PayloadError("malformed payload message")
    frame_index, video_id, key_id, body = match.groups()
    numbers = [int(token) for token in body[:-1].split(",")]
    count, values = numbers[0], numbers[1:]
    if len(values) != 5 * count:
        raise PayloadError(f"payload announces {count} ROIs but holds {len(values) / 5:g}")
    try:
        rois = tuple(RoiRecord(*values[i : i + 5]) for i in range(0, len(values), 5))
    except ValueError as error:
        raise PayloadError(f"malformed payload ROI: {error}") from None
    return FramePayload(int(frame_index), video_id, key_id, rois)


def payload_bits(payload: FramePayload, envelope: bytes = b"") -> int:
    """How many carrier slots `embed` writes for this payload."""
    return 2 * LENGTH_BITS + 8 * len(envelope) + 8 * len(format_message(payload)) + TAG_BITS


def capacity_bits(height: int, width: int) -> int:
    """How many carrier slots a frame of this size offers."""
    return min(height * width * 3, MAX_CARRIER_BITS)


def carrier_positions(height: int, width: int, count: int) -> np.ndarray:
    """The first `count` carrier slots, as read-only flat indices into an (H, W, 3) frame."""
    capacity = capacity_bits(height, width)
    if not 0 <= count <= capacity:
        raise ValueError(
            f"{count} carrier slots requested, a {height}x{width} frame has {capacity}"
        )
    seed = derive_seed(_CARRIER_SEED, "carriers", height, width)
    return _carrier_sequence(seed, height * width * 3, capacity)[:count]


@functools.lru_cache(maxsize=32)
def _carrier_sequence(seed: int, n_slots: int, count: int) -> np.ndarray:
    """`count` distinct slots in [0, n_slots), in keyed pseudo-random order.

    Uses the PCG64 raw stream (its output is fixed across numpy
    versions, unlike `Generator` methods) with first occurrences kept, so
    a public video stays readable after a numpy upgrade.
    """
    bit_generator = np.random.PCG64(seed)
    stream = np.empty(0, dtype=np.uint64)
    while True:
        stream = np.concatenate([stream, bit_generator.random_raw(_draws_for(count, n_slots))])
        # The modulo bias is below n_slots / 2**64: irrelevant for placement.
        slots = (stream % np.uint64(n_slots)).astype(np.int64)
        _, first = np.unique(slots, return_index=True)
        if first.size >= count:
            break
    sequence = slots[np.sort(first)[:count]]
    sequence.flags.writeable = False
    return sequence


def _draws_for(count: int, n_slots: int) -> int:
    """Random draws that, in expectation, yield `count` distinct slots (plus margin)."""
    if count >= n_slots:
        return int(n_slots * (math.log(n_slots) + 2)) + 64
    return int(-n_slots * math.log1p(-count / n_slots) * 1.05) + 64


def carrier_mask(height: int, width: int, payload: FramePayload, envelope: bytes = b"") -> np.ndarray:
    """Bool (H, W, 3), True at the slots `embed` writes for `payload`."""
    mask = np.zeros(height * width * 3, dtype=bool)
    mask[carrier_positions(height, width, payload_bits(payload, envelope))] = True
    return mask.reshape(height, width, 3)


def _tag(envelope: bytes, message: bytes, key: Key) -> bytes:
    framed = _TAG_DOMAIN + len(envelope).to_bytes(4, "big") + envelope + message
    return hmac.new(key.secret, framed, hashlib.sha256).digest()[:TAG_BYTES]


def embed(frame: np.ndarray, payload: FramePayload, key: Key, envelope: bytes = b"") -> np.ndarray:
    """A copy of `frame` carrying `envelope` and `payload`; only carrier LSBs change (by at most 1)."""
    if payload.key_id != key.key_id:
        raise PayloadError(f"payload is for key {payload.key_id}, embedding with key {key.key_id}")
    height, width = _check_frame(frame)
    data = format_message(payload).encode("ascii")
    wire = (len(envelope).to_bytes(4, "big") + envelope + len(data).to_bytes(4, "big") + data
            + _tag(envelope, data, key))
    bits = np.unpackbits(np.frombuffer(wire, dtype=np.uint8))
    capacity = capacity_bits(height, width)
    if bits.size > capacity:
        raise PayloadError(
            f"payload needs {bits.size} bits, a {height}x{width} frame carries {capacity}"
        )
    public = np.array(frame, dtype=np.uint8, order="C", copy=True)
    flat = public.reshape(-1)
    slots = carrier_positions(height, width, bits.size)
    flat[slots] = (flat[slots] & 0xFE) | bits
    return public


def read_envelope(frame: np.ndarray) -> tuple[bytes, FramePayload]:
    """The key envelope and the payload of a public frame, NOT yet authenticated.

    For the private module to learn which video and which recipients a frame is for when
    the sealed data is gone; it then unwraps the data key and calls `extract`, which
    checks the tag. Raises `PayloadMissing` or `PayloadError` when nothing parses.
    """
    envelope, data, _ = _read_wire(frame)
    return envelope, parse_message(data.decode("ascii"))


def _read_wire(frame: np.ndarray) -> tuple[bytes, bytes, bytes]:
    """(envelope, message, tag) as written by `embed`."""
    flat, sequence = _carrier_view(frame)
    length = int.from_bytes(_read_bytes(flat, sequence[:LENGTH_BITS]), "big")
    if 2 * LENGTH_BITS + 8 * length + TAG_BITS > sequence.size:
        raise PayloadMissing("no payload in this frame (implausible envelope length)")
    envelope = _read_bytes(flat, sequence[LENGTH_BITS : LENGTH_BITS + 8 * length])
    start = LENGTH_BITS + 8 * length
    length = int.from_bytes(_read_bytes(flat, sequence[start : start + LENGTH_BITS]), "big")
    start += LENGTH_BITS
    end = start + 8 * length + TAG_BITS
    if length == 0 or end > sequence.size:
        raise PayloadMissing("no payload in this frame (implausible length field)")
    data = _read_bytes(flat, sequence[start : end - TAG_BITS])
    if not (data.isascii() and data.decode("ascii").isprintable()):
        raise PayloadMissing("no payload in this frame (message is not printable ASCII)")
    return envelope, data, _read_bytes(flat, sequence[end - TAG_BITS : end])


def extract(
    frame: np.ndarray,
    key: Key,
    expected_frame_index: int | None = None,
    expected_video_id: str | None = None,
) -> FramePayload:
    """Read and verify the payload of a public frame.

    Raises `PayloadMissing` when nothing readable is there for this key,
    `PayloadForged` when the HMAC fails, and `PayloadMismatch` when an
    authentic payload names another key, frame or video (e.g. one copied
    from another frame).
    """
    envelope, data, tag = _read_wire(frame)
    if not hmac.compare_digest(tag, _tag(envelope, data, key)):
        raise PayloadForged("payload HMAC mismatch: damaged, forged, or read with another video's key")

    payload = parse_message(data.decode("ascii"))
    if payload.key_id != key.key_id:
        raise PayloadMismatch(f"payload names key {payload.key_id}, read with {key.key_id}")
    if expected_frame_index is not None and payload.frame_index != expected_frame_index:
        raise PayloadMismatch(
            f"payload is for frame {payload.frame_index}, found in frame {expected_frame_index}"
        )
    if expected_video_id is not None and payload.video_id != expected_video_id:
        raise PayloadMismatch(
            f"payload is for video {payload.video_id}, found in video {expected_video_id}"
        )
    return payload


def _carrier_view(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    height, width = _check_frame(frame)
    capacity = capacity_bits(height, width)
    if capacity < 2 * LENGTH_BITS + TAG_BITS:
        raise PayloadMissing(f"a {height}x{width} frame is too small to carry a payload")
    return np.ravel(frame), carrier_positions(height, width, capacity)


def _read_bytes(flat: np.ndarray, slots: np.ndarray) -> bytes:
    return np.packbits(flat[slots] & 1).tobytes()


def _check_frame(frame: np.ndarray) -> tuple[int, int]:
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) frame, got {frame.dtype} {frame.shape}")
    return frame.shape[0], frame.shape[1]
