"""The stock model zoo, checked for DAFT one folder at a time (``tools/check_zoo_coverage.py`` is
the command line; ``docs/zoo_coverage.md`` its table).

For a folder of the installed mmseg / mmdet ``.mim/configs`` with a BatchNorm ResNet-family
backbone (ResNet, ResNetV1c/d, ResNeXt, ResNeSt), one config is built with a *small ResNet* (one
block per stage, same widths, so every neck and head fits unchanged), nothing downloaded, the DAFT
fragment applied (detection: ``daft_backbone``), and run through
:func:`daft_mm.mm.doctor.check_model` on two random batches (64x64 images, larger where a stock
setting needs it: ``IMG_FOR``; video models get two-frame clips, semi-supervised ones the same
images in every branch): predictors, BN train, conversion keeps the function, priors, one step.
"""
from __future__ import annotations

import contextlib
import glob
import os
import os.path as osp
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ['FolderResult', 'RESNETS', 'IMG_FOR', 'config_root', 'pick_config', 'folders',
           'small_resnet', 'daft_backbone', 'prepare_cfg', 'build_model', 'det_batch',
           'seg_batch', 'track_batch', 'semi_batch', 'check_folder', 'single_process_group']

RESNETS = ('ResNet', 'ResNetV1c', 'ResNetV1d', 'ResNeXt', 'ResNeSt')
WRAPPER_KEYS = ('detector', 'model', 'segmentor', 'module')
IMG = 64  # side of the random square images
#: models whose stock settings need larger inputs than IMG: DINO's two-stage query selection takes
#: the top 900 encoder tokens (a 64x64 image has 85); DDOD's head has a 3x3 deformable conv on
#: every level, and mmcv's kernel refuses maps smaller than the kernel (P7: stride 128)
IMG_FOR = {'mmdet/dino': 256, 'mmdet/v3det': 256, 'mmdet/ddod': 384}


@dataclass
class FolderResult:
    folder: str
    config: str = ''
    status: str = 'fail'  # ok | refused | fail | skipped
    predictors: List[str] = field(default_factory=list)
    priors: Dict[str, float] = field(default_factory=dict)  # path -> first prior value
    bn_layers: int = 0
    converted: int = 0  # by the mechanical check: every BN-like layer, function kept
    # DAFT's rule (convert what was pretrained): the stock config's pretrained modules
    pretrained: List[str] = field(default_factory=list)
    rule_converted: List[str] = field(default_factory=list)
    rule_left_new: List[str] = field(default_factory=list)
    function_diff: Optional[float] = None
    function_diff_float32: Optional[float] = None  # set where the check was redone in float64
    train_step: str = ''
    stays_frozen: List[str] = field(default_factory=list)
    note: str = ''
    refusal: str = ''  # the start-up error of the stock model (it names the fix the tool applied)
    seconds: float = 0.0


# --------------------------------------------------------------------------- config selection
def config_root(package: str) -> str:
    return osp.join(osp.dirname(__import__(package).__file__), '.mim', 'configs')


def _backbone(model: Any) -> Optional[dict]:
    if not isinstance(model, dict):
        return None
    if isinstance(model.get('backbone'), dict):
        return model['backbone']
    for key in WRAPPER_KEYS:
        found = _backbone(model.get(key))
        if found is not None:
            return found
    return None


def _is_bn_resnet(cfg: Any) -> bool:
    backbone = _backbone(cfg.get('model'))
    if not backbone or backbone.get('type', '').split('.')[-1] not in RESNETS:
        return False
    norm = (backbone.get('norm_cfg') or {}).get('type', 'BN')
    return 'BN' in norm


def pick_config(package: str, folder: str) -> Optional[str]:
    """One stock config of ``folder`` with a BN ResNet backbone: R-50 first, plain names before
    variants (caffe, dcn, multi-scale...), then the shortest name."""
    from mmengine.config import Config
    files = sorted(glob.glob(osp.join(config_root(package), folder, '*.py')))

    def rank(path: str) -> Tuple:
        name = osp.basename(path)
        return ('r50' not in name and 's50' not in name, 'caffe' in name, 'fast-rcnn' in name,
                'rpn' in name and 'faster' not in name and folder != 'rpn', len(name), name)

    for path in sorted(files, key=rank):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                cfg = Config.fromfile(path)
        except Exception:  # noqa: BLE001 - a config that does not load is not a candidate
            continue
        if _is_bn_resnet(cfg):
            return path
    return None


def folders(package: str) -> List[str]:
    root = config_root(package)
    return sorted(d for d in os.listdir(root)
                  if not d.startswith(('_', '.')) and osp.isdir(osp.join(root, d)))


# ------------------------------------------------------------------------------- model build
@contextlib.contextmanager
def small_resnet() -> Iterator[None]:
    """Every mmseg/mmdet ResNet variant built with one block per stage (stock widths)."""
    import mmdet.models.backbones as det
    import mmseg.models.backbones as seg
    classes = {cls for mod in (det, seg) for cls in vars(mod).values()
               if isinstance(cls, type) and issubclass(cls, (det.ResNet, seg.ResNet))
               and 'arch_settings' in vars(cls)
               and all(isinstance(v, tuple) and len(v) == 2 for v in vars(cls)['arch_settings']
                       .values())}  # RegNet's settings are dicts: not a block-count ResNet
    saved = {cls: cls.arch_settings for cls in classes}
    try:
        for cls in classes:
            cls.arch_settings = {depth: (block, (1, ) * len(blocks))
                                 for depth, (block, blocks) in cls.arch_settings.items()}
        yield
    finally:
        for cls, settings in saved.items():
            cls.arch_settings = settings


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _no_downloads(node: Any, path: str = '') -> List[str]:
    """Drop pretrained checkpoints anywhere in a model config (nothing can be downloaded); returns
    the module paths that would have loaded them (``model.pretrained`` is the backbone's), the
    modules whose BN layers DAFT converts under its rule."""
    found: List[str] = []
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            if key == 'teacher_ckpt':
                node[key] = None
            elif key == 'pretrained':
                if value:
                    found.append(f'{path}backbone' if 'backbone' in node else path.rstrip('.'))
                node[key] = None
            elif key == 'init_cfg' and 'Pretrained' in str(value):
                found.append(path.rstrip('.'))
                node[key] = None
            else:
                found += _no_downloads(value, f'{path}{key}.')
    elif isinstance(node, list):
        for item in node:
            found += _no_downloads(item, path)
    return found


def daft_backbone(package: str) -> dict:
    """What the DAFT fragment of the task asks of the backbone (empty for segmentation)."""
    if package != 'mmdet':
        return {}
    from mmengine.config import Config
    fragment = Config.fromfile(osp.join(osp.dirname(osp.dirname(__file__)), 'configs', '_base_',
                                        'daft_detection.py'))
    return fragment.daft_backbone.to_dict()


def prepare_cfg(package: str, path: str, backbone_fix: dict) -> Any:
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    model = cfg.model
    cfg.daft_zoo_pretrained = [p for p in dict.fromkeys(_no_downloads(model)) if p]
    backbone = _backbone(model)
    backbone.merge_from_dict(backbone_fix) if hasattr(backbone, 'merge_from_dict') else \
        backbone.update(backbone_fix)
    prep = model.get('data_preprocessor')
    if isinstance(prep, dict):
        prep.pop('batch_augments', None)  # fixed-size padding to 1024x1024 (LSJ): not needed
        if package == 'mmseg':
            prep['size'] = (IMG, IMG)
    if package == 'mmseg' and isinstance(model.get('test_cfg'), dict):
        model.test_cfg = dict(mode='whole')
    return cfg


def build_model(package: str, cfg: Any) -> torch.nn.Module:
    from mmengine.registry import init_default_scope
    init_default_scope(package)
    from mmengine.registry import MODELS
    # distillation configs name their teacher config relative to the package's config root
    with small_resnet(), warnings.catch_warnings(), _cwd(osp.dirname(config_root(package))):
        warnings.simplefilter('ignore')
        model = MODELS.build(cfg.model)
        torch.manual_seed(0)
        model._dump_init_info = lambda *args, **kwargs: None  # the per-parameter init log
        model.init_weights()
    return model


# ------------------------------------------------------------------------------------ batches
def _num_classes(model: torch.nn.Module) -> int:
    counts = [getattr(m, 'num_classes') for m in model.modules()
              if isinstance(getattr(m, 'num_classes', None), int)]
    return max(1, min(counts)) if counts else 1


def det_batch(seed: int, model: torch.nn.Module, size: int = IMG) -> dict:
    from mmdet.testing import demo_mm_inputs, demo_mm_proposals
    torch.manual_seed(seed)
    data = demo_mm_inputs(batch_size=2, image_shapes=[(3, size, size)] * 2, num_items=[3, 2],
                          num_classes=2, with_mask=True, with_semantic=True)
    for sample in data['data_samples']:
        sample.gt_instances.labels[:] = seed % _num_classes(model)
        sample.set_metainfo(dict(scale_factor=(1.0, 1.0)))
    proposals = demo_mm_proposals([(3, size, size)] * 2, 100)
    for sample, props in zip(data['data_samples'], proposals):
        sample.proposals = props
    data['inputs'] = [
        torch.randint(0, 256, (3, size, size), generator=torch.Generator().manual_seed(seed + i),
                      dtype=torch.uint8) for i in range(2)]
    return data


def _is_video(model: torch.nn.Module) -> bool:
    return type(getattr(model, 'data_preprocessor', None)).__name__ == 'TrackDataPreprocessor'


def track_batch(seed: int, model: torch.nn.Module, size: int = IMG) -> dict:
    """Video models (MOT, VIS): two clips of a key frame and a reference frame."""
    from mmdet.testing import demo_track_inputs
    data = demo_track_inputs(batch_size=2, num_frames=2, key_frames_inds=[0],
                             image_shapes=(3, size, size), num_items=[3, 2], num_classes=1,
                             with_mask=True)
    g = torch.Generator().manual_seed(seed)
    data['inputs'] = [torch.randint(0, 256, clip.shape, generator=g, dtype=torch.uint8)
                      for clip in data['inputs']]
    for clip in data['data_samples']:
        for sample in clip.video_data_samples:
            sample.gt_instances.labels[:] = seed % _num_classes(model)
    return data


def _is_semi(model: torch.nn.Module) -> bool:
    return type(getattr(model, 'data_preprocessor', None)).__name__ == \
        'MultiBranchDataPreprocessor'


def semi_batch(seed: int, model: torch.nn.Module, size: int = IMG) -> dict:
    """Semi-supervised detectors (Soft Teacher): the same images in the supervised, teacher and
    student branches (identity homography between the two views)."""
    import copy

    import numpy as np
    data = det_batch(seed, model, size)
    for sample in data['data_samples']:
        sample.set_metainfo(dict(homography_matrix=np.eye(3, dtype=np.float32)))
    branches = ('sup', 'unsup_teacher', 'unsup_student')
    return dict(inputs={b: [t.clone() for t in data['inputs']] for b in branches},
                data_samples={b: copy.deepcopy(data['data_samples']) for b in branches})


def seg_batch(seed: int, model: torch.nn.Module, size: int = IMG) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    g = torch.Generator().manual_seed(seed)
    num_classes = _num_classes(model)
    samples = []
    for _ in range(2):
        sample = SegDataSample()
        sample.set_metainfo(dict(img_shape=(IMG, IMG), ori_shape=(IMG, IMG),
                                 pad_shape=(IMG, IMG), scale_factor=(1.0, 1.0), flip=False))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, num_classes, (1, IMG, IMG), generator=g))
        samples.append(sample)
    inputs = [torch.randint(0, 256, (3, IMG, IMG), generator=g, dtype=torch.uint8)
              for _ in range(2)]
    return dict(inputs=inputs, data_samples=samples)


def check_folder(package: str, folder: str, train_step: bool = True,
                 static: bool = False) -> FolderResult:
    """All checks of one folder (:func:`daft_mm.mm.doctor.check_model` on its model and two
    random batches); ``static``: predictors, BN train and priors only (no forward)."""
    from mmengine.logging import MessageHub

    from daft_mm.mm.doctor import ModelCheckError, check_model
    start = time.time()
    # what the Runner's RuntimeInfoHook provides before training (BoxInst's loss reads the
    # iteration, TOOD's the epoch)
    MessageHub.get_current_instance().update_info('iter', 0)
    MessageHub.get_current_instance().update_info('epoch', 0)
    result = FolderResult(folder=f'{package}/{folder}')
    path = pick_config(package, folder)
    if path is None:
        result.status, result.note = 'skipped', 'no config with a BatchNorm ResNet backbone'
        return result
    result.config = osp.basename(path)
    stage = 'build'
    try:
        cfg = prepare_cfg(package, path, daft_backbone(package))
        model = build_model(package, cfg)
        make_batch = seg_batch if package == 'mmseg' else (
            track_batch if _is_video(model) else semi_batch if _is_semi(model) else det_batch)
        size = IMG_FOR.get(result.folder, IMG)
        batches = [make_batch(seed, model, size) for seed in (1, 2)]
        options = dict(pretrained=cfg.daft_zoo_pretrained, train_step=train_step, static=static)
        try:
            check = check_model(model, batches, **options)
        except ModelCheckError as exc:
            if exc.stage != 'bn-train' or not isinstance(exc.cause, ValueError):
                raise
            # refused with the fix named; apply that fix (daft_backbone) and check the rest
            result.refusal = f'{exc.cause}'.replace('\n', ' ')
            model = build_model(package, prepare_cfg(package, path, daft_backbone('mmdet')))
            check = check_model(model, [make_batch(seed, model, size) for seed in (1, 2)],
                                **options)
        _copy(check, result)
        result.status = 'fix named' if result.refusal else 'ok'
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        cause = exc
        if isinstance(exc, ModelCheckError):
            stage, cause = exc.stage, exc.cause
            _copy(exc.check, result)
        message = f'{type(cause).__name__}: {cause}'.replace('\n', ' ')
        result.status = 'refused' if stage in ('predictors', 'bn-train') and isinstance(
            cause, (ValueError, TypeError)) else 'fail'
        if 'implementation for device cpu not found' in message:
            result.status = 'needs GPU'  # an mmcv op without a CPU kernel: checked up to here
        elif any(k in message for k in ('mim install', 'pip install', 'urlopen error',
                                        'No module named')):
            # an optional package (or a download) missing: at build time nothing is checked;
            # later (PAA's loss needs sklearn) everything up to that stage was
            result.status = 'not buildable here' if stage == 'build' else 'needs package'
        result.note = f'[{stage}] {message[:400]}'
        if os.environ.get('DAFT_ZOO_TRACEBACK'):
            traceback.print_exc()
    result.seconds = round(time.time() - start, 1)
    return result


def _copy(check: Any, result: FolderResult) -> None:
    for name, value in asdict(check).items():
        if hasattr(result, name) and name != 'stage':
            setattr(result, name, value)


def single_process_group() -> None:
    """mmcv's MMSyncBN cannot even be built without a process group; one of size 1 suffices for
    the eval-mode conversion pass (the training step reverts it to BN, as the Runner does)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group('gloo', store=store, rank=0, world_size=1)
