"""Shapes and construction details of the face critic D_f and the attribute matcher D_a."""
from __future__ import annotations

import torch
from torch import nn

from models.critics import AttributeMatcher, PatchCritic, standardize_per_image


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_patch_critic_gives_an_8x8_map_of_raw_scores():
    torch.manual_seed(0)
    critic = PatchCritic()
    scores = critic(torch.rand(3, 3, 64, 64))
    assert scores.shape == (3, 1, 8, 8)
    assert torch.isfinite(scores).all()
    # Raw scores, not probabilities: with a sigmoid at the end no bias could push them past 1.
    with torch.no_grad():
        critic.net[-1].bias.fill_(5.0)
        assert (critic(torch.rand(3, 3, 64, 64)) > 1.0).all()


def test_patch_critic_scores_each_sample_on_its_own():
    # The gradient penalty is per sample: no layer may mix samples of a batch (no BatchNorm).
    torch.manual_seed(1)
    critic = PatchCritic(widths=(8, 16, 32), head_width=16).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    x = torch.rand(4, 3, 64, 64)
    assert torch.allclose(critic(x)[:1], critic(x[:1]), atol=1e-6)


def test_attribute_matcher_outputs_probabilities_per_label():
    torch.manual_seed(0)
    matcher = AttributeMatcher(num_labels=4)
    assert matcher.num_labels == 4
    x1, x2 = torch.rand(5, 3, 64, 64), torch.rand(5, 3, 64, 64)
    matcher.train()
    p = matcher(x1, x2)
    assert p.shape == (5, 4)
    assert ((p >= 0) & (p <= 1)).all()
    matcher.eval()
    logits = matcher.logits(x1, x2)
    assert logits.shape == (5, 4)
    assert torch.allclose(matcher(x1, x2), torch.sigmoid(logits))


def test_matcher_batchnorm_uses_keras_momentum_0_8():
    matcher = AttributeMatcher(num_labels=2)
    norms = [m for m in matcher.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 5
    assert all(m.momentum == 0.2 for m in norms)
    # Behaviour, not only the attribute: one training step moves the running mean 20 % of the way.
    first_conv, first_bn = matcher.features[0], matcher.features[1]
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        pair = torch.cat([standardize_per_image(x), standardize_per_image(x.flip(0))], dim=1)
        batch_mean = first_conv(pair).mean(dim=(0, 2, 3))
    matcher.train()
    matcher(x, x.flip(0))
    assert torch.allclose(first_bn.running_mean, 0.2 * batch_mean, atol=1e-5)


def test_per_image_standardization_survives_a_constant_image():
    constant = torch.full((2, 3, 64, 64), 0.7)
    # Zeros up to the rounding of the mean, instead of 0/0 = NaN.
    assert standardize_per_image(constant).abs().max() < 1e-3
    varied = torch.rand(2, 3, 64, 64) * 0.3 + 0.5
    z = standardize_per_image(varied)
    assert torch.allclose(z.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(z.std(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)

    matcher = AttributeMatcher(num_labels=3)
    for mode in (matcher.train, matcher.eval):
        mode()
        assert torch.isfinite(matcher(constant, torch.zeros_like(constant))).all()


def test_models_stay_small():
    critic, matcher = PatchCritic(), AttributeMatcher(num_labels=4)
    print(f"PatchCritic: {n_params(critic):,} parameters; AttributeMatcher(t=4): {n_params(matcher):,}")
    assert n_params(critic) < 5_000_000
    assert n_params(matcher) < 5_000_000


def test_matcher_rejects_zero_labels():
    try:
        AttributeMatcher(num_labels=0)
    except ValueError as err:
        assert "num_labels" in str(err)
    else:
        raise AssertionError("AttributeMatcher(0) must raise ValueError")


def test_output_blur_removes_the_two_pixel_checkerboard_and_adds_no_parameters():
    import torch.nn.functional as F

    from models.unet import UNet

    plain, blurred = UNet(4, 3, (8, 16)), UNet(4, 3, (8, 16), output_blur=True)
    assert [n for n, _ in plain.state_dict().items()] == [n for n, _ in blurred.state_dict().items()]
    blurred.load_state_dict(plain.state_dict())
    # The binomial filter on a ±1 checkerboard: corners 4·(+1), edges 4·2·(−1), centre 4·(+1): (4 − 8 + 4)/16 = 0.
    board = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float() * 2 - 1
    out = F.conv2d(board.expand(1, 3, 8, 8), blurred._blur, groups=3)
    assert out.abs().max().item() == 0.0
    flat = F.conv2d(torch.ones(1, 3, 8, 8), blurred._blur, groups=3)
    assert torch.allclose(flat, torch.ones_like(flat))  # and passes a flat image unchanged
