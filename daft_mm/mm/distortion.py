"""How far fine-tuning moved a backbone from its start: the statistics over mmengine data batches
(:class:`FeatureStats`, :func:`compare_backbones`: a model's data preprocessor + backbone), which
``DistortionHook`` logs during training, and the offline analysis of ``tools/analyze_distortion.py``
as a function (the tool keeps argument parsing, plots and files).

For every fine-tuned checkpoint, against the pretrained backbone (and, for DAFT runs, against the
model right after BN conversion): feature similarity on a dataset split (cosine and L2 of pooled
backbone features, cosine per pixel) and the per-layer relative parameter change.
"""
from __future__ import annotations

import copy
import difflib
import math
import os.path as osp
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from daft_mm.core import kept_modes
from daft_mm.core.distortion import feature_similarity, relative_change

__all__ = ['PRETRAINED', 'CONVERTED', 'REFERENCE_DOC', 'backbone_inputs', 'as_feature_tuple',
           'resolve_levels', 'eval_mode', 'FeatureStats', 'compare_backbones', 'backbone_state',
           'load_backbone', 'build_loader', 'analyze_distortion']

PRETRAINED = 'pretrained'
CONVERTED = 'converted'
REFERENCE_DOC = {
    PRETRAINED: 'the pretrained backbone (--pretrained)',
    CONVERTED: 'the model right after DAFT BN conversion (the start of a DAFT run)',
}


# ------------------------------------------------------------------------------------- glue
def backbone_inputs(model: nn.Module, data_batch: Any, training: bool = False) -> torch.Tensor:
    """The image tensor the model's backbone sees for an mmengine data batch (dataloader output):
    what ``model.data_preprocessor`` makes of it (normalised, padded, on the model's device)."""
    data = model.data_preprocessor(data_batch, training)
    inputs = data['inputs'] if isinstance(data, Mapping) else data[0]
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f'data_preprocessor returned inputs of type {type(inputs).__name__}; the '
                        'distortion analysis needs a batched image tensor')
    return inputs


def as_feature_tuple(out: Any) -> Tuple[torch.Tensor, ...]:
    """A backbone's output as a tuple of feature maps (mmseg/mmdet backbones return tuples)."""
    if isinstance(out, torch.Tensor):
        return (out, )
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return tuple(out)
    raise TypeError(f'backbone returned {type(out).__name__}; expected a tensor or a tuple of them')


def resolve_levels(levels: Sequence[int], num_outputs: int) -> List[int]:
    """Negative output indices made positive, checked against the number of backbone outputs."""
    resolved = []
    for level in levels:
        idx = level + num_outputs if level < 0 else level
        if not 0 <= idx < num_outputs:
            raise ValueError(f'feature level {level} does not exist: the backbone returns '
                             f'{num_outputs} feature map(s) (valid: 0..{num_outputs - 1} or -1..'
                             f'-{num_outputs})')
        resolved.append(idx)
    return resolved


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Eval mode inside, every submodule's own flag restored after (some are kept eval on purpose,
    e.g. by ``norm_eval``), and no autograd."""
    with kept_modes(modules), torch.no_grad():
        for module in modules:
            module.eval()
        yield


def one_minus_cosine_edges(num_log_bins: int = 100) -> torch.Tensor:
    """Histogram edges for ``1 - cosine``: ``[0, 1e-9)`` holds exact matches, then log-spaced up
    to 2. Cosines of fine-tuned features crowd just below 1, where linear bins see nothing."""
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.logspace(-9, math.log10(2.0), num_log_bins + 1, dtype=torch.float64)])


class FeatureStats:
    """Accumulates per-image similarities of one backbone output level against a reference;
    per-pixel cosines are kept as a histogram of ``1 - cosine`` (bounded memory)."""

    def __init__(self, num_log_bins: int = 100) -> None:
        self.cosine: List[float] = []
        self.l2: List[float] = []
        self.pixel_cosine_per_image: List[float] = []
        self.edges = one_minus_cosine_edges(num_log_bins)
        self.pixel_hist = torch.zeros(len(self.edges) - 1, dtype=torch.float64)
        self.num_pixels = 0
        self._pixel_total = 0.0

    def update(self, f0: torch.Tensor, f1: torch.Tensor) -> None:
        sim = feature_similarity(f0, f1)
        self.cosine += sim.cosine.cpu().tolist()
        self.l2 += sim.l2.cpu().tolist()
        if sim.pixel_cosine is not None:
            pix = sim.pixel_cosine.flatten(1).cpu()
            self.pixel_cosine_per_image += pix.mean(dim=1).tolist()
            dist = (1.0 - pix.flatten()).clamp(0.0, 2.0)
            idx = torch.bucketize(dist, self.edges, right=True) - 1
            idx = idx.clamp(0, len(self.pixel_hist) - 1)  # 1 - cos == 2 goes in the last bin
            self.pixel_hist += torch.bincount(idx, minlength=len(self.pixel_hist)).double()
            self.num_pixels += pix.numel()
            self._pixel_total += pix.sum().item()

    def means(self) -> Dict[str, float]:
        """Mean over images (pixel cosine: mean over all pixels of all images)."""
        def mean(values: List[float]) -> float:
            return sum(values) / len(values) if values else math.nan
        out = {'cosine': mean(self.cosine), 'l2': mean(self.l2)}
        if self.num_pixels:
            # Pixel-weighted, so images of different sizes count by their area.
            out['pixel_cosine'] = self._pixel_total / self.num_pixels
        return out

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {'num_images': len(self.cosine), 'mean': self.means(),
                               'per_image': {'cosine': self.cosine, 'l2': self.l2}}
        if self.num_pixels:
            out['per_image']['pixel_cosine_mean'] = self.pixel_cosine_per_image
            out['pixel_one_minus_cosine_histogram'] = {
                'edges': self.edges.tolist(), 'num_pixels': self.num_pixels,
                'counts': [int(c) for c in self.pixel_hist.tolist()]}
        return out


def compare_backbones(model: nn.Module,
                      backbones: Mapping[str, nn.Module],
                      pairs: Sequence[Tuple[str, str]],
                      batches: Iterable[Any],
                      *,
                      max_images: Optional[int] = None,
                      levels: Sequence[int] = (-1, )
                      ) -> Tuple[Dict[Tuple[str, str], Dict[int, FeatureStats]], int]:
    """Feature similarity of backbone pairs on the same images, one pass over ``batches``.

    Args:
        model: supplies ``data_preprocessor`` (the backbones share it, as they share the config).
        backbones: name -> backbone module; each runs once per batch.
        pairs: ``(reference, compared)`` names; the reference's features are ``f0``.
        batches: mmengine data batches (e.g. a val dataloader).
        max_images: stop after this many images (the last batch is cut).
        levels: backbone output indices to compare (negative counts from the deepest).

    Returns ``({pair: {level: FeatureStats}}, number of images seen)``. Only one batch of features
    is held at a time, so full-resolution datasets fit in memory.
    """
    for ref, other in pairs:
        for name in (ref, other):
            if name not in backbones:
                raise KeyError(f'pair ({ref!r}, {other!r}) names unknown backbone {name!r}; '
                               f'known: {sorted(backbones)}')
    if max_images is not None and max_images < 1:
        raise ValueError(f'max_images must be positive, got {max_images}')
    stats: Dict[Tuple[str, str], Dict[int, FeatureStats]] = {}
    needed = sorted({name for pair in pairs for name in pair})
    seen = 0
    with eval_mode(model, *backbones.values()):
        for batch in batches:
            inputs = backbone_inputs(model, batch, training=False)
            if max_images is not None:
                inputs = inputs[:max_images - seen]
            feats = {name: as_feature_tuple(backbones[name](inputs)) for name in needed}
            resolved = resolve_levels(levels, len(next(iter(feats.values()))))
            for pair in pairs:
                per_level = stats.setdefault(pair, {idx: FeatureStats() for idx in resolved})
                for idx in resolved:
                    per_level[idx].update(feats[pair[0]][idx], feats[pair[1]][idx])
            seen += inputs.shape[0]
            if max_images is not None and seen >= max_images:
                break
    if seen == 0:
        raise ValueError('no images: the dataloader yielded nothing to compare features on')
    return stats, seen


# ----------------------------------------------------------------------------- checkpoints
def backbone_state(path: str, backbone: nn.Module, what: str) -> Dict[str, torch.Tensor]:
    """The backbone part of a checkpoint, checked against the backbone the config builds.

    Accepts whole-model checkpoints (keys ``backbone.*``, an optional ``state_dict`` wrapper and
    ``module.`` prefix) and bare backbone checkpoints. Missing keys and shape mismatches are errors
    (they mean the checkpoint belongs to another architecture); extra keys of a bare backbone
    checkpoint (a classifier, say) are ignored.
    """
    from mmengine.runner import CheckpointLoader

    if not osp.isfile(path):
        raise FileNotFoundError(f'{what} checkpoint {path!r} does not exist')
    ckpt = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    state = ckpt.get('state_dict', ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                 for v in state.values()):
        raise ValueError(f'{what} checkpoint {path!r} holds no state dict of tensors')
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    if any(k.startswith('backbone.') for k in state):
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}

    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith('num_batches_tracked')]
    if missing:
        close = difflib.get_close_matches(missing[0], list(state), n=3)
        raise KeyError(
            f'{what} checkpoint {path!r} lacks {len(missing)} of the {len(expected)} backbone '
            f'entries the config builds (first: {missing[:4]})'
            + (f'; similar names in the checkpoint: {close}' if close else '')
            + '. Is it a checkpoint of this architecture (depth, stem type)? Use the config the '
            'checkpoint was trained with, or fix the key names.')
    wrong = [f'{k}: config {tuple(v.shape)} vs checkpoint {tuple(state[k].shape)}'
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise ValueError(f'{what} checkpoint {path!r} does not match the backbone the config '
                         f'builds ({len(wrong)} shape mismatches, first: {wrong[:3]}). Use the '
                         'config the checkpoint was trained with.')
    return {k: state[k] for k in expected if k in state}


def load_backbone(template: nn.Module, path: str, what: str, device: str) -> nn.Module:
    backbone = copy.deepcopy(template)
    backbone.load_state_dict(backbone_state(path, template, what), strict=False)
    backbone.to(device)
    backbone.requires_grad_(False)
    backbone.eval()  # mmseg's ResNet.train() returns None: no chaining
    return backbone


# ------------------------------------------------------------------------------------- data
def build_loader(cfg: Any, split: str, num_workers: int, shuffle: Optional[bool] = None,
                 seed: Optional[int] = None):
    from mmengine.runner import Runner

    key = f'{split}_dataloader'
    if not cfg.get(key):
        raise KeyError(f'the config has no {key}; pick another --split')
    loader_cfg = copy.deepcopy(cfg[key])
    loader_cfg['num_workers'] = num_workers
    if num_workers == 0:
        loader_cfg['persistent_workers'] = False
    if shuffle is not None and isinstance(loader_cfg.get('sampler'), Mapping):
        loader_cfg['sampler'] = dict(loader_cfg['sampler'], shuffle=shuffle)
    return Runner.build_dataloader(loader_cfg, seed=seed)


# ------------------------------------------------------------------------------- analysis
def analyze_distortion(cfg: Any, pretrained: str, finetuned: Sequence[Tuple[str, str]], *,
                       reference_converted: Sequence[Tuple[str, str]] = (),
                       convert: Sequence[str] = (), split: str = 'val',
                       max_images: Optional[int] = None, levels: Optional[Sequence[int]] = None,
                       device: str = 'cpu', num_workers: int = 0, seed: Optional[int] = 0,
                       convert_split: str = 'train', convert_batches: Optional[int] = None,
                       convert_var_mode: str = 'batch') -> Dict[str, Any]:
    """Compare each ``(name, checkpoint)`` of ``finetuned`` with the ``pretrained`` backbone of
    the config ``cfg`` (an mmengine Config) and, for the names in ``reference_converted``
    (``(name, converted.pth)``) or ``convert`` (converted here with ``convert_bn`` on
    ``convert_split``), with the converted model. Returns a JSON-safe dict of every number, each
    labelled with its reference."""
    from mmengine.registry import MODELS, init_default_scope
    from mmengine.utils import ProgressBar

    from daft_mm.core import make_plan, prepare

    from .preparation import count_batches, one_pass_loader

    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model = MODELS.build(cfg.model)  # no init_weights: weights come from the checkpoints
    model.to(device)
    model.eval()
    if not isinstance(getattr(model, 'backbone', None), nn.Module):
        raise ValueError(f'{type(model).__name__} has no .backbone to analyse')
    template = model.backbone

    backbones: Dict[str, nn.Module] = OrderedDict()
    ref_ckpt: Dict[str, str] = {}
    backbones[PRETRAINED] = load_backbone(template, pretrained, 'pretrained', device)
    for name, path in finetuned:
        backbones[name] = load_backbone(template, path, f'run {name!r}', device)
    for name, path in reference_converted:
        backbones[f'{CONVERTED}:{name}'] = load_backbone(template, path,
                                                         f'converted reference of {name!r}',
                                                         device)
        ref_ckpt[name] = path
    conversion_reports = {}
    if convert:
        converted = copy.deepcopy(backbones[PRETRAINED])
        # DAFTHook's statistics loader: one finite pass (the training split's InfiniteSampler
        # never ends), at most --convert-batches, with its progress bar.
        loader = one_pass_loader(build_loader(cfg, convert_split, num_workers),
                                 seed=seed)
        total = count_batches(loader, convert_batches)
        print(f'converting BN of the pretrained backbone on the {convert_split} split: '
              f'{total} batches', flush=True)
        bar = ProgressBar(total)
        # the whole backbone is the pretrained part: every BN layer of it is converted
        plan = make_plan(converted, pretrained=[''], predictors=(), zero_init=False)
        report = prepare(converted, loader, plan, max_batches=total, var_mode=convert_var_mode,
                         forward=lambda m, batch: m(backbone_inputs(model, batch, True)),
                         progress=lambda _: bar.update()).report
        bar.file.write('\n')
        print(report.summary(max_rows=5))
        desc = (f'pretrained converted here with convert_bn on the {convert_split} split '
                f'({report.num_batches} batches, {convert_var_mode} variance)')
        for name in convert:
            backbones[f'{CONVERTED}:{name}'] = converted
            ref_ckpt[name] = desc
        conversion_reports = {'description': desc, 'report': report.to_dict()}

    # Which reference each run is compared against.
    comparisons: Dict[str, List[Tuple[str, str]]] = {}  # run -> [(ref kind, backbone key)]
    for name, _ in finetuned:
        comparisons[name] = [(PRETRAINED, PRETRAINED)]
        if name in ref_ckpt:
            comparisons[name].append((CONVERTED, f'{CONVERTED}:{name}'))
    pairs = sorted({(key, run) for run, refs in comparisons.items() for _, key in refs})

    loader = build_loader(cfg, split, num_workers, shuffle=False)
    stats, num_images = compare_backbones(model, backbones, pairs, loader,
                                          max_images=max_images, levels=levels)
    levels = sorted(next(iter(stats.values())))

    states = {key: {k: v.detach().cpu() for k, v in b.state_dict().items()}
              for key, b in backbones.items()}
    result: Dict[str, Any] = {
        'config': cfg.filename, 'split': split, 'num_images': num_images,
        'feature_levels': levels,
        'reference_kinds': {kind: REFERENCE_DOC[kind] for kind in
                            ([PRETRAINED] + ([CONVERTED] if ref_ckpt else []))},
        'notes': {
            'cosine': 'cosine of globally average-pooled backbone features, per image',
            'l2': 'Euclidean distance of the pooled features, per image',
            'pixel_cosine': 'channel cosine per spatial position; mean is pixel-weighted',
            'relative': '||theta - theta_ref|| / ||theta_ref|| per tensor; null where the '
                        'reference tensor is zero and it moved (see abs_change, zero_reference)',
            'means': 'unweighted means over layers, null rows skipped',
        },
        'runs': {},
    }
    if conversion_reports:
        result['conversion'] = conversion_reports
    for run, path in finetuned:
        entry: Dict[str, Any] = {'checkpoint': path, 'comparisons': {}}
        for kind, key in comparisons[run]:
            change = relative_change(states[key], states[run])
            entry['comparisons'][kind] = {
                'reference_checkpoint': pretrained if kind == PRETRAINED else ref_ckpt[run],
                'features': {str(level): stats[(key, run)][level].to_dict() for level in levels},
                'parameters': change.to_dict(),
            }
        result['runs'][run] = entry
    result = _clean(result)

    return result


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None (strict JSON has no NaN), tuples -> lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
