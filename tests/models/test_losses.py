"""The loss terms of eqs. 1-13: values, sign semantics, masking, and gradients into a U-Net."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.critics import AttributeMatcher, PatchCritic
from models.losses import (
    LOSS_WEIGHTS,
    anonymization_loss,
    colour_distribution_loss,
    consistency_loss,
    critic_loss,
    diversity_loss,
    generator_adversarial_loss,
    gradient_penalty,
    matcher_loss,
    parse_control_vector,
    reconstruction_loss,
    same_label_bits,
    soft_histogram,
    weighted_total,
    wrong_key_loss,
)
from models.unet import UNetEncoder

LABELS = ["id", "gender", "hairstyle"]


# --------------------------------------------------------------------------------------------
# Every generator-side term must reach U_e's parameters
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_setup():
    torch.manual_seed(0)
    encoder = UNetEncoder(widths=(8, 16, 32, 64))
    critic = PatchCritic(widths=(8, 16, 32), head_width=16)
    matcher = AttributeMatcher(num_labels=len(LABELS)).eval()  # frozen in phase II
    for p in list(critic.parameters()) + list(matcher.parameters()):
        p.requires_grad_(False)
    x = torch.rand(4, 3, 64, 64)
    noise = torch.rand(4, 1, 64, 64)
    return encoder, critic, matcher, x, noise


GENERATOR_TERMS = {
    "reconstruction": lambda c, m, x, a: reconstruction_loss(x, a),
    "adversarial": lambda c, m, x, a: generator_adversarial_loss(c(a), c(a.flip(0))),
    "anonymization": lambda c, m, x, a: anonymization_loss(m(x, a), torch.tensor([-1.0, 1.0, 0.0])),
    "consistency": lambda c, m, x, a: consistency_loss(m(a, a.roll(1, dims=0))),
    "diversity": lambda c, m, x, a: diversity_loss(m(a, a.roll(1, dims=0))),
    "wrong_key": lambda c, m, x, a: wrong_key_loss(m(x, a)),
    "colour": lambda c, m, x, a: colour_distribution_loss(x, a),
}


@pytest.mark.parametrize("name", sorted(GENERATOR_TERMS))
def test_generator_terms_give_finite_nonzero_gradients_to_the_unet(small_setup, name):
    encoder, critic, matcher, x, noise = small_setup
    encoder.zero_grad(set_to_none=True)
    a = encoder(x, noise)
    loss = GENERATOR_TERMS[name](critic, matcher, x, a)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The first convolution is the farthest from the loss: if it moves, the whole path carries signal.
    first_conv = encoder.net.downs[0].block[0].weight.grad
    assert first_conv.abs().sum() > 0
    assert sum(g.abs().sum() for g in grads) > 0


# --------------------------------------------------------------------------------------------
# Signs of the matcher-based terms: which way does minimising push D_a?
# --------------------------------------------------------------------------------------------

def grad_wrt_matcher_output(loss_fn, probs: torch.Tensor) -> torch.Tensor:
    probs = probs.clone().requires_grad_(True)
    loss_fn(probs).backward()
    return probs.grad


def test_anonymization_pushes_id_apart_keeps_s1_labels_and_ignores_s0():
    s = torch.tensor([-1.0, 1.0, 0.0])
    grad = grad_wrt_matcher_output(lambda p: anonymization_loss(p, s), torch.full((2, 3), 0.5))
    # Gradient descent lowers D_a where the gradient is positive.
    assert (grad[:, 0] > 0).all()  # s = −1: "same ID" goes down → identity changes
    assert (grad[:, 1] < 0).all()  # s = +1: "same gender" goes up → gender kept
    assert (grad[:, 2] == 0).all()  # s = 0: free
    # The optimum is reached exactly when D_a does what s asks, whatever the free label says.
    best = anonymization_loss(torch.tensor([[0.0, 1.0, 0.3]]), s)
    worst = anonymization_loss(torch.tensor([[1.0, 0.0, 0.9]]), s)
    assert best.item() == pytest.approx(-2.0) and worst.item() == pytest.approx(2.0)


def test_consistency_pushes_every_label_to_same():
    grad = grad_wrt_matcher_output(consistency_loss, torch.full((2, 3), 0.5))
    assert (grad < 0).all()
    assert consistency_loss(torch.ones(2, 3)).item() == pytest.approx(-3.0)
    assert consistency_loss(torch.zeros(2, 3)).item() == pytest.approx(3.0)


def test_diversity_pushes_only_the_id_to_different():
    grad = grad_wrt_matcher_output(diversity_loss, torch.full((2, 3), 0.5))
    assert (grad[:, 0] > 0).all() and (grad[:, 1:] == 0).all()
    grad = grad_wrt_matcher_output(lambda p: diversity_loss(p, id_index=2), torch.full((2, 3), 0.5))
    assert (grad[:, 2] > 0).all() and (grad[:, :2] == 0).all()


def test_wrong_key_pushes_id_to_different_and_stays_finite_at_certainty():
    grad = grad_wrt_matcher_output(wrong_key_loss, torch.full((2, 3), 0.5))
    assert (grad[:, 0] > 0).all() and (grad[:, 1:] == 0).all()
    assert wrong_key_loss(torch.zeros(2, 3)).item() == pytest.approx(0.0)
    assert wrong_key_loss(torch.full((2, 3), 0.5)).item() == pytest.approx(math.log(2.0))
    assert torch.isfinite(wrong_key_loss(torch.ones(2, 3)))


# --------------------------------------------------------------------------------------------
# Control vector, label bits and the matcher's own loss (phase I)
# --------------------------------------------------------------------------------------------

def test_parse_control_vector_accepts_a_valid_vector():
    s = parse_control_vector("-1, 1,0", LABELS)
    assert s.dtype == torch.float32
    assert s.tolist() == [-1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    "text, message",
    [("1,1,0", "must be -1"), ("-1,2,0", "allowed"), ("-1,1", "expected 3"), ("-1,1,0,0", "expected 3"),
     ("-1,x,0", "allowed")],
)
def test_parse_control_vector_rejects_bad_vectors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_control_vector(text, LABELS)


def test_parse_control_vector_needs_id_first():
    with pytest.raises(ValueError, match="'id'"):
        parse_control_vector("-1,1,0", ["gender", "id", "hairstyle"])


def test_same_label_bits_masks_unknown_labels():
    nan = float("nan")
    a = torch.tensor([[1.0, 0.0, nan], [2.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 0.0], [3.0, nan, 1.0]])
    bits, mask = same_label_bits(a, b)
    assert bits.dtype == torch.float32 and mask.dtype == torch.bool
    assert bits.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert mask.tolist() == [[True, True, False], [True, False, True]]


def test_matcher_loss_ignores_masked_entries():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    bits = torch.randint(0, 2, (4, 3)).float()
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 2] = mask[3, 1] = False
    base = matcher_loss(logits, bits, mask)

    changed = logits.clone()
    changed[0, 2], changed[3, 1] = 50.0, -50.0
    assert matcher_loss(changed, bits, mask).item() == pytest.approx(base.item())
    nan_bits = bits.clone()
    nan_bits[0, 2] = float("nan")
    leaf = logits.clone().requires_grad_(True)
    with_nan = matcher_loss(leaf, nan_bits, mask)
    assert with_nan.item() == pytest.approx(base.item())
    with_nan.backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad[0, 2] == 0 and leaf.grad[3, 1] == 0
    # An unmasked change does count, and the value is BCE averaged over the 10 known entries.
    changed[1, 1] += 3.0
    assert matcher_loss(changed, bits, mask).item() != pytest.approx(base.item())
    p = torch.sigmoid(logits[mask])
    manual = -(bits[mask] * p.log() + (1 - bits[mask]) * (1 - p).log()).mean()
    assert base.item() == pytest.approx(manual.item(), rel=1e-5)
    # No mask: a plain mean over all entries.
    p_all = torch.sigmoid(logits)
    manual_all = -(bits * p_all.log() + (1 - bits) * (1 - p_all).log()).mean()
    assert matcher_loss(logits, bits).item() == pytest.approx(manual_all.item(), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Reconstruction, critic and gradient penalty
# --------------------------------------------------------------------------------------------

def test_reconstruction_and_adversarial_values():
    x, r = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert reconstruction_loss(x, r).item() == pytest.approx(0.25)
    d_x, d_a, d_r = torch.full((2, 1, 8, 8), 3.0), torch.full((2, 1, 8, 8), 1.0), torch.full((2, 1, 8, 8), -2.0)
    assert critic_loss(d_x, d_a, d_r).item() == pytest.approx(-2 * 3.0 + 1.0 - 2.0)
    assert generator_adversarial_loss(d_a, d_r).item() == pytest.approx(-1.0 + 2.0)


class LinearCritic(nn.Module):
    """D(x) = <w, x> as a 1×1 patch map, so ‖∇D‖ = ‖w‖ everywhere."""

    def __init__(self, norm: float) -> None:
        super().__init__()
        w = torch.randn(3, 64, 64)
        self.w = nn.Parameter(w * norm / w.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.w).sum(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)


def test_gradient_penalty_matches_the_known_gradient_norm():
    torch.manual_seed(0)
    critic = LinearCritic(norm=3.0)
    gp = gradient_penalty(critic, torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64))
    assert gp.item() == pytest.approx((3.0 - 1.0) ** 2, rel=1e-4)


def test_gradient_penalty_is_finite_and_trains_the_critic_only():
    torch.manual_seed(0)
    critic = PatchCritic(widths=(8, 16, 32), head_width=16)
    real = torch.rand(3, 3, 64, 64)
    fake = torch.rand(3, 3, 64, 64, requires_grad=True)
    gp = gradient_penalty(critic, real, fake)
    assert gp.dim() == 0 and torch.isfinite(gp)
    gp.backward()
    # Every kernel shapes ∇_x D_f, so each one is trained; biases do not enter a piecewise-linear
    # critic's input gradient, so they may get none.
    kernels = [p for p in critic.parameters() if p.dim() > 1]
    assert all(k.grad is not None and torch.isfinite(k.grad).all() and k.grad.abs().sum() > 0 for k in kernels)
    assert fake.grad is None  # the generator is not trained by the penalty


# --------------------------------------------------------------------------------------------
# Soft histogram and the colour term
# --------------------------------------------------------------------------------------------

def test_soft_histogram_sums_to_one_and_follows_numpy():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) ** 2  # skewed towards dark values: not a flat histogram
    h = soft_histogram(x, bins=32)
    assert h.shape == (2, 3, 32)
    assert torch.allclose(h.sum(dim=-1), torch.ones(2, 3), atol=1e-5)
    for n in range(2):
        for c in range(3):
            ref, _ = np.histogram(x[n, c].numpy(), bins=32, range=(0.0, 1.0))
            assert np.abs(h[n, c].numpy() - ref / ref.sum()).sum() < 0.1


def test_soft_histogram_is_differentiable():
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    h = soft_histogram(x, bins=8)
    (h[:, :, :4].sum()).backward()  # mass in the darker half: moving pixels down raises it
    assert torch.isfinite(x.grad).all()
    assert (x.grad <= 1e-6).all() and (x.grad < -1e-3).any()  # ≤ 0 up to float rounding


def test_colour_distribution_loss_sees_colour_shifts():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64) * 0.6 + 0.2
    assert colour_distribution_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)
    shifted = x.clone()
    shifted[:, 0] = (shifted[:, 0] + 0.15).clamp(max=1.0)  # redder copy
    loss = colour_distribution_loss(x, shifted)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0.05
    assert loss.item() <= 2.0


# --------------------------------------------------------------------------------------------
# Eq. 13
# --------------------------------------------------------------------------------------------

def test_weighted_total_matches_hand_computation():
    assert LOSS_WEIGHTS == {"mse": 50.0, "adv": 1.0, "ano": 1.0, "con": 1.0, "div": 1.0, "dis": 1.0, "key": 1.0}
    terms = {"mse": torch.tensor(0.02), "adv": torch.tensor(-0.5), "key": torch.tensor(0.3)}
    assert weighted_total(terms).item() == pytest.approx(50 * 0.02 - 0.5 + 0.3)
    assert weighted_total(terms, {"mse": 1.0, "adv": 2.0, "key": 0.0}).item() == pytest.approx(0.02 - 1.0)
    with pytest.raises(KeyError, match="gp"):
        weighted_total({"mse": torch.tensor(1.0), "gp": torch.tensor(1.0)})
