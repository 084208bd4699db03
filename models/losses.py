"""The loss terms of UU-Net (paper Sec. III-A/B, eqs. 1-13), one function each.

Notation (the paper's): x a face crop, a = U_e(x) its de-identified version, r = U_d(a) the
reconstruction, D_f the face critic (`models.critics.PatchCritic`), D_a the pairwise attribute
matcher (`models.critics.AttributeMatcher`), whose output entry i is the probability that the two
images of a pair share label i. Label 0 is always the identity ("id").

Every term is reduced to a scalar by a mean over the batch, so eq. 13's weights do not depend
on the batch size. Terms built on D_a keep the paper's inner products over labels (a sum over
the t labels, not a mean), so one unit of weight pushes every label equally hard.

Where this file departs from the paper, the docstring says so and why:
* eq. 9 (anonymization) has the opposite sign of the printed equation, to match the paper's own
  definition of s and of D_a, and the authors' code;
* eq. 6's gradient bound δ is replaced by a gradient penalty (the authors' code does the same);
* eq. 12's histogram is soft (differentiable); the authors' histogram passes no gradient;
* `wrong_key_loss` is our extension for the keyed noise channel; the paper has no such term.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Eq. 13's weights as given in Sec. IV-A (the authors' example configuration used mse = 100).
# "key" weighs our wrong-key term, which the paper does not have.
LOSS_WEIGHTS: dict[str, float] = {
    "mse": 50.0,
    "adv": 1.0,
    "ano": 1.0,
    "con": 1.0,
    "div": 1.0,
    "dis": 1.0,
    "key": 1.0,
}

# λ of the WGAN-GP paper; the authors' critic weighed its penalty terms by 10 too.
GRADIENT_PENALTY_WEIGHT: float = 10.0


# --------------------------------------------------------------------------------------------
# The control vector s and the matcher's targets (phase I)
# --------------------------------------------------------------------------------------------

def parse_control_vector(text: str, label_names: Sequence[str]) -> torch.Tensor:
    """Parse s ∈ {−1, 0, 1}^t from text such as "-1,1,0", one entry per label (Sec. III-B, Fig. 3).

    1: the label must agree between x and a; −1: it must differ; 0: free. The paper always sets
    the ID entry to −1 (that is what de-identification means), so anything else is refused.
    """
    if not label_names or label_names[0] != "id":
        raise ValueError(f"the first label must be 'id', got labels {list(label_names)}")
    entries = [part.strip() for part in text.split(",")]
    if len(entries) != len(label_names):
        raise ValueError(
            f"control vector {text!r} has {len(entries)} entries, expected {len(label_names)} "
            f"(one per label: {', '.join(label_names)})"
        )
    values = []
    for name, entry in zip(label_names, entries):
        if entry not in {"-1", "0", "1", "+1"}:
            raise ValueError(f"control vector entry for {name!r} is {entry!r}; allowed: -1, 0, 1")
        values.append(float(int(entry)))
    if values[0] != -1.0:
        raise ValueError(
            f"the 'id' entry of the control vector must be -1 (the identity always changes), got {entries[0]}"
        )
    return torch.tensor(values, dtype=torch.float32)


def same_label_bits(labels_a: torch.Tensor, labels_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: b = [1{l_1 == l'_1}, …, 1{l_t == l'_t}] for each pair, plus a mask of known entries.

    Labels are float tensors (N, t) with NaN for "unknown". A pair where either label is unknown
    has no truth to learn from, so its mask entry is False and its bit is set to 0 (a placeholder
    that `matcher_loss` ignores).
    """
    mask = ~(torch.isnan(labels_a) | torch.isnan(labels_b))
    bits = ((labels_a == labels_b) & mask).to(torch.float32)
    return bits, mask


def matcher_loss(logits: torch.Tensor, bits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3: L_Da = E[ −bᵀ log b̂ − (1 − b)ᵀ log(1 − b̂) ], with b̂ = sigmoid(logits).

    Computed from logits (numerically stable) and averaged over the known entries only, so
    unknown labels neither pull nor dilute the loss. With no known entry at all the loss is a
    zero that still belongs to the graph (backward works, nothing moves).
    """
    if mask is None:
        return F.binary_cross_entropy_with_logits(logits, bits)
    # Replace unknown bits before the BCE, not after: a NaN target there would turn the
    # backward pass into 0 · NaN = NaN even if the entry is dropped from the sum.
    bits = torch.where(mask, bits, torch.zeros_like(bits))
    per_entry = F.binary_cross_entropy_with_logits(logits, bits, reduction="none")
    per_entry = torch.where(mask, per_entry, torch.zeros_like(per_entry))
    return per_entry.sum() / mask.sum().clamp(min=1).to(per_entry.dtype)


# --------------------------------------------------------------------------------------------
# Reconstruction and the face critic (eqs. 5-8)
# --------------------------------------------------------------------------------------------

def reconstruction_loss(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Eq. 5: L_mse = ‖x − U_d(U_e(x))‖², as the mean squared error over pixels and batch."""
    return F.mse_loss(r, x)


def critic_loss(d_x: torch.Tensor, d_a: torch.Tensor, d_r: torch.Tensor) -> torch.Tensor:
    """Eq. 6: L_Df = −2 E[D_f(x)] + E[D_f(a)] + E[D_f(r)], means over batch and patches.

    The real term counts twice because the critic sees two kinds of fakes (a and r) per real x.
    """
    return -2.0 * d_x.mean() + d_a.mean() + d_r.mean()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP penalty E[(‖∇_x̂ D_f(x̂)‖₂ − 1)²] on random interpolates x̂ of real and fake.

    Stands in for eq. 6's constraint ‖∇D_f‖∞ ≤ δ_gp (δ = 0.01): a hard bound needs weight
    clipping, which the WGAN-GP paper shows to train worse, and the authors' released code also
    uses the penalty (1 − ‖∇‖)². The constrained function is the image's score, the mean of the
    patch map, i.e. the quantity whose expectation eq. 6 takes. Multiply by
    `GRADIENT_PENALTY_WEIGHT` in the critic's objective. create_graph=True so the penalty's
    own gradient reaches the critic's parameters.
    """
    n = real.shape[0]
    alpha = torch.rand(n, 1, 1, 1, device=real.device, dtype=real.dtype)
    # Detached: the penalty trains the critic only, never the generators.
    x_hat = (alpha * real.detach() + (1.0 - alpha) * fake.detach()).requires_grad_(True)
    score = critic(x_hat).reshape(n, -1).mean(dim=1)
    (grad,) = torch.autograd.grad(score.sum(), x_hat, create_graph=True)
    # The small constant keeps sqrt differentiable if a gradient is exactly zero.
    norm = torch.sqrt(grad.reshape(n, -1).pow(2).sum(dim=1) + 1e-12)
    return (norm - 1.0).pow(2).mean()


def generator_adversarial_loss(d_a: torch.Tensor, d_r: torch.Tensor) -> torch.Tensor:
    """Eq. 8: L_adv = −E[D_f(a)] − E[D_f(r)]: both U-Nets try to make their outputs score as faces."""
    return -d_a.mean() - d_r.mean()


# --------------------------------------------------------------------------------------------
# Terms built on the frozen attribute matcher D_a (eqs. 9-11, and our wrong-key term)
# --------------------------------------------------------------------------------------------

def anonymization_loss(matcher_xa: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Eq. 9, sign corrected: L_ano = −E_{x,a}[ sᵀ (2 D_a(x, a) − 1) ].

    The printed equation reads +E[s ⊙ (2 D_a − 1)], and the text beside it says that high D_a
    responses are then favoured where s_i = −1. But D_a outputs 1 for "same label" (eq. 1) and
    s_i = −1 means "must differ" (Fig. 3), so the printed sign would keep the identity (s_id = −1
    would push D_a's "same ID" towards 1). We use the sign that does what Fig. 3 describes,
    which is also what the authors' code computes (it multiplies each matcher output by −s and
    minimises the mean). Minimising this drives D_a(x, a)_i → 1 where s_i = 1, → 0 where
    s_i = −1, and ignores labels with s_i = 0. 2 D_a − 1 maps D_a to [−1, 1]; sum over labels,
    mean over the batch; range [−t, t].
    """
    s = s.to(device=matcher_xa.device, dtype=matcher_xa.dtype)
    return -((2.0 * matcher_xa - 1.0) * s).sum(dim=1).mean()


def consistency_loss(matcher_aa: torch.Tensor) -> torch.Tensor:
    """Eq. 10: L_con = −E_{a_t, a_t'}[ 1ᵀ (2 D_a(a_t, a_t') − 1) ].

    a_t and a_t' are de-identified frames of one sequence: they must show one virtual person, so
    every label, ID included, should agree and minimising drives every D_a entry → 1. Normalised
    like eq. 9 (sum over the t labels, mean over pairs), so w_con = w_ano weighs a label equally
    in both terms; range [−t, t].
    """
    return -(2.0 * matcher_aa - 1.0).sum(dim=1).mean()


def diversity_loss(matcher_aa_other: torch.Tensor, id_index: int = 0) -> torch.Tensor:
    """Eq. 11 on the ID entry: L_div = E_{a_j, a_j'}[ D_a(a_j, a_j')_id ].

    a_j and a_j' come from different sequences of one subject. The text asks that they be
    "mapped to different virtual IDs", so minimising drives D_a's "same ID" → 0. The OCR of
    eq. 11 is ambiguous about which labels it covers; we read it as the ID only: soft labels
    kept by s (e.g. gender with s = 1) are the subject's own in both sequences, so forcing
    them to differ would fight eq. 9. The printed form uses D_a itself, not 2 D_a − 1; we keep
    it (the offset is irrelevant, the slope is half of eq. 9's per label). Range [0, 1].
    """
    return matcher_aa_other[:, id_index].mean()


def wrong_key_loss(matcher_x_rwrong: torch.Tensor, id_index: int = 0) -> torch.Tensor:
    """Our extension, not in the paper: L_key = E[ −log(1 − D_a(x, r_wrong)_id) ].

    r_wrong = U_d(a ⊕ noise of a wrong key). Reversal must need the key, not only the decoder
    weights, so D_a should judge x and r_wrong to be different people. This is the matcher's own
    cross-entropy towards "different" (target 0), chosen over the plain mean of D_a because it
    does not saturate where it matters: when the decoder ignores the key, r_wrong ≈ x and
    D_a ≈ 1, where a linear term's gradient through the sigmoid vanishes. The probability is
    clamped at 1 − 1e-6 so the term stays finite (at most about 13.8).
    """
    p_same = matcher_x_rwrong[:, id_index].clamp(max=1.0 - 1e-6)
    return -torch.log1p(-p_same).mean()


# --------------------------------------------------------------------------------------------
# Colour distribution (eq. 12)
# --------------------------------------------------------------------------------------------

def soft_histogram(x: torch.Tensor, bins: int = 32, bandwidth: float | None = None) -> torch.Tensor:
    """Differentiable per-channel histogram of values in [0, 1]: (N, C, H, W) → (N, C, bins).

    Each pixel spreads a unit of mass over the bins with Gaussian weights around the bin centres
    (bin j covers [j/bins, (j+1)/bins)), normalised per pixel by a softmax, so no mass is lost at
    the borders and the weights never underflow to 0/0. `bandwidth` is the Gaussian's standard
    deviation; the default, half a bin width, keeps about 80 % of a pixel's mass in its own bin.
    Each histogram sums to 1. Memory is N·C·H·W·bins floats: mind it for big batches.
    """
    if bins < 2:
        raise ValueError(f"bins must be at least 2, got {bins}")
    sigma = bandwidth if bandwidth is not None else 0.5 / bins
    if sigma <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    centres = (torch.arange(bins, device=x.device, dtype=torch.float32) + 0.5) / bins
    # Always float32: the logits below reach 1/σ² (thousands), where half precision cannot
    # resolve the differences between neighbouring bins.
    values = x.float().reshape(x.shape[0], x.shape[1], -1, 1)  # (N, C, H·W, 1)
    # −(v − c)²/2σ² = (v·c − c²/2)/σ² − v²/2σ²; the last part is the same for every bin, so the
    # softmax ignores it. Dropping it saves building (and keeping for backward) a squared
    # (N, C, H·W, bins) tensor: this term runs on every training batch.
    logits = (values * centres - 0.5 * centres**2) / sigma**2
    return torch.softmax(logits, dim=-1).mean(dim=2)


def colour_distribution_loss(x: torch.Tensor, a: torch.Tensor, bins: int = 32) -> torch.Tensor:
    """Eq. 12: L_dis = E_{x,a}[ χ²(h(x), h(a)) ], χ²(v1, v2) = Σ_i (v1_i − v2_i)² / (v1_i + v2_i).

    h is `soft_histogram` per colour channel, so gradients reach a (the authors' code used
    tf.histogram_fixed_width, which passes no gradient, so their colour term never trained the
    generator). χ² is summed over bins, averaged over the 3 channels and the batch; a 1e-10 in
    the denominator guards empty bins. Range [0, 2].
    """
    h_x = soft_histogram(x, bins)
    h_a = soft_histogram(a, bins)
    chi2 = ((h_x - h_a) ** 2 / (h_x + h_a + 1e-10)).sum(dim=-1)  # (N, C)
    return chi2.mean()


# --------------------------------------------------------------------------------------------
# The total (eq. 13)
# --------------------------------------------------------------------------------------------

def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float] = LOSS_WEIGHTS) -> torch.Tensor:
    """Eq. 13: L = Σ_k w_k L_k over the terms present (e.g. {"mse": …, "adv": …}).

    A term without a weight raises KeyError rather than being silently dropped or weighed 1.
    """
    if not terms:
        raise ValueError("weighted_total needs at least one term")
    missing = [name for name in terms if name not in weights]
    if missing:
        raise KeyError(f"no weight for loss term(s) {missing}; known: {sorted(weights)}")
    return torch.stack([weights[name] * value for name, value in terms.items()]).sum()


# --------------------------------------------------------------------------------------------
# The public-only U_e (sealed default): our terms, not the paper's
# --------------------------------------------------------------------------------------------
# Where the originals are sealed, U_e is trained alone: no U_d, so the critic sees one kind
# of fake and the public face need not carry x. See tasks.training.loops.train_public_encoder.

def public_critic_loss(d_x: torch.Tensor, d_a: torch.Tensor) -> torch.Tensor:
    """Eq. 6 with a single kind of fake: L_Df = −E[D_f(x)] + E[D_f(a)]."""
    return -d_x.mean() + d_a.mean()


def checkerboard_excess(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Energy of a's 2×2 checkerboard pattern beyond x's: E[relu(c(a) − c(x))], per image.

    Transposed 4×4 stride-2 convolutions print a period-2 grid on their output; in a real
    face that pattern (the Nyquist component of each 2×2 block) is faint. Penalising only
    the excess over the source leaves real texture alone.
    """
    kernel = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], device=a.device).div_(4).expand(a.shape[1], 1, 2, 2)

    def energy(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=t.shape[1]).abs().mean(dim=(1, 2, 3))

    return F.relu(energy(a) - energy(x)).mean()


def face_likeness_loss(face_scorers: Sequence[tuple[nn.Module, int]], faces: torch.Tensor) -> torch.Tensor:
    """E[−log p_face] of frozen face classifiers, each on the face square resized to its input size.

    `face_scorers` are (net, size) pairs whose forward takes (N, 3, size, size) normalised as
    MTCNN's nets expect ((255·v − 127.5) / 128) and returns the face probability last.
    `faces` are (N, 3, 64, 64) head ROIs in [0, 1]; the face square is their central 1/1.3
    (`track.head_roi` enlarges the detector's box by 1.3).
    """
    n = faces.shape[-1]
    side = round(n / 1.3)
    lo = (n - side) // 2
    square = faces[..., lo : lo + side, lo : lo + side].mul(255.0).sub(127.5).div(128.0)
    total = faces.new_zeros(())
    for net, size in face_scorers:
        crop = F.interpolate(square, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        probability = net(crop)[-1].reshape(len(faces), -1).mean(dim=1)
        total = total - torch.log(probability.clamp_min(1e-6)).mean()
    return total / max(len(face_scorers), 1)
