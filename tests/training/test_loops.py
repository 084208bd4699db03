"""Both training phases on a tiny real-face tensor file: they run, learn, checkpoint and resume."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.datapath.decode import read_frames
from tasks.datapath.deidentify import load_face_pair
from tasks.training.loops import (
    FACES_FORMAT,
    FaceData,
    MatcherConfig,
    UUNetConfig,
    auc,
    load_matcher,
    train_matcher,
    train_uunet,
)

SMALL = (8, 16, 32, 64)


@pytest.fixture(scope="module")
def faces_file(tmp_path_factory):
    """Face crops of two bundled clips (two subjects, two sequences each) plus flipped 'other subjects'."""
    crops, subject, sequence = [], [], []
    for s, (clip, box) in enumerate([("samples/single_face.mp4", (250, 60, 130)),
                                     ("samples/WolfgangLanger_Pexels.mp4", (260, 40, 150))]):
        frames = read_frames(clip, range(0, 32, 2))
        x, y, side = box
        for i, frame in enumerate(frames):
            crop = torch.from_numpy(frame[y:y + side, x:x + side]).permute(2, 0, 1)[None].float()
            crops.append(torch.nn.functional.interpolate(crop, size=(64, 64), mode="area")[0])
            subject.append(s)
            sequence.append(2 * s + i // 8)
    images = torch.stack(crops).round().to(torch.uint8)
    n = len(images)
    # Mirrored copies as two more subjects, so both splits have several identities.
    images = torch.cat([images, images.flip(-1)])
    subject = subject + [s + 2 for s in subject]
    sequence = sequence + [q + 4 for q in sequence]
    labels = torch.tensor([[s, s % 2, np.nan] for s in subject], dtype=torch.float32)
    split = torch.tensor([0] * n + [0] * (n // 2) + [1] * (n - n // 2), dtype=torch.int8)
    path = tmp_path_factory.mktemp("faces") / "faces.pt"
    torch.save({"format": FACES_FORMAT, "images": images, "subject": torch.tensor(subject),
                "sequence": torch.tensor(sequence), "frame": torch.arange(2 * n), "labels": labels,
                "label_names": ["id", "gender", "age_group"], "split": split}, path)
    return path


def test_auc_matches_hand_computed_values():
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    assert auc(scores, np.array([False, False, True, True])) == pytest.approx(0.75)
    assert math.isnan(auc(scores, np.array([True, True, True, True]))), "one class only: undefined"


def test_matcher_phase_trains_and_keeps_its_best_checkpoint(faces_file, tmp_path):
    device = torch.device("cpu")
    data, val = FaceData(faces_file, device, 0), FaceData(faces_file, device, 1)
    seen = []
    result = train_matcher(data, val, tmp_path / "matcher.pt",
                           MatcherConfig(steps=8, batch=16, eval_every=4, eval_pairs=64),
                           on_metrics=lambda step, values: seen.append((step, values)))
    assert result["step"] == 8 and (tmp_path / "matcher.pt").is_file()
    assert any("val_auc_id" in v for _, v in seen)
    matcher, names = load_matcher(tmp_path / "matcher.pt", device)
    assert names == ["id", "gender", "age_group"] and matcher.num_labels == 3


@pytest.fixture(scope="module")
def matcher_file(faces_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "matcher.pt"
    data = FaceData(faces_file, torch.device("cpu"), 0)
    train_matcher(data, None, path, MatcherConfig(steps=4, batch=8))
    return path


def test_uunet_phase_lowers_the_reconstruction_loss_and_resumes(faces_file, matcher_file, tmp_path):
    torch.manual_seed(0)
    device = torch.device("cpu")
    data = FaceData(faces_file, device, 0)
    matcher, _ = load_matcher(matcher_file, device)
    config = UUNetConfig(steps=12, subjects=2, sequences=2, frames=2, widths=SMALL, lr_generator=1e-3,
                         critic_widths=(8, 16, 32), critic_head=32,
                         checkpoint_every=6, samples_every=6)
    mse, grids = [], []
    out = tmp_path / "uunet.pt"
    train_uunet(data, matcher, out, config, on_metrics=lambda s, v: mse.append(v["loss_mse"]),
                on_samples=lambda s, g: grids.append(g))
    assert len(mse) == 12
    assert np.mean(mse[-4:]) < np.mean(mse[:4]), f"reconstruction loss did not fall: {mse}"
    assert grids and grids[0].shape == (8 * 64, 4 * 64, 3) and grids[0].dtype == np.uint8
    pair = load_face_pair("uunet", out)  # the pipeline loads what training wrote
    assert pair.encoder.net.widths == SMALL

    # Resume: a longer run picks up at the saved step instead of starting over.
    steps_seen = []
    longer = UUNetConfig(**{**config.__dict__, "steps": 14})
    result = train_uunet(data, matcher, out, longer, resume=out.with_suffix(".ckpt"),
                         on_metrics=lambda s, v: steps_seen.append(s))
    assert steps_seen == [13, 14] and result["step"] == 14


def test_paper_mode_trains_a_decoder_that_sees_no_key(faces_file, matcher_file, tmp_path):
    device = torch.device("cpu")
    matcher, _ = load_matcher(matcher_file, device)
    config = UUNetConfig(steps=2, subjects=2, sequences=2, frames=2, widths=SMALL, keyed=False,
                         critic_widths=(8, 16, 32), critic_head=32)
    seen = []
    train_uunet(FaceData(faces_file, device, 0), matcher, tmp_path / "paper.pt", config,
                on_metrics=lambda s, v: seen.append(v))
    pair = load_face_pair("uunet", tmp_path / "paper.pt")
    assert pair.decoder.keyed is False and "loss_keypix" not in seen[0]


def test_fine_tuning_starts_from_a_trained_pair_and_records_its_s(faces_file, matcher_file, tmp_path):
    device = torch.device("cpu")
    data = FaceData(faces_file, device, 0)
    matcher, _ = load_matcher(matcher_file, device)
    base = UUNetConfig(steps=3, subjects=2, sequences=2, frames=2, widths=SMALL,
                       critic_widths=(8, 16, 32), critic_head=32)
    train_uunet(data, matcher, tmp_path / "base.pt", base)
    start = load_face_pair("uunet", tmp_path / "base.pt")

    seen = []
    tuned = UUNetConfig(**{**base.__dict__, "steps": 1, "control": "-1,1,0", "lr_generator": 0.0})
    train_uunet(data, matcher, tmp_path / "tuned.pt", tuned, init=tmp_path / "base.pt",
                on_metrics=lambda s, v: seen.append(s))
    pair = load_face_pair("uunet", tmp_path / "tuned.pt")
    assert seen == [1]  # a fresh run at step 0, not a resume of base's checkpoint
    # With a zero learning rate the tuned pair keeps the weights it started from (batch-norm
    # running statistics still move in training mode, so parameters only).
    for net in ("encoder", "decoder"):
        for mine, theirs in zip(getattr(pair, net).parameters(), getattr(start, net).parameters()):
            assert torch.equal(mine, theirs)
    assert pair.meta["config"]["control"] == "-1,1,0" and pair.meta["init"] == str(tmp_path / "base.pt")

    other = UUNetConfig(**{**base.__dict__, "widths": (8, 16, 32, 32)})
    with pytest.raises(ValueError, match="cannot start"):
        train_uunet(data, matcher, tmp_path / "bad.pt", other, init=tmp_path / "base.pt")


def test_half_precision_weights_load_as_float32_and_nearly_agree(tmp_path):
    from models.registry import build_pair
    from tasks.datapath.deidentify import save_face_pair

    torch.manual_seed(0)
    config = {"widths": list(SMALL), "keyed": True}
    encoder, decoder = build_pair("uunet", config)
    full = save_face_pair(tmp_path / "full.pt", "uunet", encoder.eval(), decoder.eval(), config)
    half = save_face_pair(tmp_path / "half.pt", "uunet", encoder.eval(), decoder.eval(), config, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    a, b = load_face_pair("uunet", full), load_face_pair("uunet", half)
    assert all(p.dtype == torch.float32 for p in b.encoder.parameters())
    x, noise = torch.rand(2, 3, 64, 64), torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        diff = (a.encoder(x, noise) - b.encoder(x, noise)).abs().max().item()
    assert 0.0 < diff < 0.01  # rounded, not broken: at most a couple of 8-bit levels (1/255 ≈ 0.004)


def test_public_encoder_fine_tunes_u_e_alone_and_writes_a_file_that_cannot_restore(faces_file, matcher_file, tmp_path):
    from tasks.datapath.deidentify import FaceSwapper, WeightsError
    from tasks.datapath.detect import load_mtcnn
    from tasks.training.loops import PublicEncoderConfig, train_public_encoder

    device = torch.device("cpu")
    data = FaceData(faces_file, device, 0)
    matcher, _ = load_matcher(matcher_file, device)
    train_uunet(data, matcher, tmp_path / "base.pt", UUNetConfig(steps=2, subjects=2, sequences=2, frames=2,
                                                                widths=SMALL, critic_widths=(8, 16, 32), critic_head=32))
    mtcnn = load_mtcnn("cpu")
    config = PublicEncoderConfig(steps=3, subjects=2, sequences=2, frames=2, widths=SMALL, critic_widths=(8, 16, 32),
                                 critic_head=32, checkpoint_every=2, samples_every=3)
    config.weights["face"] = 0.5  # off in the recipe (see PublicEncoderConfig); on here to run the scorers
    seen, grids = [], []
    out = tmp_path / "public.pt"
    train_public_encoder(data, matcher, out, config, tmp_path / "base.pt", [(mtcnn.rnet, 24)],
                         on_metrics=lambda s, v: seen.append(v), on_samples=lambda s, g: grids.append(g), half=True)
    assert {"loss_adv", "loss_face", "loss_grid", "loss_noise", "loss_far"} <= set(seen[0])
    assert "loss_mse" not in seen[0] and "loss_keypix" not in seen[0]  # nothing asks a to carry x
    assert grids[0].shape == (8 * 64, 4 * 64, 3)
    assert not any(p.requires_grad for p in mtcnn.rnet.parameters())  # the scorer is frozen, not trained
    pair = load_face_pair("uunet", out)
    assert pair.decoder is None and pair.encoder.net.widths == SMALL and pair.encoder.net.output_blur
    frame = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(WeightsError, match="public-only U_e"):
        FaceSwapper(pair).restore([frame], [[]], lambda seq: np.zeros((64, 64), np.float32))
    # Resumes from its own checkpoint (U_e, critic, optimisers), not from the pair it started from.
    steps_seen = []
    result = train_public_encoder(data, matcher, out, PublicEncoderConfig(**{**config.__dict__, "steps": 5}),
                                  tmp_path / "base.pt", resume=out.with_suffix(".ckpt"),
                                  on_metrics=lambda s, v: steps_seen.append(s))
    assert steps_seen == [4, 5] and result["step"] == 5


def test_composite_is_the_source_outside_the_face_region_and_u_e_inside():
    from tasks.training.loops import composite, region_mask

    mask = region_mask()
    x, a = torch.zeros(1, 3, 64, 64), torch.ones(1, 3, 64, 64)
    c = composite(x, a, mask)
    assert torch.equal(c[..., mask[0, 0] == 0], x[..., mask[0, 0] == 0])
    assert torch.equal(c[..., mask[0, 0] == 1], a[..., mask[0, 0] == 1])
    assert (mask == 0).any() and (mask == 1).any()  # both parts exist: corners are source, centre is U_e


def test_checkerboard_excess_counts_only_the_grid_beyond_the_source():
    from models.losses import checkerboard_excess

    board = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().expand(1, 3, 8, 8)
    flat = torch.full((1, 3, 8, 8), 0.5)
    # Every 2x2 window of a 0/1 board: |1 - 0 - 0 + 1| / 4 = 0.5; of a flat image: 0.
    assert checkerboard_excess(flat, board).item() == pytest.approx(0.5)
    assert checkerboard_excess(board, board).item() == 0.0
    assert checkerboard_excess(board, flat).item() == 0.0  # less grid than the source costs nothing


def test_face_likeness_feeds_each_scorer_the_central_face_square_at_its_size():
    from models.losses import face_likeness_loss

    class Scorer(torch.nn.Module):
        def __init__(self, probability):
            super().__init__()
            self.probability, self.shapes = probability, []

        def forward(self, x):
            self.shapes.append(tuple(x.shape))
            return torch.zeros(len(x), 4), torch.full((len(x),), self.probability)

    faces = torch.rand(3, 3, 64, 64)
    small, large = Scorer(0.5), Scorer(0.25)
    loss = face_likeness_loss([(small, 24), (large, 48)], faces)
    assert small.shapes == [(3, 3, 24, 24)] and large.shapes == [(3, 3, 48, 48)]
    assert loss.item() == pytest.approx((math.log(2) + math.log(4)) / 2)
