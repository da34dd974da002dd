"""tools/compare.py on mmdet configs: the same comparison as segmentation, scored with mmdet's own
metric. End to end in its seconds-long mode for a RetinaNet and a Faster R-CNN on the committed
real CamVid sample, with boxes derived from its label maps; LP leaves the pretrained backbone bit
for bit; the metric scores each set against its own annotations; the image-blind box floor; and
the refusal of a backbone without BN."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _mm_helpers import CONFIGS, REPO, cpu_env

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')

RETINANET = CONFIGS / 'camvid' / 'compare_camvid_boxes_day_dusk.py'
FASTER_RCNN = CONFIGS / 'camvid' / 'compare_camvid_boxes_day_dusk_faster-rcnn.py'
ROWS = ('FT', 'LP', 'LP-FT', 'DAFT', 'DAFT w/o conversion', 'conversion only')


def _compare(python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, str(REPO / 'tools' / 'compare.py'), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=cpu_env())


@pytest.fixture(scope='module')
def boxes_root(camvid_root) -> Path:
    """The CamVid sample's day/dusk lists with their boxes (COCO json) beside them."""
    from daft_mm.mm.datasets.camvid_boxes import write_box_annotations
    write_box_annotations(camvid_root)
    return camvid_root


# ------------------------------------------------------------------------------ the boxes
def test_boxes_are_the_connected_regions_of_the_countable_classes():
    from daft_mm.mm.datasets.camvid_boxes import label_boxes
    label = np.full((360, 480), 3, np.uint8)  # road
    label[10:30, 20:60] = 8  # a car, 800 px
    label[10:30, 70:90] = 8  # another car beside it: a separate region, a separate box
    label[100:102, 100:104] = 8  # 8 px: a fragment, dropped
    label[200:240, 300:310] = 9  # a pedestrian
    boxes = label_boxes(label, min_area=64)
    assert [(b['category'], b['bbox'], b['area']) for b in boxes] == [
        (0, [20.0, 10.0, 40.0, 20.0], 800.0), (0, [70.0, 10.0, 20.0, 20.0], 400.0),
        (1, [300.0, 200.0, 10.0, 40.0], 400.0)]
    # the minimum area is counted at 360x480: a quarter-size map keeps the same regions
    small = label[::4, ::4]
    assert [b['category'] for b in label_boxes(small, min_area=64)] == [0, 0, 1]


def test_box_files_need_the_split_lists(tmp_path):
    from daft_mm.mm.datasets.camvid_boxes import write_box_annotations
    with pytest.raises(FileNotFoundError, match='camvid_splits'):
        write_box_annotations(tmp_path)


def test_box_files_follow_the_split_lists(boxes_root):
    for split in ('id_train', 'id_val', 'id_test', 'ood_dusk'):
        coco = json.loads((boxes_root / 'daft_splits' / f'boxes_{split}.json').read_text())
        listed = (boxes_root / 'daft_splits' / f'{split}.txt').read_text().split()[::2]
        assert [im['file_name'] for im in coco['images']] == listed
        assert [c['name'] for c in coco['categories']] == ['Car', 'Pedestrian', 'Bicyclist']
    dusk = json.loads((boxes_root / 'daft_splits' / 'boxes_ood_dusk.json').read_text())
    assert dusk['annotations'] and 'derived from CamVid semantic label maps' in \
        dusk['info']['description']


# ------------------------------------------------------------------------------ the metric
def _batches(config: Path, root: Path, ann_file: str):
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from daft_mm.benchmark.task import task_from_config
    import daft_mm.mm  # noqa: F401
    init_default_scope('mmdet')
    task = task_from_config(str(config), options={'data_root': str(root)})
    dataset = dict(task.id_test, ann_file=ann_file)
    loader = Runner.build_dataloader(dict(batch_size=2, num_workers=0, dataset=dataset,
                                          sampler=dict(type='DefaultSampler', shuffle=False)))
    return task, dataset, list(loader), dict(loader.dataset.metainfo)


class _Oracle:
    """Predicts each image's ground-truth boxes, moved by ``shift`` pixels (the test pipeline
    loads them after its Resize: they are in the original image's pixels, as predictions are)."""

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift

    def eval(self) -> None:
        pass

    def test_step(self, batch):
        import torch
        from mmengine.structures import InstanceData
        out = []
        for sample in batch['data_samples']:
            gt = sample.gt_instances
            boxes = getattr(gt.bboxes, "tensor", gt.bboxes)  # mmdet box type or tensor
            pred = InstanceData(bboxes=boxes + self.shift,
                                scores=torch.ones(len(gt)), labels=gt.labels)
            sample.pred_instances = pred
            out.append(sample)
        return out


def test_detection_score_reads_each_sets_own_annotations(boxes_root):
    """Perfect boxes score 100 on the dusk set, when the metric reads the dusk annotation
    file (the config names the ID test set's); shifted boxes score less."""
    from daft_mm.benchmark.scoring import score
    task, dataset, batches, meta = _batches(RETINANET, boxes_root,
                                            'daft_splits/boxes_ood_dusk.json')
    from daft_mm.mm.cli import load_config
    evaluator = load_config(str(RETINANET), {'data_root': str(boxes_root)},
                            work_dir='unused').test_evaluator
    assert evaluator['ann_file'].endswith('boxes_id_test.json')
    perfect, counts, extra = score(_Oracle(), batches, meta, kind='det',
                                   evaluator_cfg=evaluator, dataset=dataset)
    assert perfect == pytest.approx(100.0) and counts is None and extra == {}
    shifted, _, _ = score(_Oracle(shift=3.0), batches, meta, kind='det',
                          evaluator_cfg=evaluator, dataset=dataset)
    assert 0.0 <= shifted < 90.0


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize('config', [RETINANET, FASTER_RCNN], ids=['retinanet', 'faster-rcnn'])
def test_detection_comparison_end_to_end(config, boxes_root, python, tmp_path):
    work = tmp_path / 'work'
    proc = _compare(python, config, '--quick', '--search', '--work-dir', work,
                    '--cfg-options', f'data_root={boxes_root}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((work / 'report.json').read_text())
    assert report['task']['kind'] == 'det' and report['score'] == 'bbox mAP'
    # the image-blind floor (the training set's typical boxes on every image): a row, unpaired
    assert tuple(report['methods']) == ROWS + ('image-blind prior', )
    assert report['floor']['method'] == 'image-blind prior' and 'image-blind prior' not in \
        report['paired_to_ft']
    assert 0.0 <= report['floor']['ood']['dusk'] < 100.0
    assert report['ood_sets'] == ['dusk', 'gaussian_noise-3', 'motion_blur-3', 'fog-3']
    # the task's lr_scale (1/16) on the grids: the quick grids' FT 0.1, LP 0.3, DAFT 0.01
    assert report['task']['lr_scale'] == 0.0625
    assert {m: report['chosen'][m]['lr'] for m in ('FT', 'LP', 'DAFT')} == {
        'FT': 0.00625, 'LP': 0.01875, 'DAFT': 0.000625}
    assert report['headline'] == 'dusk' and report['task']['classes'] == [
        'Car', 'Pedestrian', 'Bicyclist']
    assert report['task']['ood']['dusk']['ann_file'] == 'daft_splits/boxes_ood_dusk.json'
    for name, runs in report['runs'].items():
        for r in runs:
            assert sum(r['budgets'].values()) == 4, name
            assert 0.0 <= r['id'] <= 100.0 and 'counts' not in r
    # the provenance counts a COCO file's images and boxes (not its lines)
    for key, split in (('id_train', 'id_train'), ('ood/dusk', 'ood_dusk')):
        coco = json.loads((boxes_root / 'daft_splits' / f'boxes_{split}.json').read_text())
        record = report['provenance']['sets'][key]
        assert (record['images'], record['boxes']) == (
            len(coco['images']), len(coco['annotations'])) and record['images'] > 1, key
    # a mAP is not a sum over images: no per-class IoU, no bootstrap over frames
    assert report['per_class'] is None and report['bootstrap_to_ft'] is None
    # LP: the backbone is frozen, so its features are the pretrained ones
    assert report['methods']['LP']['cosine_similarity']['mean'] == pytest.approx(1.0, abs=1e-6)
    assert 'neck and heads' in report['methods_described']['LP']
    assert 'a fresh neck and heads' in report['premise']
    md = (work / 'report.md').read_text()
    assert '| ID-val bbox mAP | ID bbox mAP |' in md and 'CocoMetric' in md


def test_lp_leaves_the_detectors_backbone_bit_identical(boxes_root, tmp_path, one_torch_thread):
    """LP trains the neck and heads on a frozen backbone: its weights and its BN statistics
    (running mean / variance, batches tracked) are the pretrained checkpoint's, bit for bit."""
    import torch
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401
    from daft_mm.benchmark.methods import Point, get_method
    from daft_mm.benchmark.runs import Context, train
    from daft_mm.benchmark.task import task_from_config
    from daft_mm.mm.plan import split_model
    init_default_scope('mmdet')
    task = task_from_config(str(FASTER_RCNN), options={'data_root': str(boxes_root)},
                            max_images=4, budget=3)
    ctx = Context(task=task, work_dir=tmp_path, step=lambda _: None)
    model, _ = train(ctx, get_method('LP'), Point(lr=0.3), tmp_path / 'lp', iters=3, seed=0,
                     stage='lp')
    detector = split_model(model)[1]
    saved = torch.load(task.backbone, map_location='cpu', weights_only=False)
    saved = saved.get('state_dict', saved)
    state = detector.backbone.state_dict()
    assert state and all(torch.equal(v, saved[f'backbone.{k}']) for k, v in state.items()
                         if f'backbone.{k}' in saved)
    assert any(k.endswith('running_var') for k in state)
    assert all(f'backbone.{k}' in saved for k in state)
    # and it did train: SGD kept momentum for the parameters that learned (neck, RPN, RoI head)
    ckpt = torch.load(tmp_path / 'lp' / 'iter_3.pth', map_location='cpu', weights_only=False)
    assert len(ckpt['optimizer']['state']) > 0


def test_a_detector_without_batchnorm_is_refused(boxes_root, python, tmp_path):
    proc = _compare(python, RETINANET, '--quick', '--search', '--work-dir', tmp_path / 'w',
                    '--cfg-options', f'data_root={boxes_root}', 'model.backbone.norm_cfg.type=GN',
                    'model.backbone.norm_cfg.num_groups=4')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
    assert 'has no BatchNorm layer' in proc.stderr and 'GroupNorm' in proc.stderr
    assert 'nothing to convert' in proc.stderr and not (tmp_path / 'w' / 'runs').exists()


# ------------------------------------------------------------------------------ the floor
def test_the_box_floor_is_each_classes_typical_boxes_scored_by_frequency():
    from daft_mm.benchmark.prior import box_prior
    rng = np.random.default_rng(0)
    near = lambda c, n: np.asarray(c) + rng.normal(0, 0.005, (n, 4))  # noqa: E731
    boxes = np.concatenate([near((0.1, 0.5, 0.2, 0.7), 20), near((0.6, 0.4, 0.9, 0.9), 10),
                            near((0.4, 0.3, 0.5, 0.6), 10)])
    labels = np.array([0] * 30 + [1] * 10)
    prior = box_prior(boxes, labels, images=50, total=3)  # shares 2.25 and 0.75: 2 boxes and 1
    assert prior.labels.tolist() == [0, 0, 1]
    first = np.argmax(prior.scores[:2])  # the group of 20 is the more frequent box
    assert np.allclose(prior.boxes[first], (0.1, 0.5, 0.2, 0.7), atol=0.01)
    assert sorted(prior.scores[:2].tolist()) == [10 / 50, 20 / 50] and prior.scores[2] == 10 / 50
    # never more boxes than a class has distinct ones; every class present gets one
    same = box_prior(np.tile([[0.1, 0.1, 0.3, 0.3]], (5, 1)), np.zeros(5, int), images=5)
    assert len(same.boxes) == 1 and same.scores.tolist() == [1.0]
    rare = box_prior(boxes, np.array([0] * 39 + [1]), images=50, total=4)
    assert (rare.labels == 1).sum() == 1 and len(rare.boxes) == 4
    with pytest.raises(ValueError, match='no box'):
        box_prior(np.zeros((0, 4)), np.zeros(0, int), images=3)


def test_the_box_floor_ignores_the_image(boxes_root):
    """Every image gets the same boxes, in its own pixels; on the real sample it scores far below
    perfect boxes (the metric reads the set's own annotations, as for a model)."""
    from daft_mm.benchmark.prior import BoxPrior, ImageBlindDetector, _training_boxes, box_prior
    from daft_mm.benchmark.scoring import score
    task, dataset, batches, meta = _batches(RETINANET, boxes_root,
                                            'daft_splits/boxes_id_test.json')
    from daft_mm.mm.cli import load_config
    cfg = load_config(str(RETINANET), {'data_root': str(boxes_root)}, work_dir='unused')
    boxes, labels, images = _training_boxes(cfg.train_dataloader.dataset)
    coco = json.loads((boxes_root / 'daft_splits' / 'boxes_id_train.json').read_text())
    assert (len(boxes), images) == (len(coco['annotations']), len(coco['images']))
    assert boxes.min() >= 0 and boxes.max() <= 1  # image fractions
    prior = box_prior(boxes, labels, images)
    assert len(prior.boxes) <= 100 and set(prior.labels.tolist()) == set(labels.tolist())
    model = ImageBlindDetector(prior)
    blind = score(model, batches, meta, kind='det', evaluator_cfg=cfg.test_evaluator,
                  dataset=dataset)[0]
    perfect = score(_Oracle(), batches, meta, kind='det', evaluator_cfg=cfg.test_evaluator,
                    dataset=dataset)[0]
    assert 0.0 <= blind < 10.0 < perfect
    one = ImageBlindDetector(BoxPrior(np.array([[0.25, 0.5, 0.5, 1.0]]), np.array([1]),
                                      np.array([0.5])))
    out = one.test_step(batches[0])
    for sample in out:
        h, w = sample.metainfo['ori_shape'][:2]
        assert sample.pred_instances.bboxes.tolist() == [[w / 4, h / 2, w / 2, h]]


def test_daft_rows_train_bn_and_the_others_keep_the_users_backbone(boxes_root):
    """A stock mmdet backbone freezes BN (norm_eval, frozen stage, frozen affine weights), which
    DAFT cannot use: the DAFT rows get the fragment's trainable BN, FT and LP keep the user's."""
    from daft_mm.benchmark.methods import Point, get_method
    from daft_mm.benchmark.variants import method_config
    from daft_mm.mm.cli import load_config
    stock = {'data_root': str(boxes_root), 'model.backbone.norm_eval': True,
             'model.backbone.frozen_stages': 1, 'model.backbone.norm_cfg.requires_grad': False,
             'model.backbone.norm_cfg.eps': 0.0}  # NAS-FCOS's: train-mode BN needs eps > 0

    def backbone_of(method: str) -> dict:
        cfg = load_config(str(FASTER_RCNN), stock, work_dir='unused')
        method_config(cfg, get_method(method), Point(lr=0.01, ratio=10.0), backbone='b.pth')
        return cfg.model.model.backbone

    for daft in ('DAFT', 'DAFT w/o conversion', 'conversion only'):
        b = backbone_of(daft)
        assert (b.norm_eval, b.frozen_stages, b.norm_cfg.requires_grad) == (False, -1, True)
        assert (b.norm_cfg.type, b.norm_cfg.eps) == ('BN', 1e-5)  # the user's type kept
        assert b.init_cfg == dict(type='Pretrained', checkpoint='b.pth', prefix='backbone.')
    for kept in ('FT', 'LP'):
        b = backbone_of(kept)
        assert (b.norm_eval, b.frozen_stages, b.norm_cfg.requires_grad) == (True, 1, False)
        assert b.norm_cfg.eps == 0.0


def test_daft_trains_from_a_config_that_freezes_bn(boxes_root, tmp_path, one_torch_thread):
    """The derived DAFT run of a stock-style config (BN frozen) starts and trains: DAFTHook would
    refuse a frozen BN, so this fails if the DAFT rows kept the user's backbone settings."""
    from mmengine.registry import init_default_scope
    import daft_mm.mm  # noqa: F401
    from daft_mm.benchmark.methods import Point, get_method
    from daft_mm.benchmark.runs import Context, train
    from daft_mm.benchmark.task import task_from_config
    init_default_scope('mmdet')
    stock = {'data_root': str(boxes_root), 'model.backbone.norm_eval': True,
             'model.backbone.frozen_stages': 1, 'model.backbone.norm_cfg.requires_grad': False}
    task = task_from_config(str(RETINANET), options=stock, max_images=4, budget=2)
    ctx = Context(task=task, work_dir=tmp_path, step=lambda _: None)
    model, ckpt = train(ctx, get_method('DAFT'), Point(lr=0.01, ratio=10.0), tmp_path / 'daft',
                        iters=2, seed=0)
    bn = next(m for m in model.modules() if type(m).__name__ == 'BatchNorm2d')
    assert bn.weight.requires_grad and Path(ckpt).is_file()
