"""Face de-identifier pairs (U_e, U_d) selectable by name.

The pipeline never needs to know which pair it runs: both take (faces, noise) with
faces (N, 3, 64, 64) in [0, 1] and noise (N, 1, 64, 64), and return (N, 3, 64, 64).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from models.permutation import PermutationDecoder, PermutationEncoder
from models.unet import UNetDecoder, UNetEncoder

MODEL_NAMES = ("uunet", "keyed-permutation")


def build_pair(name: str, config: dict[str, Any] | None = None) -> tuple[nn.Module, nn.Module]:
    """Fresh (untrained) encoder and decoder for a model name and its config."""
    config = dict(config or {})
    if name == "uunet":
        widths = tuple(config.get("widths", (32, 64, 128, 256)))
        dropout = float(config.get("dropout", 0.0))
        keyed = bool(config.get("keyed", True))
        # output_blur: the public-only U_e's fixed anti-checkerboard filter (models/unet.py).
        return (UNetEncoder(widths, dropout, bool(config.get("output_blur", False))),
                UNetDecoder(keyed, widths, dropout))
    if name == "keyed-permutation":
        return PermutationEncoder(), PermutationDecoder()
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
