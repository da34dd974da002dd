"""The comparison's task as data: what to train on, what to choose on, what to test on.

One :class:`TaskSpec` describes a comparison completely: a fine-tuning config (its model, training
set, pipelines and schedule; every method's config is derived from it), the ID-val set every
choice is made on, the ID test set, named OOD sets and corruptions of the ID test images, the
pretrained backbone, the iteration budget and the seeds. The embedded demo, CamVid day -> dusk
and a user's own config are three specifications run by the same code
(:func:`daft_mm.benchmark.experiment.run_comparison`).

A specification can live in the config itself, as a ``compare`` dict (see
``configs/camvid/compare_camvid_day_dusk.py``); ``tools/compare.py`` flags override it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import os.path as osp
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .data import file_hash, source_commit, source_repository, stable_hash

__all__ = ['InputError', 'TaskSpec', 'task_from_config', 'dataset_of', 'plain', 'provenance',
           'limit_images', 'check_data']


class InputError(ValueError):
    """Something the user gave does not work (a set's folder, the backbone's key prefix, a
    recorded-choices file). Raised before anything trains; ``tools/compare.py`` prints it as a
    usage error, without a traceback."""


Corruption = Tuple[str, int]


@dataclass
class TaskSpec:
    """Everything a comparison depends on (the run cache keys on all of it)."""

    name: str
    config: str  # the fine-tuning config (FT); every method's config is derived from it
    backbone: str  # the pretrained backbone checkpoint every method starts from
    id_val: Dict[str, Any]  # dataset config: every choice of a setting is made on it, only
    id_test: Dict[str, Any]  # dataset config: ID test
    ood: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> dataset config
    corruptions: Tuple[Corruption, ...] = ()  # of the ID test images, each an OOD set
    backbone_prefix: str = 'backbone.'  # the backbone's key prefix in the checkpoint
    options: Dict[str, Any] = field(default_factory=dict)  # --cfg-options of every run
    budget: int = 300  # training iterations of every method (LP-FT: both stages together)
    lp_fraction: float = 0.5  # LP-FT's probe stage share of the budget
    batch_size: Optional[int] = None  # None: the config's
    seeds: Tuple[int, ...] = (0, 1, 2)
    eval_batch_size: int = 8
    spaces: str = 'default'  # the search grids: 'default' or 'quick'
    max_images: Optional[int] = None  # --quick: the first N images of every set, training too
    description: str = ''  # one line for the report: what the task is
    #: rows beyond FT, LP, LP-FT, DAFT and its two ablations (methods.BASELINES, AT_DAFT)
    methods: Tuple[str, ...] = ()
    #: the OOD set the verdict is about (a real shift, reported per class with a bootstrap over
    #: its images); None: the mean over the OOD sets
    headline: Optional[str] = None
    #: add the image-blind floor as a table row (:mod:`daft_mm.benchmark.prior`: each pixel's most
    #: frequent training class; a detector's, the training set's typical boxes on every image)
    floor: bool = False
    #: only these rows (``tools/compare.py --rows``): e.g. FT and DAFT at recorded choices on a
    #: second backbone
    only: Tuple[str, ...] = ()
    #: 'seg' or 'det' (``daft_mm.mm.cli.detect_task`` of the config): the metric and the scope
    kind: str = 'seg'
    #: every LR of the search grids times this. The grids were set on the segmentation tasks
    #: (SGD, poly schedule, FT 0.01 .. 2.56); detectors train at 0.01 .. 0.02 (mmdet), below
    #: all but the grids' lowest points
    lr_scale: float = 1.0
    #: a method's starting grid, axis by axis (``dict(DAFT=dict(lr=(4e-5, 4e-4, 4e-3)))``):
    #: these values replace the default ones, as given (``lr_scale`` does not multiply them).
    #: For a task where a method's default grid sits mostly where training fails (a detector's
    #: new heads diverge above some LR); the widening steps stay the default grid's
    grids: Dict[str, Dict[str, Tuple[Any, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.budget < 2:
            raise ValueError(f'{self.name}: the iteration budget must be >= 2 (LP-FT has two '
                             f'stages), got {self.budget}')
        if not self.ood and not self.corruptions:
            raise ValueError(f'{self.name}: no OOD set: give at least one (--ood NAME=CONFIG) or '
                             'a corruption (--corruptions gaussian_noise:3)')
        if self.spaces not in ('default', 'quick'):
            raise ValueError(f'{self.name}: spaces must be "default" or "quick", got '
                             f'{self.spaces!r}')
        if self.kind not in ('seg', 'det'):
            raise ValueError(f'{self.name}: kind must be "seg" or "det", got {self.kind!r}')
        if not self.lr_scale > 0:
            raise ValueError(f'{self.name}: lr_scale must be > 0, got {self.lr_scale!r}')
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f'{self.name}: max_images must be >= 1, got {self.max_images}')
        self.corruptions = tuple((str(c), int(s)) for c, s in self.corruptions)
        self.seeds = tuple(int(s) for s in self.seeds)
        from .methods import method_name
        try:
            self.methods = tuple(method_name(m) for m in self.methods)
            self.only = tuple(method_name(m) for m in self.only)
        except KeyError as err:
            raise ValueError(f'{self.name}: methods: {err.args[0]}') from None
        try:
            self.grids = {method_name(m): {str(a): tuple(v) if isinstance(v, (list, tuple))
                                           else (v, ) for a, v in axes.items()}
                          for m, axes in (self.grids or {}).items()}
        except KeyError as err:
            raise ValueError(f'{self.name}: grids: {err.args[0]}') from None
        except (AttributeError, TypeError):
            raise ValueError(f'{self.name}: grids must map a method to its axes, each a list of '
                             f'values, e.g. dict(DAFT=dict(lr=(4e-5, 4e-4, 4e-3))); got '
                             f'{self.grids!r}') from None
        for m, axes in self.grids.items():
            for a, values in axes.items():
                if not values:
                    raise ValueError(f'{self.name}: grids: {m} {a} has no values')
        if self.headline is not None and self.headline not in self.ood_names:
            raise ValueError(f'{self.name}: headline {self.headline!r} is not an OOD set of the '
                             f'task ({self.ood_names})')

    @property
    def ood_names(self) -> list:
        return list(self.ood) + [f'{c}-{s}' for c, s in self.corruptions]

    def key(self) -> str:
        """A hash of the task: the resolved config (with its options), the evaluation sets and
        the schedule. The data files themselves are not hashed: new data needs a new work dir."""
        from daft_mm.mm.cli import load_config
        cfg = load_config(self.config, self.options, work_dir='unused')
        spec = asdict(self)
        spec.pop('seeds')  # each run has its own seed in its key
        spec.pop('description')
        spec.pop('methods')  # another row leaves every run of the others as it was
        spec.pop('headline')
        spec.pop('floor')
        spec.pop('only')
        spec.pop('kind')  # the config's own (hashed below): keys stay those of older reports
        spec.pop('lr_scale')  # each run's key holds its own LR: a run two grids share is reused
        spec.pop('grids')  # (the same)
        # the checkpoint's bytes, not where it lies: a checkout elsewhere (another machine, a
        # worktree) reuses the runs its trials were carried with
        spec['backbone'] = file_hash(Path(self.backbone))
        # the config less its compare dict: that dict is the fields above, where some are left
        # out on purpose (with it hashed, a config's lr_scale or grids would key every run)
        spec['config'] = {k: v for k, v in cfg.to_dict().items() if k != 'compare'}
        return stable_hash(spec)


#: what a ``compare`` dict may hold (the fields a user sets; config and id_test are the config's)
_SPEC_KEYS = frozenset({'name', 'description', 'backbone', 'backbone_prefix', 'id_val', 'ood',
                        'corruptions', 'options', 'budget', 'lp_fraction', 'batch_size',
                        'seeds', 'eval_batch_size', 'spaces', 'max_images', 'methods',
                        'headline', 'floor', 'only', 'lr_scale', 'grids'})
# (``kind`` is not among them: it is the config's, from its default scope)


def dataset_of(config: str, options: Mapping[str, Any], loader: str = 'test_dataloader'
               ) -> Dict[str, Any]:
    """The dataset config of ``loader`` in a config file (loaded as the tools load it)."""
    from daft_mm.mm.cli import load_config
    cfg = load_config(config, {k: v for k, v in options.items() if k == 'data_root'},
                      work_dir='unused')
    if not cfg.get(loader) or not cfg[loader].get('dataset'):
        raise ValueError(f'{config} has no {loader}.dataset to take a dataset from')
    return plain(cfg[loader]['dataset'])


def plain(value: Any) -> Dict[str, Any]:
    """A deep, plain-dict copy of a (Config)dict: picklable and hashable as JSON."""
    return copy.deepcopy(value.to_dict() if hasattr(value, 'to_dict') else dict(value))


def _dataset(value: Any, options: Mapping[str, Any], base_dir: str, what: str,
             test: Mapping[str, Any]) -> Dict[str, Any]:
    """A dataset config given as a config file (its test set), a whole dataset config (a dict
    with ``type``), or changes to the ID test set (a dict without ``type``: often another
    list or folder of the same dataset, read with the same pipeline)."""
    if isinstance(value, Mapping):
        if 'type' in value:
            return plain(value)
        from mmengine.config import Config
        merged = Config(dict(dataset=plain(test)))
        merged.merge_from_dict({f'dataset.{k}': v for k, v in plain(value).items()})
        return plain(merged.dataset)
    if isinstance(value, str):
        path = value if osp.isfile(value) else osp.join(base_dir, value)
        if not osp.isfile(path):
            raise FileNotFoundError(f'{what}: config {value!r} not found (relative paths are '
                                    f'tried from the current folder and from {base_dir})')
        return dataset_of(path, options)
    raise TypeError(f'{what}: give a dataset config (dict) or a config file whose '
                    f'test_dataloader.dataset is the set, not {type(value).__name__}')


def task_from_config(config: str, *, backbone: Optional[str] = None,
                     id_val: Any = None, ood: Optional[Mapping[str, Any]] = None,
                     corruptions: Optional[Sequence[Corruption]] = None,
                     options: Optional[Mapping[str, Any]] = None, **overrides: Any) -> TaskSpec:
    """The task of a fine-tuning config: its ``compare`` dict (if any), then these arguments.

    ID train is the config's training set and ID test its test set. ID-val is ``id_val``, else
    the config's validation set, which must then differ from its test set: choosing a setting
    on the test images would make the test score a selection score.
    """
    from daft_mm.mm.cli import load_config
    options = dict(options or {})
    cfg = load_config(config, options, work_dir='unused')
    spec: Dict[str, Any] = dict(cfg.get('compare') or {})
    base_dir = osp.dirname(osp.abspath(config))
    if backbone is not None:
        spec['backbone'] = backbone
    if id_val is not None:
        spec['id_val'] = id_val
    if ood:
        spec['ood'] = dict(ood)
        if spec.get('headline') not in spec['ood']:  # the config's headline set was replaced
            spec.pop('headline', None)
    if corruptions is not None:
        spec['corruptions'] = tuple(corruptions)
    spec.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f'{config}: unknown compare key(s) {unknown}; the keys are '
                         f'{sorted(_SPEC_KEYS)}')
    spec_options = dict(spec.pop('options', {}) or {})
    spec_options.update(options)
    if spec_options != options:  # the specification's own options change the config too
        cfg = load_config(config, spec_options, work_dir='unused')
    if not spec.get('backbone'):
        raise ValueError(f'{config}: no pretrained backbone: pass --backbone CKPT (or set '
                         "compare = dict(backbone=...) in the config); every method starts "
                         'from it')
    backbone_path = spec['backbone']
    if not osp.isfile(backbone_path) and osp.isfile(osp.join(base_dir, backbone_path)):
        backbone_path = osp.join(base_dir, backbone_path)
    if not osp.isfile(backbone_path):
        raise FileNotFoundError(f'the pretrained backbone {spec["backbone"]!r} does not exist')
    spec['backbone'] = osp.abspath(backbone_path)
    test = plain(cfg.test_dataloader.dataset)
    if spec.get('id_val') is None:
        val = cfg.get('val_dataloader') and cfg.val_dataloader.get('dataset')
        if not val:
            raise ValueError(f'{config} has no val_dataloader: pass --id-val CONFIG (a config '
                             'whose test set is your ID validation data)')
        if plain(val) == test:
            raise ValueError(
                f'{config}: its validation set is its test set; choosing every setting on it '
                'would report a selection score as the test score. Pass --id-val CONFIG with '
                'held-out ID images (a config whose test_dataloader.dataset is them), or set '
                'compare = dict(id_val=...) in the config')
        spec['id_val'] = plain(val)
    else:
        spec['id_val'] = _dataset(spec['id_val'], spec_options, base_dir, 'id_val', test)
        if spec['id_val'] == test:
            raise ValueError(f'{config}: the ID-val set is the ID test set; every choice would '
                             'then be made on the test images. Give held-out ID images')
    spec['ood'] = {name: _dataset(v, spec_options, base_dir, f'OOD set {name!r}', test)
                   for name, v in (spec.get('ood') or {}).items()}
    spec.setdefault('name', osp.splitext(osp.basename(config))[0])
    from daft_mm.mm.cli import detect_task
    spec['kind'] = detect_task(cfg)
    return TaskSpec(config=osp.abspath(config), id_test=test, options=spec_options, **spec)


def _set_record(dataset: Mapping[str, Any]) -> Dict[str, Any]:
    """Where a dataset config's images come from and how many it lists (and boxes, for a COCO
    annotation file)."""
    if 'dataset' in dataset:  # a wrapper (RepeatDataset, ...)
        return _set_record(dataset['dataset'])
    if 'datasets' in dataset:
        return dict(parts=[_set_record(d) for d in dataset['datasets']])
    root = dataset.get('data_root') or ''
    ann = dataset.get('ann_file') or ''
    img = (dataset.get('data_prefix') or {}).get('img_path', '')
    record: Dict[str, Any] = dict(type=dataset.get('type'), data_root=osp.abspath(root) if root
                                  else None, ann_file=ann or None, img_path=img or None)
    ann_path, img_dir = osp.join(root, ann), osp.join(root, img)
    if ann and osp.isfile(ann_path) and ann.endswith('.json'):  # COCO-style: images and boxes
        with open(ann_path) as f:
            coco = json.load(f)
        record['images'] = len(coco.get('images') or [])
        record['boxes'] = len(coco.get('annotations') or [])
    elif ann and osp.isfile(ann_path):  # a list, one image per line
        with open(ann_path) as f:
            record['images'] = sum(1 for line in f if line.strip())
    elif img and osp.isdir(img_dir):
        record['images'] = sum(len(files) for _, _, files in os.walk(img_dir))
    record['source_repository'] = source_repository(Path(root).resolve()) if root else None
    record['source_commit'] = source_commit(Path(root).resolve()) if root else None
    return record


def provenance(task: Any) -> Dict[str, Any]:
    """The data and backbone a comparison ran on, as they are on this machine: every set's
    folder, list and image count, the source repository commit where one was recorded, and
    the backbone checkpoint's SHA-256 with its sidecar ``.json`` (how it was pretrained)."""
    spec = asdict(task) if isinstance(task, TaskSpec) else dict(task)
    sets: Dict[str, Any] = {}
    try:
        sets['id_train'] = _set_record(dataset_of(spec['config'], spec.get('options') or {},
                                                  'train_dataloader'))
    except (OSError, ValueError) as err:  # the config moved: record why, keep the rest
        sets['id_train'] = dict(error=str(err))
    sets['id_val'] = _set_record(spec['id_val'])
    sets['id_test'] = _set_record(spec['id_test'])
    for name, dataset in (spec.get('ood') or {}).items():
        sets[f'ood/{name}'] = _set_record(dataset)
    splits = None  # how the lists were made (a split tool's record next to them: the ID-val gap)
    val = spec['id_val']
    if val.get('ann_file'):
        record = Path(val.get('data_root') or '') / Path(val['ann_file']).parent / 'splits.json'
        if record.is_file():
            splits = json.loads(record.read_text())
    backbone: Dict[str, Any] = dict(checkpoint=spec['backbone'])
    if osp.isfile(spec['backbone']):
        backbone['sha256'] = hashlib.sha256(Path(spec['backbone']).read_bytes()).hexdigest()
        sidecar = osp.splitext(spec['backbone'])[0] + '.json'
        if osp.isfile(sidecar):
            with open(sidecar) as f:
                backbone['pretraining'] = json.load(f)
    return dict(sets=sets, backbone=backbone, splits=splits)


def limit_images(dataset: Mapping[str, Any], n: Optional[int]) -> Dict[str, Any]:
    """A copy of a dataset config that reads only its first ``n`` images (mmengine's
    ``indices``), set on the innermost datasets of wrappers; ``n=None`` changes nothing."""
    out = plain(dataset)
    if n is None:
        return out
    if 'dataset' in out:
        out['dataset'] = limit_images(out['dataset'], n)
    elif 'datasets' in out:
        out['datasets'] = [limit_images(d, n) for d in out['datasets']]
    else:
        out['indices'] = n
    return out


def _remote(path: str) -> bool:
    return '://' in path


def _missing_path(dataset: Mapping[str, Any]) -> Optional[Tuple[str, str]]:
    """The first ``(key, path)`` of a dataset config that does not exist on this machine:
    ``data_root``, ``ann_file`` (a file) or a ``data_prefix`` entry, each joined with
    ``data_root`` as mmengine joins them. Remote paths (``s3://``...) are not checked."""
    if 'dataset' in dataset:
        return _missing_path(dataset['dataset'])
    if 'datasets' in dataset:
        for part in dataset['datasets']:
            found = _missing_path(part)
            if found:
                return found
        return None
    root = str(dataset.get('data_root') or '')
    if _remote(root):
        return None
    if root and not osp.isdir(root):
        return 'data_root', root
    ann = str(dataset.get('ann_file') or '')
    if ann and not _remote(ann) and not osp.isfile(osp.join(root, ann)):
        return 'ann_file', osp.join(root, ann)
    for key, value in (dataset.get('data_prefix') or {}).items():
        if isinstance(value, str) and value and not _remote(value):
            if not osp.exists(osp.join(root, value)):
                return f'data_prefix.{key}', osp.join(root, value)
    return None


def check_data(task: TaskSpec) -> None:
    """Refuse, before anything is built, a set whose folder or list does not exist: the error
    names the set, the key and the path (a dataset's own error names none of them)."""
    from daft_mm.mm.cli import load_config
    cfg = load_config(task.config, task.options, work_dir='unused')
    sets = {'the training set (ID train)': plain(cfg.train_dataloader.dataset),
            'ID-val': task.id_val, 'the ID test set': task.id_test}
    sets.update({f'OOD set {name!r}': dataset for name, dataset in task.ood.items()})
    for what, dataset in sets.items():
        found = _missing_path(dataset)
        if found:
            key, path = found
            raise InputError(
                f'{what}: its {key} {path!r} does not exist. Fix: point data_root at your data '
                '(--cfg-options data_root=DIR sets it for every set), or correct that set\'s '
                + ('config (--ood / compare.ood)' if what.startswith('OOD') else
                   'config (--id-val / compare.id_val)' if what == 'ID-val' else 'config'))
