"""daft_mm/core/plan.py's prepare() as every front end calls it, and the mm statistics pass that
feeds it (daft_mm/mm/preparation.py): no Runner involved."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip('mmseg')

import daft_mm  # noqa: E402,F401
from mmengine.registry import MODELS  # noqa: E402

from _mm_helpers import CONFIGS, load_tiny, shrink_config, state_copy  # noqa: E402
from daft_mm.core import Plan, make_plan, prepare  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope='module')
def cfg_path(tmp_path_factory) -> Path:
    return shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py',
                         tmp_path_factory.mktemp('configs'))


def _changed(run, layer):
    return not torch.equal(run['before'][f'{layer}.running_mean'],
                           run['after'][f'{layer}.running_mean'])


def _untouched(run, layer):
    return all(torch.equal(run['before'][f'{layer}.{t}'], run['after'][f'{layer}.{t}'])
               for t in ('weight', 'bias', 'running_mean', 'running_var'))


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2))
    net[1].running_mean.uniform_(-1, 1)
    return net


def test_a_failing_preparation_leaves_the_model_as_it_was():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plan = Plan(convert=('1', ), predictors=('4', ), zero_init=True)  # '4' is a Flatten
    with pytest.raises(TypeError, match=r"refusing to zero \['4 \(Flatten\)'\]"):
        prepare(net, [torch.randn(2, 3, 8, 8)], plan)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_prepare_converts_then_zeroes_what_the_plan_names():
    net = _net()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    net.eval()
    reference = net(batches[0]).detach()
    plan = make_plan(net, pretrained=['0', '1'], predictors=['5'], zero_init=False)
    done = prepare(net, batches, plan)
    assert done.report.converted == ['1'] and done.zeroed == []
    torch.testing.assert_close(net(batches[0]), reference, rtol=1e-4, atol=1e-5)
    done = prepare(net, None, make_plan(net, pretrained=None, predictors=['5'], convert=False,
                                        priors={'5': 0.5}))
    assert done.report is None and done.zeroed == ['5']
    assert not net[5].weight.any() and bool((net[5].bias == 0.5).all())


def test_prepare_without_a_runner(cityscapes_root, cfg_path, tmp_path):
    """The preparation as functions: decide the plan from a config, build the model and a loader
    yourself, ``prepare`` -- what DAFTHook does before the first step, no Runner involved."""
    from mmengine.registry import DefaultScope
    from mmengine.runner import Runner as R

    from daft_mm.core import prepare
    from daft_mm.mm.plan import decide_plan
    from daft_mm.mm.preparation import mm_forward, one_pass_loader
    cfg = load_tiny(cfg_path, tmp_path, cityscapes_root, **{'train_dataloader.batch_size': 2})
    with DefaultScope.overwrite_default_scope('mmseg'):
        model = MODELS.build(cfg.model)
        model.init_weights()  # loads the pretrained backbone (init_cfg)
        loader = one_pass_loader(R.build_dataloader(cfg.train_dataloader, seed=0), seed=0)
    net = model.model
    plan = decide_plan(cfg, model)
    before = state_copy(net)
    done = prepare(net, loader, plan.core(), forward=mm_forward('loss'))
    assert done.zeroed == ['decode_head.conv_seg', 'auxiliary_head.conv_seg']
    assert done.report.converted == list(plan.conversion.converted)
    assert done.report.layers[0].num_samples == 4  # every training image, once
    after = state_copy(net)
    run = dict(before=before, after=after)
    assert all(_changed(run, n) for n in plan.conversion.converted)
    assert all(_untouched(run, n) for n in plan.conversion.left_new)
    assert not after['decode_head.conv_seg.weight'].any()
