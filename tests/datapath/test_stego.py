import hashlib
from pathlib import Path

import decord
import numpy as np
import pytest

from tasks.datapath.keys import Key
from tasks.datapath.stego import (LENGTH_BITS, TAG_BITS, FramePayload, PayloadError, PayloadForged, PayloadMismatch,
                                  PayloadMissing, RoiRecord, _tag, capacity_bits, carrier_mask, carrier_positions,
                                  embed, extract, format_message, parse_message, payload_bits, read_envelope)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
CLIPS = ["WolfgangLanger_Pexels.mp4", "carphone_pristine.mp4"]
KEY = Key(hashlib.sha256(b"test key").digest())
OTHER_KEY = Key(hashlib.sha256(b"other key").digest())
VIDEO_ID = hashlib.sha256(b"video").hexdigest()
ENVELOPE = b'[{"fp":"0123456789abcdef","kem":"x25519","w":"AAAA"}]'
MESSAGE_START = 2 * LENGTH_BITS  # with an empty envelope: both length fields come first


@pytest.fixture(scope="module", params=CLIPS)
def frames(request) -> np.ndarray:
    """Two real decoded frames (uint8 RGB) of one sample clip."""
    return decord.VideoReader(str(SAMPLES / request.param)).get_batch([0, 60]).asnumpy()


def make_payload(frame_index: int, n_rois: int, key: Key = KEY) -> FramePayload:
    rois = tuple(
        RoiRecord(x=10 + 25 * i, y=16 + 20 * i, w=9 + i, h=15 + 2 * i, seq_id=i)
        for i in range(n_rois)
    )
    return FramePayload(frame_index=frame_index, video_id=VIDEO_ID, key_id=key.key_id, rois=rois)


def flip_wire_bit(public: np.ndarray, payload: FramePayload, bit: int) -> np.ndarray:
    """A copy of `public` with one carrier LSB (bit `bit` of the wire format) flipped."""
    height, width, _ = public.shape
    slot = carrier_positions(height, width, payload_bits(payload))[bit]
    damaged = public.copy()
    damaged.reshape(-1)[slot] ^= 1
    return damaged


@pytest.mark.parametrize("n_rois", [0, 1, 5])
def test_round_trip_on_real_frames(frames, n_rois):
    for index, frame in enumerate(frames):
        payload = make_payload(index, n_rois)
        public = embed(frame, payload, KEY)
        assert extract(public, KEY, expected_frame_index=index) == payload
        assert extract(public, KEY) == payload


@pytest.mark.parametrize("n_rois", [0, 5])
def test_only_carrier_slots_change_by_at_most_one(frames, n_rois):
    frame = frames[0]
    original = frame.copy()
    payload = make_payload(3, n_rois)
    public = embed(frame, payload, KEY)

    np.testing.assert_array_equal(frame, original)  # input untouched
    assert public is not frame and not np.shares_memory(public, frame)
    mask = carrier_mask(*frame.shape[:2], payload)
    assert mask.sum() == payload_bits(payload)
    np.testing.assert_array_equal(public[~mask], frame[~mask])
    diff = np.abs(public.astype(np.int16) - frame.astype(np.int16))
    assert diff.max() <= 1
    # About half the carrier LSBs already held the right bit.
    assert 0.3 < (diff[mask] == 1).mean() < 0.7


def test_every_message_and_tag_flip_is_forged(frames):
    payload = make_payload(7, 3)
    public = embed(frames[0], payload, KEY)
    message_bits = 8 * len(format_message(payload))
    # The lowest bit of each message byte keeps it printable ASCII ('7' -> '6',
    # ';' -> ':'), so parsing goes on and the HMAC must be what catches it.
    lowest_bits = [MESSAGE_START + 8 * i + 7 for i in range(message_bits // 8)]
    tag_bits = list(range(MESSAGE_START + message_bits, MESSAGE_START + message_bits + TAG_BITS))
    for bit in lowest_bits + tag_bits:
        with pytest.raises(PayloadForged):
            extract(flip_wire_bit(public, payload, bit), KEY)


def test_length_and_high_bit_flips_are_rejected(frames):
    payload = make_payload(7, 3)
    public = embed(frames[0], payload, KEY)
    for bit in range(2 * LENGTH_BITS):
        with pytest.raises(PayloadError):
            extract(flip_wire_bit(public, payload, bit), KEY)
    # The top bit of a message byte makes it non-ASCII: unreadable, not a payload.
    with pytest.raises(PayloadMissing):
        extract(flip_wire_bit(public, payload, MESSAGE_START + 8 * 5), KEY)


def test_changes_outside_carriers_are_harmless(frames):
    payload = make_payload(7, 3)
    public = embed(frames[0], payload, KEY)
    mask = carrier_mask(*public.shape[:2], payload)
    touched = public.copy()
    touched[~mask] ^= 1
    assert extract(touched, KEY) == payload


def test_payload_from_another_frame_is_a_mismatch(frames):
    public = embed(frames[0], make_payload(7, 2), KEY)
    assert extract(public, KEY, expected_frame_index=7).frame_index == 7
    with pytest.raises(PayloadMismatch, match="frame 7"):
        extract(public, KEY, expected_frame_index=8)
    with pytest.raises(PayloadMismatch):
        extract(public, KEY, expected_video_id="ab" * 32)


def test_payload_naming_another_key_is_a_mismatch(frames):
    foreign = format_message(make_payload(1, 1, key=OTHER_KEY)).encode()
    # Validly signed with KEY, another key's id inside: written by hand, as embed() refuses it.
    wire = (0).to_bytes(4, "big") + len(foreign).to_bytes(4, "big") + foreign + _tag(b"", foreign, KEY)
    bits = np.unpackbits(np.frombuffer(wire, dtype=np.uint8))
    public = frames[0].copy()
    flat = public.reshape(-1)
    slots = carrier_positions(*public.shape[:2], bits.size)
    flat[slots] = (flat[slots] & 0xFE) | bits
    with pytest.raises(PayloadMismatch):
        extract(public, KEY)


def test_the_envelope_travels_and_is_covered_by_the_tag(frames):
    payload = make_payload(4, 2)
    public = embed(frames[0], payload, KEY, ENVELOPE)
    assert read_envelope(public) == (ENVELOPE, payload)  # readable before any key is known
    assert extract(public, KEY) == payload
    assert payload_bits(payload, ENVELOPE) == payload_bits(payload) + 8 * len(ENVELOPE)
    for bit in (LENGTH_BITS + 8 * 3 + 7, LENGTH_BITS + 8 * len(ENVELOPE) - 1):  # inside the envelope
        height, width, _ = public.shape
        damaged = public.copy()
        damaged.reshape(-1)[carrier_positions(height, width, payload_bits(payload, ENVELOPE))[bit]] ^= 1
        with pytest.raises(PayloadForged):
            extract(damaged, KEY)


def test_wrong_key_never_returns_a_payload(frames):
    public = embed(frames[0], make_payload(7, 3), KEY)
    for i in range(20):
        wrong = Key(hashlib.sha256(b"wrong %d" % i).digest())
        with pytest.raises(PayloadForged):
            extract(public, wrong)


def test_frame_without_payload_is_missing(frames):
    for frame in frames:
        with pytest.raises(PayloadMissing):
            extract(frame, KEY)


def test_tiny_frame_is_refused(frames):
    tiny = np.ascontiguousarray(frames[0][:4, :4])
    with pytest.raises(PayloadError, match="4x4"):
        embed(tiny, make_payload(0, 0), KEY)
    with pytest.raises(PayloadMissing):
        extract(tiny, KEY)
    small = np.ascontiguousarray(frames[0][:16, :16])  # 768 slots < 5 ROIs' payload
    assert payload_bits(make_payload(0, 5)) > capacity_bits(16, 16)
    with pytest.raises(PayloadError, match="needs"):
        embed(small, make_payload(0, 5), KEY)


def test_embed_refuses_a_payload_for_another_key(frames):
    with pytest.raises(PayloadError, match="key"):
        embed(frames[0], make_payload(0, 1, key=OTHER_KEY), KEY)


def test_extract_reads_non_contiguous_frames(frames):
    payload = make_payload(2, 2)
    public = embed(frames[0], payload, KEY)
    assert extract(np.asfortranarray(public), KEY) == payload


def test_carriers_are_spread_stable_and_depend_on_the_frame_size():
    positions = carrier_positions(360, 640, 2000)
    assert len(np.unique(positions)) == 2000
    np.testing.assert_array_equal(positions, carrier_positions(360, 640, 2000))
    assert not np.all(np.diff(positions) > 0)  # pseudo-random order, not a scan
    rows = positions // (640 * 3)
    assert rows.min() < 36 and rows.max() > 324  # spread over the whole frame
    assert np.mean(positions == carrier_positions(360, 641, 2000)) < 0.01
    # Pinned: a public file written today must stay readable after a numpy upgrade.
    assert positions[:4].tolist() == [312021, 297707, 584119, 417351]
    with pytest.raises(ValueError):
        positions[0] = 0  # the cached sequence is read-only


def test_small_frames_use_all_slots():
    positions = carrier_positions(4, 4, capacity_bits(4, 4))
    assert sorted(positions.tolist()) == list(range(48))


def test_message_extends_the_paper_protocol():
    payload = FramePayload(
        12, "abc123", KEY.key_id, (RoiRecord(10, 16, 9, 15, 0), RoiRecord(25, 45, 8, 14, 1))
    )
    message = format_message(payload)
    assert message == f"UU2;f=12;v=abc123;k={KEY.key_id};2,10,16,9,15,0,25,45,8,14,1,"
    assert parse_message(message) == payload
    assert payload_bits(payload) == 32 + 32 + 8 * len(message) + 128


def test_numpy_integers_are_normalised():
    roi = RoiRecord(np.int64(3), np.int32(4), np.int64(5), np.int64(6), np.int64(7))
    assert type(roi.x) is int and roi == RoiRecord(3, 4, 5, 6, 7)
    with pytest.raises(TypeError):
        RoiRecord(1.5, 0, 1, 1, 0)


@pytest.mark.parametrize(
    "body",
    [
        "UU1;f=1;v=ab;k={k};0,",  # the former version (its wire format differs)
        "UU2;f=01;v=ab;k={k};0,",  # leading zero
        "UU2;f=-1;v=ab;k={k};0,",  # negative
        "UU2;f=1;v=AB;k={k};0,",  # uppercase video id
        "UU2;f=1;v=;k={k};0,",  # empty video id
        "UU2;f=1;v=" + "a" * 65 + ";k={k};0,",  # video id too long
        "UU2;f=1;v=ab;k=abc;0,",  # key id too short
        "UU2;f=1;v=ab;k={k};0",  # no trailing comma
        "UU2;f=1;v=ab;k={k};",  # no count
        "UU2;f=1;v=ab;k={k};1,",  # count without ROI
        "UU2;f=1;v=ab;k={k};1,1,2,3,4,",  # ROI missing its sequence id
        "UU2;f=1;v=ab;k={k};0,1,2,3,4,5,",  # ROI beyond the count
        "UU2;f=1;v=ab;k={k};1,1,2,0,4,5,",  # zero width
        "UU2;f=1;v=ab;k={k};1, 1,2,3,4,5,",  # whitespace
        "UU2;f=1;v=ab;k={k};0,x",  # trailing junk
    ],
)
def test_parse_rejects_malformed_messages(body):
    with pytest.raises(PayloadError):
        parse_message(body.format(k=KEY.key_id))


def test_payload_fields_are_validated():
    with pytest.raises(ValueError):
        FramePayload(-1, "ab", KEY.key_id, ())
    with pytest.raises(ValueError):
        FramePayload(0, "not-hex", KEY.key_id, ())
    with pytest.raises(ValueError):
        FramePayload(0, "ab", "short", ())
    with pytest.raises(ValueError):
        RoiRecord(0, 0, 0, 5, 0)
