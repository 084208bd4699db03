"""An exactly invertible stand-in for (U_e, U_d): a keyed pixel permutation.

It exists to test the plumbing (crop, resize, paste, steganography, encode, payload
recovery, keyed noise) independently of training: with this pair the whole public →
private path must return the source face exactly when the ROI is 64×64. The
permutation is the argsort of the keyed noise channel, so it changes with the key,
the video and the sequence exactly like the U-Nets' input does, and U_d needs the
same noise to undo it.
"""
from __future__ import annotations

import torch
from torch import nn


def _permutation(noise: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) noise → (N, H*W) pixel order; stable so ties cannot differ between calls."""
    return torch.argsort(noise.flatten(1), dim=1, stable=True)


class PermutationEncoder(nn.Module):
    def forward(self, faces: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        n, c, h, w = faces.shape
        order = _permutation(noise).unsqueeze(1).expand(n, c, h * w)
        return faces.flatten(2).gather(2, order).view(n, c, h, w)


class PermutationDecoder(nn.Module):
    keyed = True

    def forward(self, faces: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        n, c, h, w = faces.shape
        order = _permutation(noise).unsqueeze(1).expand(n, c, h * w)
        restored = torch.empty_like(faces.flatten(2))
        restored.scatter_(2, order, faces.flatten(2))
        return restored.view(n, c, h, w)
