"""The two judges of UU-Net's training: the face critic D_f and the pairwise attribute matcher D_a.

* `PatchCritic` (D_f, paper eq. 6-8) scores how face-like a 64×64 crop looks, one raw score per
  8×8 patch. It is a Wasserstein-style critic, so it returns unbounded scores, not probabilities.
* `AttributeMatcher` (D_a, paper Table I, eqs. 1-4) looks at a pair of crops and predicts, for each
  of t labels (ID first, then soft labels such as gender), the probability that the two crops share
  that label. Phase I trains it; phase II freezes it and uses it to steer the generators.

Both take images in [0, 1], the range the U-Nets produce, so callers never rescale.
"""
from __future__ import annotations

import torch
from torch import nn


class PatchCritic(nn.Module):
    """D_f: PatchGAN critic, (N, 3, 64, 64) in [0, 1] → (N, 1, 8, 8) raw patch scores.

    Layout of the authors' PatchGAN: three 4×4 stride-2 convolutions (64 → 32 → 16 → 8 pixels),
    a 4×4 stride-1 convolution, then a 4×4 stride-1 convolution to one channel.

    No normalisation layers, unlike the authors' PatchGAN (which had BatchNorm): we train this
    critic with a gradient penalty on each sample's input gradient. BatchNorm makes one sample's
    score depend on the rest of the batch, so that per-sample gradient is no longer the gradient
    of the function being constrained (the WGAN-GP paper drops BatchNorm for the same reason).
    No sigmoid either: eq. 6 is a difference of expected raw scores.
    """

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256), head_width: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            cin = w
        # Stride-1 4×4 kernels keep the 8×8 map with Keras' "same" padding for even kernels:
        # 1 pixel before, 2 after (left, right, top, bottom).
        layers += [
            nn.ZeroPad2d((1, 2, 1, 2)),
            nn.Conv2d(cin, head_width, 4, stride=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.ZeroPad2d((1, 2, 1, 2)),
            nn.Conv2d(head_width, 1, 4, stride=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centre inputs on zero: the first convolution then sees signed values, as in pix2pix.
        return self.net(x * 2.0 - 1.0)


def standardize_per_image(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardization, as TensorFlow's `per_image_standardization` the authors used.

    Each image (all channels and pixels together) gets zero mean and unit variance. The divisor
    is max(std, 1/sqrt(numel)), TensorFlow's guard, so a constant image maps to zeros instead of
    dividing by zero.
    """
    n = x[0].numel()
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, keepdim=True, unbiased=False)
    std = torch.clamp(std, min=1.0 / n**0.5)
    return ((flat - mean) / std).reshape_as(x)


class AttributeMatcher(nn.Module):
    """D_a of Table I: (x1, x2) → for each of t labels, P(x1 and x2 share that label).

    The pair is concatenated on channels (6×64×64) after per-image standardization of each image.
    Five 3×3 convolution blocks (16 s2, 64, 128, 64 s2, 64 s2: 64 → 8 pixels), each
    BatchNorm → LeakyReLU → Dropout(0.25), then Dense 128 → ReLU → Dense t.

    Label 0 is the identity by convention of this project (see `models.losses`).
    """

    def __init__(self, num_labels: int, dropout: float = 0.25) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        self.num_labels = num_labels
        blocks: list[nn.Module] = []
        cin = 6
        for cout, stride in ((16, 2), (64, 1), (128, 1), (64, 2), (64, 2)):
            blocks += [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                # Keras BatchNormalization(momentum=0.8) updates moving = 0.8·moving + 0.2·batch;
                # PyTorch's momentum is the weight of the NEW batch, so the same rule is 0.2.
                # eps=1e-3 is Keras' default (PyTorch's is 1e-5).
                nn.BatchNorm2d(cout, momentum=0.2, eps=1e-3),
                # Keras' LeakyReLU() default slope, which the authors' matcher used.
                nn.LeakyReLU(0.3, inplace=True),
                nn.Dropout(dropout),
            ]
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_labels),
        )

    def logits(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Raw scores (N, t); train with BCE-with-logits (eq. 3), which is stabler than on sigmoids."""
        pair = torch.cat([standardize_per_image(x1), standardize_per_image(x2)], dim=1)
        return self.head(self.features(pair))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, t) in [0, 1] that x1 and x2 agree on each label (b̂ of eq. 2)."""
        return torch.sigmoid(self.logits(x1, x2))
