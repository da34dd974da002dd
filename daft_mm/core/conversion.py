"""DAFT's BatchNorm conversion: re-centre BN statistics on the target data, keep the function.

One eval-mode pass measures what every BN layer sees on the target data while the network still
computes exactly the pretrained function; then, for every layer at once,

    running_mean <- mu_new,  running_var <- var_new,
    bias   <- bias + (mu_new - mu_old) * weight / sqrt(var_old + eps),
    weight <- weight * sqrt(var_new + eps) / sqrt(var_old + eps),

so eval-mode outputs are unchanged while train-mode BN starts from statistics that match the data.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import has_running_stats, kept_modes, not_batchnorm_reason
from .recipes import CONVERT_SCOPES
from .stats import VAR_MODES, ChannelAccumulator, ChannelMoments, all_reduce_accumulators

ModuleSpec = Union[None, str, Iterable[Union[str, nn.Module]], Callable[[str, nn.Module], bool]]
ForwardFn = Callable[[nn.Module, Any], Any]


class ConversionError(RuntimeError):
    """BN conversion could not be done; the model was left exactly as it was."""


# --------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """How far one layer's statistics moved: a per-layer view of the domain gap."""

    name: str
    num_channels: int
    num_samples: int  # inputs (dim 0) seen, summed over batches and ranks
    num_values: int  # values per channel: samples x spatial positions
    num_batches: int
    mean_shift: float  # mean over channels of |mu_new - mu_old| / sqrt(var_old + eps)
    max_mean_shift: float
    std_ratio: float  # mean over channels of sqrt(var_new + eps) / sqrt(var_old + eps)


@dataclass
class ConversionReport:
    var_mode: str
    num_batches: int  # batches this rank ran through the model
    world_size: int
    layers: List[LayerReport] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # layer name -> why it was left as is
    #: BN layers outside the pretrained modules, not converted (see :func:`split_batchnorms`);
    #: filled in by the caller that chose the layers
    left_as_initialised: List[str] = field(default_factory=list)

    @property
    def converted(self) -> List[str]:
        return [layer.name for layer in self.layers]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self, max_rows: int = 12) -> str:
        """A short table, largest shifts first: the layers where the target domain differs most."""
        lines = [f'BN conversion ({self.var_mode} variance): {len(self.layers)} layers converted '
                 f'from {self.num_batches} batches x {self.world_size} rank(s)'
                 + (f', {len(self.skipped)} skipped' if self.skipped else '')
                 + (f', {len(self.left_as_initialised)} new (left as initialised)'
                    if self.left_as_initialised else '')]
        if self.layers:
            shifts = [layer.mean_shift for layer in self.layers]
            lines.append(f'mean shift in old std units: mean {sum(shifts) / len(shifts):.3f}, '
                         f'max {max(layer.max_mean_shift for layer in self.layers):.3f}')
            lines.append(f'{"layer":<48} {"samples":>8} {"shift":>7} {"max":>7} {"std ratio":>9}')
            ranked = sorted(self.layers, key=lambda layer: -layer.mean_shift)
            for layer in ranked[:max_rows]:
                lines.append(f'{layer.name:<48} {layer.num_samples:>8d} {layer.mean_shift:>7.3f} '
                             f'{layer.max_mean_shift:>7.3f} {layer.std_ratio:>9.3f}')
            if len(ranked) > max_rows:
                lines.append(f'... {len(ranked) - max_rows} more layers')
        for name, why in self.skipped.items():
            lines.append(f'skipped {name}: {why}')
        return '\n'.join(lines)


# ------------------------------------------------------------------------------ layer selection
def find_batchnorms(model: nn.Module, modules: ModuleSpec = None) -> Dict[str, _BatchNorm]:
    """The BN layers to convert, by name. Found by type (mmengine/torch variants subclass
    ``_BatchNorm``) and by duck type: any layer with per-channel running statistics and the
    BatchNorm interface (mmcv's ``MMSyncBN``) is converted like one; any other layer with running
    statistics among the chosen ones is refused (``ValueError``) rather than silently left on the
    source statistics. ``modules`` narrows the search: module names (a BN layer, or a parent whose
    BN layers are all taken), module objects, or a predicate ``(name, module) -> bool``."""
    named = dict(model.named_modules())
    all_bn = {name: m for name, m in named.items() if has_running_stats(m)}
    if modules is None:
        chosen: Dict[str, _BatchNorm] = all_bn
    elif callable(modules) and not isinstance(modules, nn.Module):
        chosen = {name: m for name, m in all_bn.items() if modules(name, m)}
    else:
        chosen = _select(named, all_bn, [modules] if isinstance(modules, (str, nn.Module))
                         else modules)
    refuse_non_batchnorms(chosen)
    return chosen


def refuse_non_batchnorms(chosen: Mapping[str, nn.Module]) -> None:
    """The one test of what conversion accepts, for planning and converting alike: a layer with
    running statistics that does not behave as BatchNorm (a tracked ``InstanceNorm``) is refused
    with a ``ValueError`` naming it, instead of being left on the source statistics."""
    refused = {name: why for name, m in chosen.items() if (why := not_batchnorm_reason(m))}
    if refused:
        listed = '; '.join(f'{name} ({type(chosen[name]).__name__}): {why}'
                           for name, why in refused.items())
        raise ValueError(f'{len(refused)} normalisation layer(s) keep running statistics but '
                         f'cannot be converted as BatchNorm ({listed}). Fix: exclude them with '
                         'modules=[...] (the BN layers or parents to convert)')


def split_batchnorms(model: nn.Module, pretrained: Optional[Iterable[str]],
                     scope: str = 'pretrained') -> Tuple[List[str], List[str]]:
    """(BN layers to convert, BN layers left as initialised): DAFT's rule of which layers
    conversion rewrites, in one place for every front end.

    Conversion keeps a *pretrained* function while the statistics move to the target data, so it
    rewrites the BN layers inside the ``pretrained`` modules (module paths; ``None`` or empty:
    nothing was pretrained) and leaves every other one exactly as initialised: a fresh head's BN
    has running statistics 0/1, and keeping "its function" would turn it into an identity on
    unnormalised activations. ``scope='all'`` converts every BN layer (the rule switched off).
    Layers are BN-like by :func:`refuse_non_batchnorms`'s test (the one conversion applies), so a
    layer conversion would refuse is refused here, when the plan is made; both lists are in model
    order.
    """
    if scope not in CONVERT_SCOPES:
        raise ValueError(f'scope must be one of {CONVERT_SCOPES}, got {scope!r}')
    named = dict(model.named_modules())
    all_bn = [name for name, m in named.items() if has_running_stats(m)]
    if scope == 'all':
        refuse_non_batchnorms({name: named[name] for name in all_bn})
        return all_bn, []
    inside = set()
    for path in pretrained or ():
        if path not in named:
            close = difflib.get_close_matches(path, list(named), n=3)
            hint = f'; did you mean {close}?' if close else ''
            raise ValueError(f'pretrained modules: the model has no submodule {path!r}{hint}')
        inside.update(id(sub) for sub in named[path].modules())
    converted = [name for name in all_bn if id(named[name]) in inside]
    refuse_non_batchnorms({name: named[name] for name in converted})
    return converted, [name for name in all_bn if id(named[name]) not in inside]


def _select(named: Dict[str, nn.Module], all_bn: Dict[str, nn.Module],
            specs: Iterable[Union[str, nn.Module]]) -> Dict[str, nn.Module]:
    ids = {id(m): name for name, m in named.items()}
    chosen: Dict[str, nn.Module] = {}
    for spec in specs:
        if isinstance(spec, nn.Module):
            if id(spec) not in ids:
                raise ValueError(f'modules: {type(spec).__name__} object is not a submodule of the '
                                 'model; pass modules of this model or their names')
            spec = ids[id(spec)]
        if spec not in named:
            close = difflib.get_close_matches(spec, list(named), n=3)
            hint = f'; did you mean {close}?' if close else ''
            raise ValueError(f'modules: the model has no submodule {spec!r}{hint}')
        prefix = f'{spec}.' if spec else ''
        found = {name: m for name, m in all_bn.items() if name == spec or name.startswith(prefix)}
        if not found:
            raise ValueError(f'modules: {spec!r} contains no BatchNorm layer')
        chosen.update(found)
    # model order, whatever the order of the specs
    return {name: m for name, m in all_bn.items() if name in chosen}


def _incompatibility(bn: _BatchNorm) -> Optional[str]:
    if not bn.affine or bn.weight is None or bn.bias is None:
        return 'no affine weight/bias (affine=False), so the function cannot be kept'
    if bn.running_mean is None or bn.running_var is None:
        return 'no running statistics (track_running_stats=False) to replace'
    return None


# ---------------------------------------------------------------------------------- the pass
def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` for a tensor; ``model(batch[0])`` for the (inputs, targets, ...) tuples
    that DataLoaders yield. Anything else needs an explicit ``forward``."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return model(batch[0])
    raise TypeError(f'convert_bn cannot feed a batch of type {type(batch).__name__} to the model; '
                    'pass forward=lambda model, batch: ... that runs one step')


@contextmanager
def _collect_inputs(layers: Mapping[str, _BatchNorm],
                    accumulators: Mapping[str, ChannelAccumulator]) -> Iterator[None]:
    """Forward pre-hooks that feed each BN's input to its accumulator; always removed."""
    handles = []

    def make_hook(acc: ChannelAccumulator) -> Callable:
        def hook(module: nn.Module, args: Tuple[Any, ...]) -> None:
            acc.update(args[0].detach())
        return hook

    try:
        for name, bn in layers.items():
            handles.append(bn.register_forward_pre_hook(make_hook(accumulators[name])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _distributed_world(group: Optional[dist.ProcessGroup]) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def _step_together(error: Optional[BaseException], active: bool, num_batches: int,
                   world_size: int, group: Optional[dist.ProcessGroup],
                   device: torch.device) -> Tuple[bool, bool, int]:
    """One round of the ranks' agreement, after every batch: ``(failed anywhere, any rank still
    has batches, batches over all ranks so far)``.

    Why after every batch, not once at the end: a rank that fails (an error, Ctrl-C, SIGTERM)
    stops its peers at their next batch instead of after their whole pass (or, for a pass longer
    than the process-group timeout, a timeout). A rank whose data ran out keeps taking part with
    ``active=False`` until every rank is done, so every rank runs the same number of rounds. One
    all-reduce of three numbers per batch (its cost: docs/reliability.md). A peer that died
    outright makes the all-reduce itself fail within seconds; that is raised as this rank's error.
    """
    if world_size == 1:
        return error is not None, active, num_batches
    status = torch.tensor([1.0 if error is not None else 0.0, 1.0 if active else 0.0,
                           float(num_batches)], dtype=torch.float64, device=device)
    try:
        dist.all_reduce(status, group=group)
    except BaseException as exc:  # noqa: BLE001 - a dead peer, or an interrupt here
        if error is not None and not isinstance(error, Exception):
            raise error from None
        if not isinstance(exc, Exception):
            raise  # Ctrl-C or SIGTERM during the all-reduce stays what it is
        raise ConversionError(f'BN conversion stopped: the ranks could not agree ({exc}); a peer '
                              'has probably failed (see its error). The model is unchanged.'
                              ) from exc
    return status[0].item() > 0, status[1].item() > 0, int(status[2].item())


def _raise_failure(error: Optional[BaseException], failed: bool, total_batches: int) -> None:
    """Every rank raises together: its own error, or that another rank failed."""
    if error is not None and not isinstance(error, Exception):
        raise error  # KeyboardInterrupt, SystemExit...: the model is unchanged, the peers told
    if error is not None:
        raise ConversionError(f'BN conversion failed during the statistics pass: {error}. '
                              'The model is unchanged.') from error
    if failed:
        raise ConversionError('BN conversion failed on another rank (see its error); the model '
                              'is unchanged on every rank')
    if total_batches == 0:
        raise ConversionError('batches is empty: BN conversion needs at least one batch of '
                              'target-domain inputs. The model is unchanged.')


def _refuse_non_finite_weights(model: nn.Module) -> None:
    """NaN / Inf already in the weights (a checkpoint saved after a run diverged) would surface
    after the pass as non-finite statistics, blamed on the data: name the tensors first."""
    named = [(n, t) for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if t.is_floating_point() and not t.is_meta and t.numel()]
    if not named:
        return
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in named]).cpu().tolist()
    bad = [n for (n, _), ok in zip(named, finite) if not ok]
    if bad:
        shown = ', '.join(bad[:5]) + (' ...' if len(bad) > 5 else '')
        raise ConversionError(
            f'the model\'s weights hold NaN or Inf before any data was seen, in {len(bad)} '
            f'tensor(s): {shown}. They came with the weights it was loaded from (the pretrained '
            'checkpoint or load_from, e.g. one saved after a run diverged), not from the data. '
            'Fix: load a checkpoint without them (check it with '
            "torch.load(path)['state_dict'][name].isfinite().all()). The model is unchanged.")


def convert_bn(model: nn.Module,
               batches: Iterable[Any],
               *,
               forward: Optional[ForwardFn] = None,
               max_batches: Optional[int] = None,
               var_mode: str = 'batch',
               modules: ModuleSpec = None,
               skip_incompatible: bool = False,
               progress: Optional[Callable[[int], None]] = None,
               process_group: Optional[dist.ProcessGroup] = None,
               keep_function: bool = True) -> ConversionReport:
    """Converts the model's BN layers to the statistics of ``batches``, in place, keeping the
    eval-mode function. Returns a report of what moved and by how much.

    Args:
        model: any ``nn.Module``; its BN layers are found by type.
        batches: any iterable of inputs (tensors, DataLoader tuples, mmengine data batches).
        forward: ``forward(model, batch)`` runs one step; default ``model(batch)``
            (``model(batch[0])`` for tuples).
        max_batches: stop after this many batches.
        var_mode: ``'batch'`` (default): count-weighted mean of per-batch unbiased variances,
            what train-mode BN sees while fine-tuning; ``'population'``: pooled unbiased variance.
            For SyncBatchNorm a batch is the global batch across ranks. Batches with one value per
            channel count towards the mean and the population variance only.
        modules: which BN layers (names, parents, modules, or a predicate); default all.
        skip_incompatible: leave (and report) BN layers without affine parameters or running
            statistics instead of raising.
        progress: called with the number of batches done after each batch.
        process_group: the group whose ranks pool their statistics; default the world.
        keep_function: ``False``: write the measured statistics only, weight and bias kept (the
            statistics of a weight-space mix, which match none of its endpoints, re-estimated;
            the function changes, as intended there).

    Under ``torch.distributed`` every rank must call this; the ranks agree after every batch (a
    failing rank stops the others at their next batch), statistics are pooled with one all-reduce
    at the end and every rank ends with identical BN parameters.
    """
    if var_mode not in VAR_MODES:
        raise ValueError(f'var_mode must be one of {VAR_MODES}, got {var_mode!r}')
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f'max_batches must be a positive int or None, got {max_batches!r}')
    forward = forward or default_forward

    layers = find_batchnorms(model, modules)
    if not layers:
        raise ConversionError(f'{type(model).__name__} has no BatchNorm layer to convert'
                              + ('' if modules is None else ' among the selected modules'))
    skipped: Dict[str, str] = {}
    bad = {name: why for name, bn in layers.items() if (why := _incompatibility(bn))}
    if bad and not skip_incompatible:
        listed = '; '.join(f'{name}: {why}' for name, why in bad.items())
        raise ConversionError(f'{len(bad)} BN layer(s) cannot be converted while keeping the '
                              f'function ({listed}). Pass skip_incompatible=True to leave them '
                              'as they are, or exclude them with modules=...')
    skipped.update(bad)
    layers = {name: bn for name, bn in layers.items() if name not in bad}
    if not layers:
        raise ConversionError('no convertible BN layer is left after skipping: ' + str(skipped))

    on_meta = [name for name, bn in layers.items()
               if any(t.is_meta for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))]
    if on_meta:
        shown = ', '.join(on_meta[:3]) + (' ...' if len(on_meta) > 3 else '')
        raise ConversionError(
            f'{len(on_meta)} BN layer(s) ({shown}) are on the meta device: the model has shapes '
            'but no weights yet. Fix: materialise and load it first (model.to_empty(device=...), '
            'then load_state_dict / load_from). The model is unchanged.')
    _refuse_non_finite_weights(model)
    world_size = _distributed_world(process_group)
    device = next(iter(layers.values())).running_mean.device
    accumulators = {
        name: ChannelAccumulator(
            bn.running_mean,
            per_batch=world_size > 1 and var_mode == 'batch' and isinstance(bn, nn.SyncBatchNorm))
        for name, bn in layers.items()
    }

    num_batches = 0
    error: Optional[BaseException] = None
    failed, total = False, 0
    with torch.no_grad(), kept_modes(model), _collect_inputs(layers, accumulators):
        # the pretrained function; every module's own flag comes back afterwards (not just
        # the root's: norm_eval leaves submodules in eval mode on purpose)
        model.eval()
        iterator: Optional[Iterator[Any]] = None
        exhausted = False
        while True:
            active = False
            if not (error is not None or exhausted
                    or (max_batches is not None and num_batches >= max_batches)):
                try:
                    iterator = iter(batches) if iterator is None else iterator
                    batch = next(iterator)
                    forward(model, batch)
                    num_batches += 1
                    active = True
                    if progress is not None:
                        progress(num_batches)
                except StopIteration:
                    exhausted = True  # waits for the other ranks' passes
                except BaseException as exc:  # noqa: BLE001 - any kind, re-raised together
                    error = exc
            failed, more, total = _step_together(error, active, num_batches, world_size,
                                                 process_group, device)
            if failed or not more:
                break
    _raise_failure(error, failed, total)
    if world_size > 1:
        all_reduce_accumulators(list(accumulators.values()), group=process_group)

    unseen = [name for name, acc in accumulators.items() if acc.batches == 0]
    if len(unseen) == len(accumulators) and any(acc.empty_inputs for acc in accumulators.values()):
        raise ConversionError('every batch reaching the BN layers was empty (zero samples or zero '
                              'size), so there is nothing to measure; check the data pipeline '
                              '(filters that drop every sample, a batch size of 0). The model is '
                              'unchanged.')
    if len(unseen) == len(accumulators):
        raise ConversionError('the forward pass never reached a BN layer; check `forward` (does it '
                              'run the part of the model that holds them?). The model is unchanged.')
    for name in unseen:
        skipped[name] = 'not reached by the forward pass; statistics left as they were'
    moments: Dict[str, ChannelMoments] = {}
    for name, acc in accumulators.items():
        if acc.batches:
            try:
                moments[name] = acc.result(var_mode)
            except ValueError as exc:
                raise ConversionError(f'{name}: {exc}. The model is unchanged.') from exc

    updates, report = _plan_updates(layers, moments, keep_function)
    report.var_mode, report.num_batches, report.world_size = var_mode, num_batches, world_size
    report.skipped = skipped
    _apply(layers, updates)
    return report


# ---------------------------------------------------------------------------- atomic rewrite
_Update = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # mean, var, weight, bias


def _plan_updates(layers: Mapping[str, _BatchNorm], moments: Mapping[str, ChannelMoments],
                  keep_function: bool = True) -> Tuple[Dict[str, _Update], ConversionReport]:
    """Every new value, computed and checked before anything is written.

    The checks and the report's per-layer figures are gathered into one tensor and read back
    once: one device sync for the whole model, not several per layer (on a GPU each read-back
    waits for the device, and per layer they dominated the end of a short pass)."""
    updates: Dict[str, _Update] = {}
    figures = []
    for name, mom in moments.items():
        bn = layers[name]
        mu_old = bn.running_mean.detach().to(torch.float64)
        std_old = (bn.running_var.detach().to(torch.float64) + bn.eps).sqrt()
        std_new = (mom.var + bn.eps).sqrt()
        w = bn.weight.detach().to(torch.float64)
        b = bn.bias.detach().to(torch.float64)
        new_bias = b + (mom.mean - mu_old) * w / std_old if keep_function else b
        new_weight = w * std_new / std_old if keep_function else w
        updates[name] = (mom.mean, mom.var, new_weight, new_bias)
        shift = (mom.mean - mu_old).abs() / std_old
        finite = torch.stack([torch.isfinite(t).all() for t in updates[name]]).all()
        figures.append(torch.stack([finite.to(torch.float64), shift.mean(), shift.max(),
                                    (std_new / std_old).mean()]))
    report = ConversionReport(var_mode='', num_batches=0, world_size=1)
    rows = torch.stack(figures).cpu().tolist() if figures else []
    non_finite = [name for name, row in zip(moments, rows) if not row[0]]
    if non_finite:
        shown = ', '.join(non_finite[:5]) + (' ...' if len(non_finite) > 5 else '')
        raise ConversionError(
            f'non-finite statistics or parameters in {len(non_finite)} BN layer(s) ({shown}): '
            'the inputs contain NaN/Inf, or activations overflow. Check the data pipeline '
            '(normalisation, corrupt images). The model is unchanged.')
    for (name, mom), (_, mean_shift, max_shift, std_ratio) in zip(moments.items(), rows):
        report.layers.append(LayerReport(
            name=name, num_channels=layers[name].num_features, num_samples=mom.num_samples,
            num_values=mom.num_values, num_batches=mom.num_batches, mean_shift=mean_shift,
            max_mean_shift=max_shift, std_ratio=std_ratio))
    return updates, report


def _apply(layers: Mapping[str, _BatchNorm], updates: Mapping[str, _Update]) -> None:
    with torch.no_grad():
        for name, (mean, var, weight, bias) in updates.items():
            bn = layers[name]
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)

