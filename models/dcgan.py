"""The DCGAN generator of the PyTorch tutorial, as shipped trained in `gan-face-generate`.

Layer for layer the tutorial's `Generator`: a stack of 4×4 transposed convolutions
(no biases, BatchNorm after each but the last) from a 100-d latent to a 64×64 RGB
image in [−1, 1]. It sits in an `nn.Sequential` named `main`, in the same order,
because that is how the released `netG_state_dict` names its tensors
(`main.0.weight` … `main.12.weight`) and it must load strictly: a silently
skipped tensor would leave a random layer that still produces "faces".
"""
from __future__ import annotations

import torch
from torch import nn

NZ = 100  # latent size the released weights were trained with
NGF = 64  # feature maps of the last hidden layer
FACE_SIZE = 64


class DCGANGenerator(nn.Module):
    """z (N, nz) or (N, nz, 1, 1) → RGB (N, 3, 64, 64) in [−1, 1] (tanh)."""

    def __init__(self, nz: int = NZ, ngf: int = NGF, channels: int = 3) -> None:
        super().__init__()
        self.nz = nz
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),  # → 4×4
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),  # → 8×8
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),  # → 16×16
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),  # → 32×32
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, channels, 4, 2, 1, bias=False),  # → 64×64
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        if z.dim() != 4 or z.shape[1:] != (self.nz, 1, 1):
            raise ValueError(f"expected latents (N, {self.nz}) or (N, {self.nz}, 1, 1), got {tuple(z.shape)}")
        return self.main(z)
