"""daft_mm/core/interpolation.py: WiSE-FT's weight-space mix of two fine-tuning endpoints."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from daft_mm.core import interpolate_states, mix_with_statistics


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.LazyLinear(2))
    net(torch.randn(2, 3, 6, 6))
    net[1].running_mean.uniform_(-1, 1)
    net[1].num_batches_tracked.fill_(seed + 3)
    return net


def test_alpha_0_and_1_give_the_endpoints_exactly():
    start, end = _net(0).state_dict(), _net(1).state_dict()
    for alpha, want in ((0.0, start), (1.0, end)):
        mixed = interpolate_states(start, end, alpha)
        assert mixed.keys() == want.keys()
        for key, value in mixed.items():
            expected = end[key] if not torch.is_floating_point(value) else want[key]
            assert torch.equal(value, expected), (alpha, key)
    half = interpolate_states(start, end, 0.5)
    torch.testing.assert_close(half['0.weight'], (start['0.weight'] + end['0.weight']) / 2)


def test_checkpoints_of_different_architectures_are_refused():
    start = _net(0).state_dict()
    wider = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).state_dict()
    with pytest.raises(ValueError, match=r'not of one architecture.*other shapes.*0\.weight'):
        interpolate_states(start, {**start, **wider}, 0.5)
    with pytest.raises(ValueError, match=r'only in the start'):
        interpolate_states(start, {k: v for k, v in start.items() if k != '4.bias'}, 0.5)
    with pytest.raises(ValueError, match=r'alpha must be in \[0, 1\]'):
        interpolate_states(start, start, 1.5)


def test_the_mix_gets_the_statistics_of_the_data_with_its_weights_kept():
    start, end = _net(0).state_dict(), _net(1).state_dict()
    model = _net(2)
    batches = [torch.randn(8, 3, 6, 6) * 2 + 1 for _ in range(3)]
    report = mix_with_statistics(model, start, end, 0.5, batches)
    mixed = interpolate_states(start, end, 0.5)
    assert torch.equal(model[1].weight, mixed['1.weight'])  # affine kept
    assert torch.equal(model[1].bias, mixed['1.bias'])
    assert not torch.allclose(model[1].running_mean, mixed['1.running_mean'])
    with torch.no_grad():
        feats = torch.cat([model[0](b) for b in batches])
    torch.testing.assert_close(model[1].running_mean, feats.mean((0, 2, 3)), rtol=1e-4,
                               atol=1e-5)
    assert report.converted == ['1']
