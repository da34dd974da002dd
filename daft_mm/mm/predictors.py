"""Which layers of an mmseg / mmdet model are its final predictors, found by what each head *is*.

DAFT zero-initialises the final predictors and trains them at a far higher LR. A leaf name
(``conv_seg``, ``fc_cls``) misses most of the zoo: DANet predicts from three layers, Mask R-CNN's
mask head from ``conv_logits``, RetinaNet from ``retina_cls`` / ``retina_reg``, DETR-type heads from
``ModuleList`` branches. So the predictors come from a table keyed by head class: each entry says
which layers of that head are final predictors. Lookup follows the class hierarchy (the most
specific registered class wins), so a subclass of a known head is covered unless it renames its
layers. Wrappers (``DAFTModel``, TTA models, MOT / VIS trackers) are seen through by walking the
whole module tree; teacher models (semi-supervised, distillation) and proposal generators of
two-stage detectors are not the task's predictors and are left out.

A head of your own: ``register_head_predictors('MyHead', ['conv_out'])`` in a module your config
imports (``custom_imports``), a class attribute ``daft_predictors = ('conv_out',)`` on the head, or
``DAFTHook(predictors={'MyHead': ['conv_out']})`` in the config.

Layer names are relative to the head. A name may be a glob; a ``ModuleList`` stands for each of its
elements and an ``nn.Sequential`` for its last affine layer (``cls_branches``, ``reg_branches``,
``mask_embed`` of DETR- / MaskFormer-type heads).

Priors come from the head's own initialisation, not from loaded weights: a copy of the head is
initialised twice (``init_weights``, under two seeds); a bias that comes out identical and non-zero
is a prior (``bias_init_with_prob(0.01)`` = -4.595 on focal classifiers, CenterNet's heatmap,
AutoAssign's ``conv_reg`` 4.0, ...) and the predictor starts from it.
"""
from __future__ import annotations

import copy
import fnmatch
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from daft_mm.core.heads import PREDICTOR_TYPES, is_predictor_leaf, resolve_modules

__all__ = ['HeadPredictors', 'register_head_predictors', 'registered_heads', 'find_heads',
           'default_predictors', 'predictor_priors', 'SKIPPED_PREFIXES', 'PredictorSpec',
           'predictor_names', 'check_predictors']

#: head class name -> layers (relative to the head); () = the head has no final predictor of its own
_TABLE: Dict[str, Tuple[str, ...]] = {}

#: first path components that never hold the task's predictors: a semi-supervised teacher (an EMA
#: of the student), a distillation teacher (``teacher_*``), the data preprocessor.
SKIPPED_PREFIXES = ('teacher', 'data_preprocessor')

HeadSpec = Union[str, type]


def register_head_predictors(head: HeadSpec, layers: Iterable[str] = (), *,
                             force: bool = True) -> None:
    """Add (or replace) the table entry of a head class (a class or its name).

    ``layers`` are paths relative to the head (globs allowed; a ``ModuleList`` means each element,
    an ``nn.Sequential`` its last affine layer); empty means the head has no final predictor of
    its own (a feature module such as SCNet's ``FeatureRelayHead``).
    """
    name = head if isinstance(head, str) else head.__name__
    layers = (layers, ) if isinstance(layers, str) else tuple(layers)
    if not all(isinstance(layer, str) and layer for layer in layers):
        raise TypeError(f'register_head_predictors({name!r}): layers must be non-empty strings, '
                        f'got {layers!r}')
    if not force and name in _TABLE:
        raise KeyError(f'{name} already has predictors {_TABLE[name]}; pass force=True')
    _TABLE[name] = layers


def registered_heads() -> Dict[str, Tuple[str, ...]]:
    """A copy of the table."""
    return dict(_TABLE)


# ------------------------------------------------------------------------------------ the table
for _name, _layers in {
        # ---- mmseg decode heads: BaseDecodeHead and its special cases
        'BaseDecodeHead': ('conv_seg', ),
        'DAHead': ('conv_seg', 'pam_conv_seg', 'cam_conv_seg'),
        'EncHead': ('conv_seg', 'se_layer'),  # se_layer: the class-presence (SE loss) predictor
        'PointHead': ('fc_seg', ),
        # K-Net: the kernel update heads predict the masks; the generator's conv_seg weights are
        # the *initial kernels* (zeroing them would zero every mask), so it keeps its init.
        'IterativeDecodeHead': ('kernel_update_head.*.fc_mask', ),
        'MaskFormerHead': ('cls_embed', 'mask_embed'),
        'Mask2FormerHead': ('cls_embed', 'mask_embed'),
        # ---- mmdet RoI heads
        'BBoxHead': ('fc_cls', 'fc_reg'),
        'MultiInstanceBBoxHead': ('fc_cls', 'fc_reg'),  # CrowdDet: ModuleLists
        'SABLHead': ('fc_cls', 'reg_cls_x', 'reg_cls_y', 'reg_offset_x', 'reg_offset_y'),
        'DIIHead': ('fc_cls', 'fc_reg'),
        'FCNMaskHead': ('conv_logits', ),
        'CoarseMaskHead': ('fc_logits', ),
        'MaskPointHead': ('fc_logits', ),
        'MaskIoUHead': ('fc_mask_iou', ),
        'GridHead': ('deconv2', ),
        'FusedSemanticHead': ('conv_logits', ),
        'GlobalContextHead': ('fc', ),
        'FeatureRelayHead': (),
        'PanopticFPNHead': ('conv_logits', ),
        'HTCMaskHead': ('conv_logits', ),
        # ---- mmdet dense (one-stage) heads
        'AnchorHead': ('conv_cls', 'conv_reg'),
        'RetinaHead': ('retina_cls', 'retina_reg'),
        'RetinaSepBNHead': ('retina_cls', 'retina_reg'),
        'RPNHead': ('rpn_cls', 'rpn_reg'),
        'StageCascadeRPNHead': ('rpn_cls', 'rpn_reg'),
        'GuidedAnchorHead': ('conv_cls', 'conv_reg', 'conv_loc', 'conv_shape'),
        'GARetinaHead': ('retina_cls', 'retina_reg', 'conv_loc', 'conv_shape'),
        'GARPNHead': ('rpn_cls', 'rpn_reg', 'conv_loc', 'conv_shape'),
        'ATSSHead': ('atss_cls', 'atss_reg', 'atss_centerness'),
        'DDODHead': ('atss_cls', 'atss_reg', 'atss_iou'),
        'GFLHead': ('gfl_cls', 'gfl_reg'),
        'VFNetHead': ('vfnet_cls', 'vfnet_reg', 'vfnet_reg_refine'),
        'TOODHead': ('tood_cls', 'tood_reg'),
        'YOLOFHead': ('cls_score', 'bbox_pred', 'object_pred'),
        'AnchorFreeHead': ('conv_cls', 'conv_reg'),
        'FCOSHead': ('conv_cls', 'conv_reg', 'conv_centerness'),
        'CondInstBboxHead': ('conv_cls', 'conv_reg', 'conv_centerness', 'controller'),
        'CondInstMaskHead': (),  # its dynamic convolutions are predicted by the controller
        'FoveaHead': ('conv_cls', 'conv_reg'),
        'RepPointsHead': ('reppoints_cls_out', 'reppoints_pts_init_out',
                          'reppoints_pts_refine_out'),
        'CenterNetHead': ('heatmap_head', 'wh_head', 'offset_head'),
        'CenterNetUpdateHead': ('conv_cls', 'conv_reg'),
        'SABLRetinaHead': ('retina_cls', 'retina_bbox_reg', 'retina_bbox_cls'),
        'YOLACTHead': ('conv_cls', 'conv_reg', 'conv_coeff'),
        'YOLACTProtonet': (),  # prototypes, combined with the predicted coefficients
        'YOLACTSegmHead': ('segm_conv', ),
        'SOLOHead': ('conv_mask_list', 'conv_cls'),
        'DecoupledSOLOHead': ('conv_mask_list_x', 'conv_mask_list_y', 'conv_cls'),
        'DecoupledSOLOLightHead': ('conv_mask_list_x', 'conv_mask_list_y', 'conv_cls'),
        'SOLOV2Head': ('conv_cls', 'conv_kernel'),
        'DyHead': (),  # a neck (feature refinement) despite its name
        # MOT / VIS track heads learn embeddings compared by similarity: a zero embedding carries
        # no signal, so they keep their init; the detector inside is handled as usual
        'RoITrackHead': (),
        'QuasiDenseTrackHead': (),
        # ---- mmdet query-based heads
        'DETRHead': ('fc_cls', 'fc_reg'),
        'DeformableDETRHead': ('cls_branches', 'reg_branches'),
        'ConditionalDETRHead': ('fc_cls', 'fc_reg'),
        'DABDETRHead': ('fc_cls', 'fc_reg'),
}.items():
    register_head_predictors(_name, _layers)


# ------------------------------------------------------------------------------------ discovery
@dataclass
class HeadPredictors:
    """One head of a model and its final predictor layers (full module paths)."""

    path: str
    head: nn.Module
    entry: str  # the table entry (class name) it was found by
    layers: List[str]


def _entry(module: nn.Module, extra: Mapping[str, Sequence[str]]) -> Optional[Tuple[str, Tuple]]:
    own = type(module).__dict__.get('daft_predictors')
    if own is not None:
        return type(module).__name__, tuple([own] if isinstance(own, str) else own)
    for cls in type(module).__mro__:
        if cls.__name__ in extra:
            layers = extra[cls.__name__]
            return cls.__name__, tuple([layers] if isinstance(layers, str) else layers)
        if cls.__name__ in _TABLE:
            return cls.__name__, _TABLE[cls.__name__]
    return None


def _expand(path: str, module: nn.Module) -> List[str]:
    """A predictor leaf -> itself; ModuleList -> each element; any other container (Sequential,
    mmdet's MLP) -> its last predictor leaf."""
    if is_predictor_leaf(module):
        return [path]
    if isinstance(module, nn.ModuleList):
        return [p for i, sub in enumerate(module) for p in _expand(f'{path}.{i}', sub)]
    leaves = [name for name, m in module.named_modules(remove_duplicate=False)
              if name and is_predictor_leaf(m)]
    if leaves:
        return [f'{path}.{leaves[-1]}']
    raise TypeError(f'{path} ({type(module).__name__}) is neither a final predictor layer '
                    f'({", ".join(t.__name__ for t in PREDICTOR_TYPES)}) nor holds one')


def _head_layers(path: str, head: nn.Module, entry: str, layers: Sequence[str]) -> List[str]:
    subs = dict(head.named_modules(remove_duplicate=False))
    subs.pop('', None)
    found: List[str] = []
    for layer in layers:
        if any(c in layer for c in '*?['):
            hits = [name for name in subs if fnmatch.fnmatchcase(name, layer)]
        else:
            hits = [layer] if layer in subs else []
        for hit in hits:
            found.extend(_expand(f'{path}.{hit}', subs[hit]))
    if layers and not found:
        raise ValueError(
            f'{path} ({type(head).__name__}, predictor table entry {entry!r}) has none of its '
            f'predictor layers {list(layers)}. Fix: register_head_predictors('
            f'{type(head).__name__!r}, [...]) with the layers it has, or name the predictors '
            'in the config (predictors=[...])')
    return list(dict.fromkeys(found))


def _is_proposal_generator(path: str, parents: Mapping[str, nn.Module]) -> bool:
    """``rpn_head`` of a model that also has a ``roi_head``: it feeds the RoI head proposals that
    must be informative from the first step, so it keeps its init (not a final predictor)."""
    parent_path, _, leaf = path.rpartition('.')
    parent = parents.get(parent_path)
    return leaf == 'rpn_head' and parent is not None and hasattr(parent, 'roi_head') and \
        getattr(parent, 'roi_head') is not None


def find_heads(model: nn.Module,
               extra: Optional[Mapping[str, Sequence[str]]] = None) -> List[HeadPredictors]:
    """Every head of ``model`` found in the table (or ``extra``), outermost first; a matched head's
    submodules are not searched again. Raises for a module named ``*Head`` that holds parameters,
    has no entry and contains no known head, naming the fix."""
    extra = dict(extra or {})
    modules = dict(model.named_modules(remove_duplicate=False))
    heads: List[HeadPredictors] = []
    taken: List[str] = []  # prefixes already covered (a matched head, a skipped subtree)
    unknown: List[str] = []

    def covered(path: str) -> bool:
        return any(path == t or path.startswith(t + '.') for t in taken)

    for path, module in modules.items():
        if not path or covered(path):
            continue
        if (path.split('.', 1)[0].startswith(SKIPPED_PREFIXES)
                or _is_proposal_generator(path, modules)):
            taken.append(path)
            continue
        entry = _entry(module, extra)
        if entry is None:
            if type(module).__name__.endswith('Head') and any(True for _ in module.parameters()):
                unknown.append(path)
            continue
        taken.append(path)
        heads.append(HeadPredictors(path, module, entry[0],
                                    _head_layers(path, module, entry[0], entry[1])))
    found = [h.path for h in heads]
    unknown = [p for p in unknown if not any(f.startswith(p + '.') for f in found)]
    if unknown:
        listed = ', '.join(f'{p} ({type(modules[p]).__name__})' for p in unknown)
        raise ValueError(
            f'no predictor table entry for {listed}. Fix: name its final predictor layers, e.g. '
            f"DAFTHook(predictors={{'{type(modules[unknown[0]]).__name__}': ['<layer>']}}), or "
            'register_head_predictors(...) (daft_mm.mm.predictors)')
    return heads


def default_predictors(model: nn.Module,
                       extra: Optional[Mapping[str, Sequence[str]]] = None) -> List[str]:
    """The final predictor layers (module paths) of an mmseg/mmdet model, from the head table."""
    heads = find_heads(model, extra)
    names = [layer for h in heads for layer in h.layers]
    if not names:
        raise ValueError(
            f'cannot tell the final predictors of {type(model).__name__}: none of its modules is '
            'a head in the predictor table. Fix: name them, e.g. '
            "predictors=['decode_head.conv_seg'] in the DAFTHook / DAFTModel config, or "
            'register your head (daft_mm.mm.predictors.register_head_predictors)')
    return names


# ---------------------------------------------------------------------------------------- priors
def _owning_head(path: str, model: nn.Module, heads: Sequence[HeadPredictors]) -> Optional[Any]:
    best = None
    for h in heads:
        if path.startswith(h.path + '.') and (best is None or len(h.path) > len(best.path)):
            best = h
    return best


def _fresh_biases(head: nn.Module, rel_paths: Sequence[str], seed: int) -> Dict[str, torch.Tensor]:
    """Biases of ``rel_paths`` after the head's own ``init_weights`` on a copy (global RNG kept)."""
    from mmengine.model import BaseModule
    clone = copy.deepcopy(head)
    for sub in clone.modules():
        if isinstance(sub, BaseModule):
            sub._is_init = False
    # mmengine prints every parameter's init; nobody needs that for a throw-away copy
    clone._dump_init_info = lambda *args, **kwargs: None
    subs = dict(clone.named_modules(remove_duplicate=False))
    devices = [p.device for p in clone.parameters() if p.device.type == 'cuda'][:1]
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.manual_seed(seed)
        # Start from torch's (random) default init, so a bias the head's init_weights leaves
        # alone differs between the two seeds and is not taken for a prior: what the copy holds
        # before (loaded weights) must not matter.
        for rel in rel_paths:
            subs[rel].reset_parameters()
        clone.init_weights()
    return {rel: subs[rel].bias.detach().clone() for rel in rel_paths
            if getattr(subs[rel], 'bias', None) is not None}


def predictor_priors(model: nn.Module, names: Sequence[str],
                     extra: Optional[Mapping[str, Sequence[str]]] = None,
                     ) -> Dict[str, torch.Tensor]:
    """``{path: prior bias}`` for the predictors whose head initialises their bias to a fixed,
    non-zero value; predictors not listed start at bias 0.

    The head is found in the table (the innermost table head holding the layer); a head that
    cannot be re-initialised (``init_weights`` fails, e.g. it loads a checkpoint) gets no prior and
    a warning.
    """
    try:
        heads = find_heads(model, extra)
    except ValueError:
        heads = []
    modules = dict(model.named_modules(remove_duplicate=False))
    by_head: Dict[str, Tuple[HeadPredictors, List[str]]] = {}
    for name in names:
        owner = _owning_head(name, model, heads)
        if owner is None or not hasattr(owner.head, 'init_weights'):
            continue
        by_head.setdefault(owner.path, (owner, []))[1].append(name[len(owner.path) + 1:])
    priors: Dict[str, torch.Tensor] = {}
    for owner, rels in by_head.values():
        try:
            first = _fresh_biases(owner.head, rels, seed=1)
            second = _fresh_biases(owner.head, rels, seed=2)
        except Exception as exc:  # noqa: BLE001 - any init failure: fall back to bias 0, loudly
            warnings.warn(f'{owner.path} ({type(owner.head).__name__}): its init_weights failed '
                          f'on a copy ({exc}); its predictors start at bias 0 (no prior)')
            continue
        for rel, bias in first.items():
            if torch.equal(bias, second[rel]) and bool(bias.ne(0).any()):
                path = f'{owner.path}.{rel}'
                priors[path] = bias.to(modules[path].bias.device)
    return priors


# ------------------------------------------------------------------ predictors from a config value
PredictorSpec = Union[None, Sequence[str], Mapping[str, Sequence[str]]]


def predictor_names(model: nn.Module, spec: PredictorSpec, key: str) -> List[str]:
    """Predictor paths from a config value: ``None`` (the head table), a list of module paths /
    globs, or ``{head class: [layers]}`` (the head table plus these entries); checked."""
    if spec is None or isinstance(spec, Mapping):
        try:
            names = default_predictors(model, extra=spec)
        except (ValueError, TypeError) as exc:
            raise ValueError(f'{key}: {exc}') from None
    else:
        names = [spec] if isinstance(spec, str) else list(spec)
    return check_predictors(model, names, key)


def check_predictors(model: nn.Module, names: Sequence[str], key: str) -> List[str]:
    """Resolve predictor names and check each is a predictor leaf, before any weight changes.

    Errors name the config ``key`` to fix.
    """
    try:
        resolved = resolve_modules(model, list(names))
    except (KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise ValueError(f'{key}: {msg}. Fix: list module paths of the final predictor layers as '
                         f'in model.named_modules(), e.g. {default_predictors_or_hint(model)}'
                         ) from None
    bad = [f'{path} ({type(m).__name__})' for path, m in resolved.items()
           if not is_predictor_leaf(m)]
    if bad:
        raise ValueError(f'{key}: {bad} are not final predictor layers (a leaf Linear/ConvNd/'
                         'ConvTransposeNd). '
                         f'Fix: name the last layer of each head, e.g. '
                         f'{default_predictors_or_hint(model)}')
    return list(resolved)


def default_predictors_or_hint(model: nn.Module) -> Union[List[str], str]:
    try:
        return default_predictors(model)
    except (ValueError, TypeError):
        return "['decode_head.conv_seg']"
