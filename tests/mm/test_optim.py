"""daft_mm/mm/optim.py: the optimizer is built once, by DAFTOptimWrapperConstructor, from the plan;
per-group LR floors; the config records what ran."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.registry import PARAM_SCHEDULERS
from mmengine.runner import Runner

from daft_mm.mm import optim


class _Watch(Hook):
    """Records the optimizer wrapper and its optimizer before the run and after every step."""

    def __init__(self) -> None:
        self.seen = []

    def before_run(self, runner) -> None:
        self.seen.append((runner.optim_wrapper, runner.optim_wrapper.optimizer))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self.seen.append((runner.optim_wrapper, runner.optim_wrapper.optimizer))


def test_the_optimizer_the_runner_built_is_the_one_that_trains(tiny_cfg, cityscapes_root,
                                                              monkeypatch):
    calls = []
    build = optim.DAFTOptimWrapperConstructor.__call__

    def counted(self, model):
        wrapper = build(self, model)
        calls.append(wrapper)
        return wrapper

    monkeypatch.setattr(optim.DAFTOptimWrapperConstructor, '__call__', counted)
    cfg = tiny_cfg('tiny_daft_deeplabv3_cityscapes', cityscapes_root,
                   **{'train_cfg.max_iters': 2, 'daft_head_lr_mult': 20})
    runner = Runner.from_cfg(cfg)
    watch = _Watch()
    runner.register_hook(watch, priority='VERY_LOW')
    runner.train()
    assert len(calls) == 1, 'the optimizer is built once, by the DAFT constructor'
    assert all(w is calls[0] and o is calls[0].optimizer for w, o in watch.seen)
    assert len(watch.seen) == 3  # before the run and after both steps: the same objects
    plan = calls[0].daft_plan
    assert plan.head_lr_mult == 20 and plan.head_lr_mult_from == 'daft_head_lr_mult'
    base = cfg.optim_wrapper.optimizer.lr
    net = runner.model.module if hasattr(runner.model, 'module') else runner.model
    head_params = {id(p) for name in plan.head_modules
                   for p in net.get_submodule(name).parameters()}
    for group in calls[0].optimizer.param_groups:
        for p in group['params']:
            want = base * 20 if id(p) in head_params else base
            assert group['initial_lr'] == pytest.approx(want), group
    assert {id(p) for p in net.backbone.parameters()}.isdisjoint(head_params)
    # the dumped config says what ran: the constructor and the head ratio
    dumped = Config.fromfile(str(next(Path(cfg.work_dir).glob('*.py'))))
    assert dumped.optim_wrapper.constructor == 'DAFTOptimWrapperConstructor'
    assert dumped.optim_wrapper.paramwise_cfg.daft.head_lr_mult == 20
    assert dumped.param_scheduler[0].type == 'PolyLRGroupFloors'


def test_a_config_not_completed_is_refused_naming_the_fix(tiny_cfg, cityscapes_root):
    cfg = tiny_cfg('tiny_daft_deeplabv3_cityscapes', cityscapes_root)
    cfg.optim_wrapper.pop('constructor')
    with pytest.raises(RuntimeError, match='not built by DAFTOptimWrapperConstructor.*'
                                           'complete_daft_config'):
        Runner.from_cfg(cfg).train()
    cfg = tiny_cfg('tiny_daft_deeplabv3_cityscapes', cityscapes_root)
    cfg.daft_head_lr_mult = 30  # changed after loading: the optimizer would not follow
    with pytest.raises(RuntimeError, match='changed after it was completed'):
        Runner.from_cfg(cfg).train()


def test_completion_leaves_ft_configs_alone_and_is_idempotent(tiny_cfg, cityscapes_root):
    ft = tiny_cfg('tiny_deeplabv3_cityscapes', cityscapes_root)
    assert 'constructor' not in ft.optim_wrapper
    daft = tiny_cfg('tiny_daft_deeplabv3_cityscapes', cityscapes_root)
    before = daft.to_dict()
    assert optim.complete_daft_config(daft) == []
    assert daft.to_dict() == before


@pytest.mark.parametrize('kind', ['PolyLR', 'CosineAnnealingLR'])
def test_eta_min_becomes_a_floor_per_param_group(kind):
    cfg = [dict(type=kind, eta_min=1e-4, begin=0, end=100, by_epoch=False)]
    if kind == 'PolyLR':
        cfg[0]['power'] = 0.9
    else:
        cfg[0]['T_max'] = 100
    # a pure-Python config names the class itself
    from mmengine.optim import scheduler
    assert len(optim.group_floors([dict(cfg[0], type=getattr(scheduler, kind))], 0.01)) == 1
    assert len(optim.group_floors(cfg, 0.01)) == 1
    backbone, head = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{'params': [backbone]}, {'params': [head], 'lr': 0.1}], lr=0.01)
    sched = PARAM_SCHEDULERS.build(dict(cfg[0], optimizer=opt))
    for _ in range(100):
        opt.step()
        sched.step()
        lrs = [g['lr'] for g in opt.param_groups]
        assert lrs[1] / lrs[0] == pytest.approx(10, rel=1e-9)
    assert lrs[0] == pytest.approx(1e-4, rel=0.05)  # the backbone ends at its floor, eta_min
    assert all(isinstance(v, (int, float, str, bool, list, dict, type(None)))
               for v in sched.state_dict().values())


def test_an_absolute_floor_that_cannot_be_kept_is_refused():
    with pytest.raises(ValueError, match=r'param_scheduler\[0\] \(LinearLR.*Fix: eta_min=0'):
        optim.group_floors([dict(type='LinearLR', eta_min=1e-4, start_factor=0.1)], 0.01)


def test_the_removed_daft_paramwise_cfg_names_what_replaced_it(tmp_path):
    from daft_mm.mm.cli import load_config
    config = tmp_path / 'old.py'
    config.write_text("_base_ = ['" + str(Path(__file__).parents[2] / 'configs' / '_tiny_' /
                      'tiny_daft_deeplabv3_cityscapes.py') + "']\n"
                      "daft_paramwise_cfg = dict(custom_keys={'decode_head.conv_seg': "
                      "dict(lr_mult=10.)})\n")
    with pytest.raises(ValueError, match='daft_paramwise_cfg was removed: '
                                         'DAFTOptimWrapperConstructor.*daft_head_lr_mult'):
        load_config(str(config))


def test_another_constructor_is_refused_and_a_derived_one_kept(tiny_cfg, cityscapes_root):
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    @OPTIM_WRAPPER_CONSTRUCTORS.register_module(force=True)
    class MyDAFTConstructor(optim.DAFTOptimWrapperConstructor):
        pass

    cfg = tiny_cfg('tiny_daft_deeplabv3_cityscapes', cityscapes_root)
    cfg.optim_wrapper.constructor = 'MyDAFTConstructor'
    optim.complete_daft_config(cfg)
    assert cfg.optim_wrapper.constructor == 'MyDAFTConstructor'
    cfg.optim_wrapper.constructor = 'LearningRateDecayOptimWrapperConstructor'
    with pytest.raises(ValueError, match='two constructors cannot both build the optimizer'):
        optim.complete_daft_config(cfg)
