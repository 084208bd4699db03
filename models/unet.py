"""The two U-Nets of UU-Net: the encoder U_e (de-identifier) and the decoder U_d (reverser).

Both work on 64×64 face crops with values in [0, 1]. U_e sees RGB plus one keyed noise
channel; U_d sees the de-identified RGB plus the same noise channel (keyed mode) or the
RGB alone (the paper's mode). The layout follows the authors' pix2pix-style generator
(4×4 stride-2 convolutions down, transposed convolutions up, skip connections, sigmoid
output), narrowed so both nets fit in a few MB and run fast on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FACE_SIZE = 64


class _Down(nn.Module):
    def __init__(self, cin: int, cout: int, norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 4, stride=2, padding=1, bias=not norm)]
        if norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.LeakyReLU(0.2, inplace=True))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNet(nn.Module):
    """U-Net mapping (N, in_channels, 64, 64) → (N, 3, 64, 64) in [0, 1]."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 3,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        dropout: float = 0.0,
        output_blur: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.output_blur = output_blur
        # A fixed 3×3 binomial filter on the output logits: its response at the 2-pixel period
        # is exactly zero, so the checkerboard the last transposed convolution prints cannot
        # pass, and it has no parameters, so a trained pair's weights load unchanged.
        binomial = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("_blur", (torch.outer(binomial, binomial) / 16).expand(out_channels, 1, 3, 3).clone(),
                             persistent=False)
        self.widths = tuple(widths)
        self.downs = nn.ModuleList()
        cin = in_channels
        for i, w in enumerate(self.widths):
            # No norm on the first layer: pix2pix convention, the raw pixels keep their scale.
            self.downs.append(_Down(cin, w, norm=i > 0))
            cin = w
        # 1×1 bottleneck at the coarsest resolution (the authors' generator has one too).
        self.bottleneck = nn.Sequential(nn.Conv2d(cin, cin, 1), nn.ReLU(inplace=True))
        self.ups = nn.ModuleList()
        rev = list(reversed(self.widths))
        for i, w in enumerate(rev[1:]):
            # Input of each up block: previous up output + the skip of the same resolution.
            up_in = rev[i] if i == 0 else rev[i] * 2
            self.ups.append(_Up(up_in, w, dropout if i < 2 else 0.0))
        self.head = nn.ConvTranspose2d(self.widths[0] * 2, out_channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
        x = self.bottleneck(x)
        skips.pop()  # the deepest activation is the bottleneck's own input
        for up in self.ups:
            x = up(x)
            x = torch.cat([x, skips.pop()], dim=1)
        x = self.head(x)
        if self.output_blur:
            x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self._blur, groups=x.shape[1])
        return torch.sigmoid(x)


class UNetEncoder(nn.Module):
    """U_e: a = U_e(x ⊕ noise)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.0,
                 output_blur: bool = False) -> None:
        super().__init__()
        self.net = UNet(4, 3, widths, dropout, output_blur)

    def forward(self, faces: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([faces, noise], dim=1))


class UNetDecoder(nn.Module):
    """U_d: r = U_d(a ⊕ noise) in keyed mode, r = U_d(a) in the paper's mode."""

    def __init__(
        self, keyed: bool = True, widths: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.keyed = keyed
        self.net = UNet(4 if keyed else 3, 3, widths, dropout)

    def forward(self, faces: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.keyed:
            return self.net(torch.cat([faces, noise], dim=1))
        return self.net(faces)
