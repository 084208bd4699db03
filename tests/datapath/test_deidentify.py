"""Blending and smoothing of the public face (what stays the source, what changes, by how much),
and which U_e / U_d the data path runs per seal mode."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.datapath.deidentify import (
    DEFAULT_WEIGHTS,
    TemporalSmoother,
    WeightsError,
    load_face_pair,
    load_pipeline_pair,
    paste_faces,
)
from tasks.datapath.track import Roi, face_region


def test_face_region_is_full_inside_zero_outside_and_smooth_between():
    weights = face_region(100, 100)
    assert weights[50, 50] == 1.0 and weights[0, 0] == weights[0, 99] == weights[99, 0] == 0.0
    # Worked by hand: u = 38.5/36, v = 0.5/43, r = 1.06951, t = (1.18 - r)/0.18, t^2 (3 - 2t) = 0.66782.
    assert weights[50, 88] == pytest.approx(0.66782, abs=1e-4)
    assert np.array_equal(weights, weights[:, ::-1]) and np.array_equal(weights, weights[::-1, :])
    row = weights[50, 50:]
    assert np.all(np.diff(row) <= 0)  # falls monotonically towards the border
    # No step: smoothstep's steepest slope is 1.5 per ring width, 0.18 * 36 px here: 0.231 per pixel.
    assert np.abs(np.diff(row)).max() < 0.24
    assert not weights.flags.writeable


def test_blended_paste_leaves_the_frame_outside_the_region_untouched():
    frame = np.full((60, 80, 3), 200, dtype=np.uint8)
    roi = Roi(0, 0, 10, 5, 50, 50, None, False)
    face = torch.full((1, 3, 64, 64), 40 / 255.0)
    paste_faces(frame, [roi], face, blend=True)
    weights = face_region(50, 50)
    box = frame[5:55, 10:60].astype(float)
    assert np.all(box[weights == 0] == 200) and np.all(box[weights == 1] == 40)
    ring = (weights > 0) & (weights < 1)
    assert ring.any()
    np.testing.assert_allclose(box[ring][:, 0], np.rint(weights[ring] * 40 + (1 - weights[ring]) * 200), atol=1)
    outside = frame.copy()
    outside[5:55, 10:60] = 200
    assert np.all(outside == 200)  # nothing written outside the box


def test_plain_paste_replaces_the_whole_box():
    frame = np.full((60, 80, 3), 200, dtype=np.uint8)
    paste_faces(frame, [Roi(0, 0, 10, 5, 50, 50, None, False)], torch.full((1, 3, 64, 64), 40 / 255.0))
    assert np.all(frame[5:55, 10:60] == 40) and frame[0, 0, 0] == 200 and frame[55, 60, 0] == 200


def test_smoother_keeps_a_running_mean_per_sequence_and_forgets_ended_ones():
    smooth = TemporalSmoother(0.3)
    ones, zeros = torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    out = smooth([7, 7, 9], torch.cat([ones, zeros, zeros]))
    assert out[0].eq(1).all() and torch.allclose(out[1], torch.full_like(out[1], 0.7))
    assert out[2].eq(0).all()  # sequence 9 starts from its own first face
    out = smooth([7], ones)
    assert torch.allclose(out, torch.full_like(out, 0.3 * 1 + 0.7 * 0.7))
    out = smooth([9], ones)  # 9 was absent from the last call: it ended, a new 9 starts fresh
    assert out.eq(1).all()
    with pytest.raises(ValueError):
        TemporalSmoother(0.0)


def test_the_sealed_default_runs_a_bundled_public_only_u_e_and_seal_none_the_joint_pair(tmp_path, monkeypatch):
    import tasks.datapath.deidentify as deidentify

    joint = load_face_pair("uunet", None)

    def same(a, b):
        return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))

    # No public-only U_e bundled: every mode runs the joint pair.
    monkeypatch.setattr(deidentify, "DEFAULT_PUBLIC_WEIGHTS", tmp_path / "absent.pt")
    assert same(load_pipeline_pair("uunet", None, "high").encoder, joint.encoder)
    # One bundled (here: the joint U_e with its head zeroed, so the two differ).
    encoder = load_face_pair("uunet", None).encoder
    torch.nn.init.zeros_(encoder.net.head.weight)
    public_file = deidentify.save_face_pair(tmp_path / "uunet-public.pt", "uunet", encoder, None,
                                            {"widths": list(encoder.net.widths), "keyed": True})
    monkeypatch.setattr(deidentify, "DEFAULT_PUBLIC_WEIGHTS", public_file)
    public = load_face_pair("uunet", public_file)
    assert public.decoder is None
    sealed = load_pipeline_pair("uunet", None, "high")
    assert same(sealed.encoder, public.encoder) and not same(sealed.encoder, joint.encoder)
    assert same(sealed.decoder, joint.decoder)  # the learned restore path keeps the joint U_d
    paper = load_pipeline_pair("uunet", None, "none")
    assert same(paper.encoder, joint.encoder) and same(paper.decoder, joint.decoder)
    # Weights given by hand are used as they are, whatever the seal; but a public-only U_e
    # cannot make a --seal none file, which nothing but U_d will ever restore.
    assert same(load_pipeline_pair("uunet", DEFAULT_WEIGHTS, "exact").encoder, joint.encoder)
    with pytest.raises(WeightsError, match="public-only U_e"):
        load_pipeline_pair("uunet", public_file, "none")
