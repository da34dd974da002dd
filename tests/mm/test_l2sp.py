"""daft_mm/mm/l2sp.py: L2-SP's pull toward the starting weights, as an mmengine optimizer."""
from __future__ import annotations

import pytest
import torch
from mmengine.optim import build_optim_wrapper
from torch import nn

import daft_mm.mm  # noqa: F401  (registers the wrapper and its constructor)


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Module()
    net.backbone = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
    net.head = nn.Linear(3, 2)
    return net


def _wrapper(net, strength=0.5):
    return build_optim_wrapper(net, dict(
        type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1, weight_decay=0.01),
        constructor='L2SPOptimWrapperConstructor',
        paramwise_cfg=dict(l2sp=dict(strength=strength, modules=['backbone']))))


def _loss(net, x):
    return net.head(net.backbone(x)).pow(2).mean()


def test_the_penalty_is_zero_at_the_start_and_its_gradient_is_lambda_times_the_distance():
    net, x = _model(), torch.randn(5, 4)
    wrapper = _wrapper(net)
    assert {id(p) for p in wrapper.anchored} == {id(p) for p in net.backbone.parameters()}
    # no weight decay on the anchored parameters (L2-SP replaces it), decay on the head
    decay = {id(p): g['weight_decay'] for g in wrapper.param_groups for p in g['params']}
    assert {decay[id(p)] for p in net.backbone.parameters()} == {0.0}
    assert {decay[id(p)] for p in net.head.parameters()} == {0.01}
    wrapper.update_params(_loss(net, x))  # the first step takes the anchors w0
    assert float(wrapper.penalty()) > 0  # the weights moved: w != w0
    anchors = [a.clone() for a in wrapper.anchors]
    # the gradient the wrapper adds equals autograd's gradient of the penalty, lambda (w - w0)
    wrapper.zero_grad()
    penalty = wrapper.penalty()
    penalty.backward()
    autograd = [p.grad.clone() for p in wrapper.anchored]
    for p, a, g in zip(wrapper.anchored, anchors, autograd):
        torch.testing.assert_close(g, 0.5 * (p.detach() - a))
    wrapper.zero_grad()
    loss = _loss(net, x)
    loss.backward()
    plain = [p.grad.clone() for p in wrapper.anchored]
    before = [p.detach().clone() for p in wrapper.anchored]
    wrapper.step()  # SGD without decay on them: w -= lr * (dL/dw + lambda (w - w0))
    for p, b, g, a in zip(wrapper.anchored, before, plain, anchors):
        torch.testing.assert_close(p.detach(), b - 0.1 * (g + 0.5 * (b - a)))


def test_before_the_first_step_the_penalty_is_zero_and_anchors_travel_in_the_state():
    net = _model()
    wrapper = _wrapper(net)
    assert float(wrapper.penalty()) == 0.0
    wrapper.update_params(_loss(net, torch.randn(5, 4)))
    state = wrapper.state_dict()
    again = _wrapper(_model())
    again.load_state_dict(state)
    for a, b in zip(again.anchors, wrapper.anchors):
        assert torch.equal(a, b)


def test_a_module_that_does_not_exist_is_named():
    with pytest.raises(ValueError, match=r'l2sp\.modules'):
        build_optim_wrapper(_model(), dict(
            type='OptimWrapper', optimizer=dict(type='SGD', lr=0.1, weight_decay=0.01),
            constructor='L2SPOptimWrapperConstructor',
            paramwise_cfg=dict(l2sp=dict(modules=['backbnoe']))))
