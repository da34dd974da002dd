"""Model-zoo coverage, fast subset: tools/check_zoo_coverage.py on a few representative stock
folders of the installed mmseg / mmdet (small ResNet, random batches, nothing downloaded). The full
table (every folder, ~1-2 h on 2 busy cores) is `python tools/check_zoo_coverage.py`; the README
shows it.
"""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from _mm_helpers import REPO

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')
PRIOR = round(-math.log(99), 3)


@pytest.fixture(scope='module')
def zoo():
    spec = importlib.util.spec_from_file_location('check_zoo_coverage',
                                                  REPO / 'tools' / 'check_zoo_coverage.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('folder,predictors,priors', [
    # a focal-loss dense head: stock BN frozen (norm_eval, frozen_stages=1) -> the fragment's
    # daft_backbone; retina_cls keeps its prior
    ('mmdet/retinanet', ['bbox_head.retina_cls', 'bbox_head.retina_reg'],
     {'bbox_head.retina_cls': PRIOR}),
    # DANet predicts from three layers of its head, plus the auxiliary head
    ('mmseg/danet', ['decode_head.conv_seg', 'decode_head.pam_conv_seg',
                     'decode_head.cam_conv_seg', 'auxiliary_head.conv_seg'], {}),
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
    table = zoo.table([detr, former])
    assert '| mmdet/deformable_detr |' in table and 'refused as shipped (norm_eval)' in table
