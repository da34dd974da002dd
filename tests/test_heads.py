"""daft_mm.core.heads: zero-init of final predictors, param groups, LP freezing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from daft_mm.core import (freeze_feature_extractor, set_bn_eval, split_param_groups,
                          zero_init_predictors)


pytestmark = pytest.mark.usefixtures('one_torch_thread')


class TinyClassifier(nn.Module):
    """conv-BN-ReLU backbone and a linear ``fc``: the ResNet shape in miniature."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


class TinySegmentor(nn.Module):
    """mmseg-style naming: ``decode_head.conv_seg`` and ``auxiliary_head.conv_seg``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.decode_head = nn.Module()
        self.decode_head.conv = nn.Conv2d(4, 4, 1)
        self.decode_head.conv_seg = nn.Conv2d(4, 5, 1)
        self.auxiliary_head = nn.Module()
        self.auxiliary_head.conv_seg = nn.Conv2d(4, 5, 1)


class TinyDetector(nn.Module):
    """mmdet-style naming: ``roi_head.bbox_head.fc_cls`` / ``fc_reg``."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.roi_head = nn.Module()
        self.roi_head.bbox_head = nn.Module()
        self.roi_head.bbox_head.shared_fc = nn.Linear(4, 4)
        self.roi_head.bbox_head.fc_cls = nn.Linear(4, 3)
        self.roi_head.bbox_head.fc_reg = nn.Linear(4, 8)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(before: dict[str, torch.Tensor], model: nn.Module, skip: tuple = ()) -> None:
    for key, value in model.state_dict().items():
        if not key.startswith(skip):
            assert torch.equal(value, before[key]), key


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


# ------------------------------------------------------------------ zero_init_predictors
def test_zero_init_zeroes_exactly_the_named_layer():
    torch.manual_seed(0)
    model = TinyClassifier()
    before = snapshot(model)
    assert zero_init_predictors(model, 'fc') == ['fc']
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0
    assert_same(before, model, skip=('fc.',))


def test_zero_init_glob_matches_every_segmentation_predictor_and_nothing_else():
    model = TinySegmentor()
    before = snapshot(model)
    names = zero_init_predictors(model, ['*.conv_seg'])
    assert names == ['decode_head.conv_seg', 'auxiliary_head.conv_seg']
    for head in (model.decode_head.conv_seg, model.auxiliary_head.conv_seg):
        assert not head.weight.any() and not head.bias.any()
    assert_same(before, model, skip=('decode_head.conv_seg.', 'auxiliary_head.conv_seg.'))
    assert model.decode_head.conv.weight.any()


def test_zero_init_detection_predictors_by_path():
    model = TinyDetector()
    names = zero_init_predictors(model, ['roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg'])
    assert names == ['roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg']
    assert not model.roi_head.bbox_head.fc_cls.weight.any()
    assert not model.roi_head.bbox_head.fc_reg.weight.any()
    assert model.roi_head.bbox_head.shared_fc.weight.any()


def test_zero_init_accepts_predictor_without_bias():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2, bias=False))
    assert zero_init_predictors(model, '1') == ['1']
    assert not model[1].weight.any()


def test_gradients_reach_the_backbone_after_one_step():
    """Zeroing only the final predictor stalls the backbone for one step, not forever."""
    torch.manual_seed(0)
    model = TinyClassifier()
    zero_init_predictors(model, 'fc')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = batch()

    F.cross_entropy(model(x), y).backward()
    assert model.fc.weight.grad.abs().sum() > 0  # the head learns at once
    for name, param in model.backbone.named_parameters():
        assert param.grad is None or not param.grad.any(), name  # W=0 blocks dL/dh
    optimizer.step()
    optimizer.zero_grad()

    F.cross_entropy(model(x), y).backward()
    for name, param in model.backbone.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_unknown_name_lists_close_matches_and_changes_nothing():
    model = TinyClassifier()
    before = snapshot(model)
    with pytest.raises(KeyError, match=r"'fcc'.*close matches.*'fc'"):
        zero_init_predictors(model, ['fc', 'fcc'])  # 'fc' is valid but must not be zeroed
    assert_same(before, model)


def test_glob_matching_nothing_is_an_error():
    model = TinySegmentor()
    with pytest.raises(KeyError, match='no module'):
        zero_init_predictors(model, '*.fc_cls')


@pytest.mark.parametrize('factory, valid, bad', [
    (TinyClassifier, 'fc', 'backbone'),  # a container: zeroing it kills every feature
    (TinyClassifier, 'fc', 'backbone.1'),  # BatchNorm: has a weight, is no predictor
    (TinyClassifier, 'fc', 'backbone.2'),  # ReLU: no weight at all
    (TinySegmentor, 'decode_head.conv_seg', 'decode_head'),
])
def test_refuses_non_predictor_modules_and_changes_nothing(factory, valid, bad):
    model = factory()
    before = snapshot(model)
    with pytest.raises(TypeError, match='only final predictor'):
        zero_init_predictors(model, [valid, bad])
    assert_same(before, model)


def test_empty_name_list_and_catch_all_glob_are_rejected():
    model = TinyClassifier()
    before = snapshot(model)
    with pytest.raises(ValueError, match='no layer names'):
        zero_init_predictors(model, [])
    with pytest.raises(TypeError, match='backbone'):
        zero_init_predictors(model, '*')
    assert_same(before, model)


# ------------------------------------------------------------------ split_param_groups
def _ids(params) -> list[int]:
    return [id(p) for p in params]


def test_param_groups_have_the_right_lrs_and_cover_each_trainable_param_once():
    model = TinyDetector()
    groups = split_param_groups(model, ['roi_head.bbox_head.fc_*'], lr=0.01, head_lr=0.1,
                                weight_decay=1e-4, head_weight_decay=0.0)
    assert [g['name'] for g in groups] == ['feature_extractor', 'head']
    features, head = groups
    assert (features['lr'], head['lr']) == (0.01, 0.1)
    assert (features['weight_decay'], head['weight_decay']) == (1e-4, 0.0)
    bbox = model.roi_head.bbox_head
    assert set(_ids(head['params'])) == set(_ids([*bbox.fc_cls.parameters(),
                                                  *bbox.fc_reg.parameters()]))
    all_ids = _ids(features['params']) + _ids(head['params'])
    assert len(all_ids) == len(set(all_ids))
    assert set(all_ids) == set(_ids(model.parameters()))

    optimizer = torch.optim.SGD(groups, lr=123.0)  # group LRs win over the default
    assert [g['lr'] for g in optimizer.param_groups] == [0.01, 0.1]


def test_weight_decay_defaults():
    model = TinyClassifier()
    plain = split_param_groups(model, 'fc', lr=0.1, head_lr=1.0)
    assert all('weight_decay' not in g for g in plain)  # optimizer default applies
    same = split_param_groups(model, 'fc', lr=0.1, head_lr=1.0, weight_decay=0.05)
    assert [g['weight_decay'] for g in same] == [0.05, 0.05]


def test_frozen_params_are_left_out_and_an_empty_group_dropped():
    model = TinyClassifier()
    model.backbone[0].weight.requires_grad_(False)
    groups = split_param_groups(model, 'fc', lr=0.1, head_lr=1.0)
    assert id(model.backbone[0].weight) not in _ids(groups[0]['params'])

    freeze_feature_extractor(model, 'fc')
    groups = split_param_groups(model, 'fc', lr=0.1, head_lr=1.0)
    assert [g['name'] for g in groups] == ['head']
    assert set(_ids(groups[0]['params'])) == set(_ids(model.fc.parameters()))


def test_param_group_errors():
    model = TinyClassifier()
    with pytest.raises(KeyError, match="'classifier'"):
        split_param_groups(model, 'classifier', lr=0.1, head_lr=1.0)
    with pytest.raises(ValueError, match='no parameters'):
        split_param_groups(model, ['fc', 'backbone.2'], lr=0.1, head_lr=1.0)
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match='requires_grad'):
        split_param_groups(model, 'fc', lr=0.1, head_lr=1.0)


def test_weight_tied_across_the_head_boundary_is_an_error():
    model = TinyDetector()
    model.backbone.weight = model.roi_head.bbox_head.shared_fc.weight  # tied across
    with pytest.raises(ValueError, match='both groups'):
        split_param_groups(model, 'roi_head.bbox_head', lr=0.1, head_lr=1.0)
    # Tied within the head is fine: one parameter, one group.
    model = TinyDetector()
    model.roi_head.bbox_head.fc_reg.bias = model.roi_head.bbox_head.shared_fc.bias
    groups = split_param_groups(model, 'roi_head.bbox_head', lr=0.1, head_lr=1.0)
    ids = [i for g in groups for i in _ids(g['params'])]
    assert len(ids) == len(set(ids))


def test_overlapping_head_names_do_not_duplicate_params():
    model = TinyDetector()
    groups = split_param_groups(model, ['roi_head.bbox_head', '*.fc_cls'], lr=0.1, head_lr=1.0)
    ids = [i for g in groups for i in _ids(g['params'])]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


# ------------------------------------------------------------------ LP helpers
def test_freeze_feature_extractor_returns_what_it_froze():
    model = TinyClassifier()
    model.backbone[0].bias.requires_grad_(False)  # already frozen: not reported
    frozen = freeze_feature_extractor(model, 'fc')
    expected = [n for n, _ in model.backbone.named_parameters()]
    assert frozen == [f'backbone.{n}' for n in expected if n != '0.bias']
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())


def test_lp_keeps_backbone_params_and_bn_stats_unchanged():
    torch.manual_seed(0)
    model = TinyClassifier()
    before = snapshot(model)
    freeze_feature_extractor(model, 'fc')
    optimizer = torch.optim.SGD(split_param_groups(model, 'fc', lr=0.1, head_lr=0.1),
                                momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        model.train()
        assert set_bn_eval(model) == 2
        x, y = batch(seed=step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert_same(before, model, skip=('fc.',))  # weights and running stats alike
    assert not torch.equal(model.fc.weight, before['fc.weight'])


def test_bn_in_train_mode_would_move_stats():
    """The control for the test above: without set_bn_eval the stats do change."""
    model = TinyClassifier()
    before = snapshot(model)
    model.train()
    with torch.no_grad():
        model(batch()[0])
    assert not torch.equal(model.backbone[1].running_mean, before['backbone.1.running_mean'])


def test_set_bn_eval_leaves_other_modules_alone_and_train_undoes_it():
    model = TinyClassifier().train()
    set_bn_eval(model)
    assert not model.backbone[1].training and not model.backbone[4].training
    assert model.backbone[0].training and model.fc.training
    model.train()  # why the helper must be called after every model.train()
    assert model.backbone[1].training


def test_flush_subnormals_flushes_inside_and_restores_after():
    from daft_mm.core import flush_subnormals
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a subnormal float32
    assert (tiny * 1.0).item() != 0.0
    with flush_subnormals() as supported:
        if not supported:
            pytest.skip('this CPU cannot flush subnormals')
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0
