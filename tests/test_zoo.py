"""Model-zoo coverage, fast subset: tools/check_zoo_coverage.py on a few representative stock
folders of the installed mmseg / mmdet (small ResNet, random batches, nothing downloaded). The full
table (every folder, ~1-2 h on 2 busy cores) is `python tools/check_zoo_coverage.py`; docs/zoo_coverage.md
shows it.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from _mm_helpers import REPO, cpu_env
from daft_mm.mm.doctor import _to_float64, float64_function_diff

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')
PRIOR = round(-math.log(99), 3)


@pytest.fixture(scope='module')
def zoo():
    from daft_mm.mm import zoo
    return zoo


@pytest.mark.parametrize('folder,predictors,priors', [
    # a focal-loss dense head: stock BN frozen (norm_eval, frozen_stages=1) -> the fragment's
    # daft_backbone; retina_cls keeps its prior
    ('mmdet/retinanet', ['bbox_head.retina_cls', 'bbox_head.retina_reg'],
     {'bbox_head.retina_cls': PRIOR}),
    # DANet predicts from three layers of its head, plus the auxiliary head
    ('mmseg/danet', ['decode_head.conv_seg', 'decode_head.pam_conv_seg',
                     'decode_head.cam_conv_seg', 'auxiliary_head.conv_seg'], {}),
    # a video (MOT) model: two-frame clips through the TrackDataPreprocessor, wrapped detector
    ('mmdet/qdtrack', ['detector.roi_head.bbox_head.fc_cls', 'detector.roi_head.bbox_head.fc_reg'],
     {}),
])
def test_zoo_folder_works_end_to_end(zoo, folder, predictors, priors):
    result = zoo.check_folder(*folder.split('/'))
    assert result.status == 'ok', result.note
    assert result.predictors == predictors and result.priors == priors
    assert result.converted == result.bn_layers > 0
    assert result.function_diff is not None and result.function_diff < 1e-4
    n = len(predictors)
    assert result.train_step.endswith(f'{n}/{n} predictors got gradient')


def test_zoo_static_checks_of_query_and_cascade_heads(zoo):
    # Deformable DETR: ModuleList branches (focal classifiers keep p = 0.01)
    detr = zoo.check_folder('mmdet', 'deformable_detr', static=True)
    assert detr.status == 'ok', detr.note
    assert any(p.startswith('bbox_head.cls_branches.') for p in detr.predictors)
    assert all(p.endswith('.4') for p in detr.predictors if '.reg_branches.' in p)
    assert {v for k, v in detr.priors.items() if 'cls_branches' in k} == {PRIOR}
    # mmseg MaskFormer: frozen BN refused as shipped, naming the key; works with that fix
    former = zoo.check_folder('mmseg', 'maskformer', static=True)
    assert former.status == 'fix named' and 'model.backbone.norm_eval' in former.refusal
    assert former.predictors == ['decode_head.cls_embed', 'decode_head.mask_embed.4']
    # the command line prints the coverage table of those results
    run = subprocess.run([sys.executable, str(REPO / 'tools' / 'check_zoo_coverage.py'),
                          '--folders', 'mmdet/deformable_detr', 'mmseg/maskformer', '--static'],
                         capture_output=True, text=True, env=cpu_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '| mmdet/deformable_detr |' in run.stdout
    assert 'refused as shipped (norm_eval)' in run.stdout


def test_zoo_float64_recheck_of_a_discontinuous_eval_path(zoo):
    # SOLO keeps a class score only where it equals its 2x2 local maximum exactly: float32
    # rounding of the (exact) conversion flips near-ties there, so its float32 outputs may move by
    # ~2%. The tool then redoes the check in float64, where the function is preserved.
    result = zoo.check_folder('mmdet', 'solo')
    assert result.status == 'ok', result.note
    assert result.converted == result.bn_layers > 0
    assert result.function_diff is not None and result.function_diff < 1e-4
    if result.function_diff_float32 is not None:  # the float64 check ran: rounding only
        assert result.function_diff < 1e-12 < 1e-4 < result.function_diff_float32


def test_zoo_float64_check_machinery(zoo):
    # on a model whose float32 check passes anyway, the float64 check agrees to rounding
    import copy

    from mmengine.structures import InstanceData
    from mmdet.structures import DetDataSample
    path = zoo.pick_config('mmdet', 'retinanet')
    cfg = zoo.prepare_cfg('mmdet', path, zoo.daft_backbone('mmdet'))
    model = zoo.build_model('mmdet', cfg)
    batches = [zoo.det_batch(seed, model) for seed in (1, 2)]
    state = copy.deepcopy(model.state_dict())
    assert float64_function_diff(model, state, batches) < 1e-12
    assert all(t.dtype == torch.float32 for t in model.state_dict().values()
               if t.is_floating_point())  # the model itself stays as it was
    sample = DetDataSample(gt_instances=InstanceData(bboxes=torch.zeros(2, 4),
                                                     labels=torch.zeros(2, dtype=torch.long)))
    out = _to_float64({'inputs': [torch.zeros(3)], 'data_samples': [sample]})
    assert out['inputs'][0].dtype == torch.float64
    assert out['data_samples'][0].gt_instances.bboxes.dtype == torch.float64
    assert out['data_samples'][0].gt_instances.labels.dtype == torch.long


def test_check_model_in_two_lines_and_the_stage_of_a_failure(zoo):
    """daft_mm.mm.doctor.check_model on a user's model: the zoo tool's checks without the tool;
    a failure names the stage it stopped at and keeps what was found before."""
    from daft_mm.mm.doctor import ModelCheckError, check_model
    cfg = zoo.prepare_cfg('mmseg', zoo.pick_config('mmseg', 'deeplabv3'), {})
    model = zoo.build_model('mmseg', cfg)
    batches = [zoo.seg_batch(seed, model) for seed in (1, 2)]
    check = check_model(model, batches, pretrained=['backbone'])
    assert check.stage == 'train-step' and check.converted == check.bn_layers > 0
    assert check.function_diff < 1e-4 and check.train_step.endswith('2/2 predictors got gradient')
    assert set(check.rule_converted) | set(check.rule_left_new) == set(
        n for n, m in model.named_modules() if hasattr(m, 'running_mean'))
    assert all(n.startswith('backbone.') for n in check.rule_converted) and check.rule_left_new
    frozen = zoo.build_model('mmseg', zoo.prepare_cfg('mmseg', zoo.pick_config(
        'mmseg', 'deeplabv3'), {'norm_eval': True}))
    with pytest.raises(ModelCheckError, match=r'\[bn-train\].*norm_eval') as info:
        check_model(frozen, batches)
    assert info.value.stage == 'bn-train' and info.value.check.predictors == check.predictors
