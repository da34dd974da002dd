"""Fine-tune and evaluate a torch classifier with FT, LP, LP-FT or DAFT.

Every DAFT-specific step comes from ``daft_mm.core`` (``prepare`` with a ``make_plan``,
``split_param_groups``, ``new_modules``, the recipes); this module
is only the loop around them: SGD with momentum, a cosine or constant schedule per stage, and
cross-entropy on ``(inputs, targets)`` batches.

Two names say what "the head" is. ``head_names`` are the final predictors: DAFT zeroes them
and nothing else. The stage's ``head_scope`` says which modules train at ``lr x
head_lr_mult`` (and alone, under LP): the predictors, or every module that is new to the
pretrained model (``pretrained`` names the rest).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from daft_mm.core import (ConversionReport, FineTuneRecipe, FineTuneStage, find_predictors,
                          flush_subnormals, freeze_feature_extractor, get_recipe, kept_modes,
                          make_plan, prepare, resolve_modules, set_bn_eval, split_batchnorms,
                          split_param_groups)
from daft_mm.core import head_modules as core_head_modules

__all__ = ['SCHEDULES', 'StageLog', 'StepInfo', 'FineTuneRun', 'finetune', 'evaluate',
           'evaluate_loss', 'head_modules', 'default_pretrained']

SCHEDULES = ('cosine', 'constant')


@dataclass
class StageLog:
    """What one stage did: enough to tell from a result file how a number came about."""

    name: str
    iters: int
    lr: float
    head_lr: float
    trainable_params: int
    head_scope: str = 'predictors'
    head_modules: list[str] = field(default_factory=list)  # what trained at head_lr
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class StepInfo:
    """Handed to ``finetune(on_step=...)`` after the backward pass, before the optimizer step:
    a caller can check or record the head state and the LRs each step actually uses."""

    stage: str
    step: int  # 1-based within the stage
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: float


@dataclass
class FineTuneRun:
    """The fine-tuned model (trained in place) and a record of the run."""

    model: nn.Module
    recipe: FineTuneRecipe
    stages: list[StageLog] = field(default_factory=list)
    bn_conversion: ConversionReport | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            'method': self.recipe.name,
            'stages': [vars(stage) for stage in self.stages],
            'bn_conversion': None if self.bn_conversion is None else self.bn_conversion.to_dict(),
        }


def _split_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
        raise TypeError('train/test loaders must yield (inputs, targets) pairs, got '
                        f'{type(batch).__name__}')
    return batch[0].to(device), batch[1].to(device)


def _forever(loader: Iterable[Any]) -> Iterator[Any]:
    """Restart the loader at its end, so stages count iterations, not epochs."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError('the training loader yielded no batch')


def default_pretrained(model: nn.Module, head_names: str | Sequence[str]) -> list[str]:
    """The modules a fine-tuning run treats as pretrained when the caller does not say.

    ``['backbone']`` for the OpenMMLab layout; otherwise every top-level module that holds
    none of the predictors (torchvision's ResNet: all but ``fc``). A model with other new
    layers (a fresh neck next to ``fc``) must name its pretrained modules itself, or those
    layers count as pretrained.
    """
    children = dict(model.named_children())
    if 'backbone' in children:
        return ['backbone']
    inside = {id(m) for head in resolve_modules(model, head_names).values()
              for m in head.modules()}
    return [name for name, child in children.items()
            if not any(id(m) in inside for m in child.modules())]


def head_modules(model: nn.Module, head_names: str | Sequence[str], scope: str,
                 pretrained: str | Sequence[str] | None = None) -> list[str]:
    """The modules that form the head under ``scope`` (see ``HEAD_SCOPES``)."""
    if pretrained is None and scope == 'new_modules':
        pretrained = default_pretrained(model, head_names)
    return core_head_modules(model, head_names, scope, pretrained or ())


def _stage_iters(recipe: FineTuneRecipe, iters: int, lp_iters: int | None) -> list[int]:
    # Every stage before the last is a warm-up of the head (LP in LP-FT).
    earlier = iters if lp_iters is None else lp_iters
    counts = [earlier] * (len(recipe.stages) - 1) + [iters]
    if min(counts) < 1:
        raise ValueError(f'iteration counts must be >= 1, got {counts}')
    return counts


def _scheduler(optimizer: torch.optim.Optimizer, schedule: str, iters: int,
               warmup_iters: int) -> Any:
    """Cosine (or constant) decay over the stage, after a linear warm-up from 0 when asked: a
    zero head at a high LR multiplier can diverge in its first steps, before it fits."""
    if not warmup_iters:  # torch's own cosine, as before warm-up existed
        return (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iters)
                if schedule == 'cosine' else None)
    import math

    def factor(step: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * step / iters)) if schedule == 'cosine' else 1.0
        return decay * min(1.0, (step + 1) / warmup_iters)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_stage(model: nn.Module, batches: Iterator[Any], stage: FineTuneStage, *,
                 iters: int, lr: float, head: Sequence[str], momentum: float,
                 weight_decay: float, schedule: str, device: torch.device,
                 log: Callable[[str], None] | None, log_interval: int,
                 on_step: Callable[[StepInfo], None] | None,
                 warmup_iters: int = 0) -> StageLog:
    frozen = freeze_feature_extractor(model, head) if stage.freeze_feature_extractor else []
    try:
        groups = split_param_groups(model, head, lr=lr, head_lr=lr * stage.head_lr_mult)
        record = StageLog(stage.name, iters, lr, lr * stage.head_lr_mult,
                          sum(p.numel() for g in groups for p in g['params']),
                          head_scope=stage.head_scope, head_modules=list(head))
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
        scheduler = _scheduler(optimizer, schedule, iters, warmup_iters)
        model.train()
        if not stage.bn_train:
            set_bn_eval(model)
        start = time.perf_counter()
        for step in range(1, iters + 1):
            inputs, targets = _split_batch(next(batches), device)
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if on_step is not None:
                on_step(StepInfo(stage.name, step, model, optimizer, float(loss.detach())))
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            record.losses.append(float(loss.detach()))
            if log is not None and (step % log_interval == 0 or step == iters):
                log(f'[{stage.name}] iter {step}/{iters} loss {record.losses[-1]:.4f}')
        record.seconds = time.perf_counter() - start
        return record
    finally:
        # Undo exactly this stage's freezing, so the next stage (or the caller) sees
        # the model's own requires_grad flags again.
        for name in frozen:
            model.get_parameter(name).requires_grad_(True)


def finetune(model: nn.Module, train_loader: Iterable[Any], *, method: str | FineTuneRecipe,
             iters: int, lr: float, head_names: Sequence[str] = ('fc',),
             head_lr_mult: float | None = None, head_scope: str | None = None,
             pretrained: str | Sequence[str] | None = None, lp_iters: int | None = None,
             lp_lr: float | None = None,
             momentum: float = 0.9, weight_decay: float = 1e-4, schedule: str = 'cosine',
             warmup_iters: int = 0,
             bn_max_batches: int | None = None, bn_loader: Iterable[Any] | None = None,
             device: str | torch.device = 'cpu',
             seed: int | None = None, log: Callable[[str], None] | None = None,
             log_interval: int = 50,
             on_step: Callable[[StepInfo], None] | None = None) -> FineTuneRun:
    """Fine-tune ``model`` in place on ``(inputs, targets)`` batches with one of the methods.

    Args:
        method: ``'ft'``, ``'lp'``, ``'lp-ft'``, ``'daft'`` or a custom recipe.
        iters: iterations of the last (for single-stage methods: the only) stage.
        lr: base learning rate (the feature extractor's).
        head_names: the final predictor(s), as module paths or fnmatch patterns; zeroed
            by DAFT, trained alone by LP, given ``lr * head_lr_mult``.
        head_lr_mult: overrides every stage's head LR multiplier (default: the
            recipe's, e.g. 10 for DAFT and 1 for the baselines).
        head_scope: overrides every stage's head scope (``'predictors'`` or
            ``'new_modules'``): which modules take the head LR and train alone under LP.
            Zero-init always touches ``head_names`` only.
        lp_iters: iterations of the stages before the last (LP in LP-FT); default ``iters``.
        lp_lr: base LR of the stages before the last (LP-FT's probe); default ``lr``.
        pretrained: the pretrained modules, from which ``'new_modules'`` is derived and whose
            BN layers DAFT converts (default: :func:`default_pretrained`); BN layers outside
            them stay as initialised (:func:`daft_mm.core.split_batchnorms`).
        weight_decay: SGD weight decay (1e-4, as ``tools/train_cls.py`` and the benchmark).
        warmup_iters: a linear LR warm-up from 0 over the first iterations of every stage.
        bn_max_batches: how many batches DAFT's BN conversion measures (default: one pass).
        bn_loader: the batches of the statistics pass; default ``train_loader``. A training
            loader with ``drop_last`` skips the last images: pass a loader over the whole
            training set that does not drop them.
        seed: seeds torch's RNG first (shuffling, augmentation), for comparable runs.
        on_step: called every step after the backward pass, before the optimizer step.
    """
    recipe = get_recipe(method) if isinstance(method, str) else method
    if schedule not in SCHEDULES:
        raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
    if not isinstance(warmup_iters, int) or warmup_iters < 0:
        raise ValueError(f'warmup_iters must be an int >= 0, got {warmup_iters!r}')
    counts = _stage_iters(recipe, iters, lp_iters)
    if seed is not None:
        torch.manual_seed(seed)
    device = torch.device(device)
    head_names = [head_names] if isinstance(head_names, str) else list(head_names)
    if head_scope is not None or head_lr_mult is not None:
        overrides = {k: v for k, v in (('head_scope', head_scope), ('head_lr_mult', head_lr_mult))
                     if v is not None}
        recipe = replace(recipe, stages=tuple(replace(stage, **overrides)
                                              for stage in recipe.stages))
    # Bad head names (or pretrained names) must fail before BN conversion rewrote the model.
    zero_head = any(stage.zero_init_head for stage in recipe.stages)
    if zero_head:
        find_predictors(model, head_names)
    else:
        resolve_modules(model, head_names)
    heads = {scope: head_modules(model, head_names, scope, pretrained)
             for scope in {stage.head_scope for stage in recipe.stages}}
    pretrained_modules = (default_pretrained(model, head_names) if pretrained is None
                          else [pretrained] if isinstance(pretrained, str) else list(pretrained))
    if recipe.uses_bn_conversion:  # a wrong name fails before anything changed
        split_batchnorms(model, pretrained_modules)
    model.to(device)
    run = FineTuneRun(model, recipe)
    batches = _forever(train_loader)
    with flush_subnormals(zero_head and device.type == 'cpu'):
        last = len(recipe.stages) - 1
        for index, (stage, stage_iters) in enumerate(zip(recipe.stages, counts)):
            if stage.convert_bn or stage.zero_init_head:
                plan = make_plan(model, pretrained=pretrained_modules,
                                 predictors=head_names if stage.zero_init_head else (),
                                 convert=stage.convert_bn, zero_init=stage.zero_init_head,
                                 convert_scope=stage.convert_scope)
                done = prepare(model, train_loader if bn_loader is None else bn_loader, plan,
                               max_batches=bn_max_batches,
                               forward=lambda m, batch: m(_split_batch(batch, device)[0]))
                if done.report is not None:
                    run.bn_conversion = done.report
                    if log is not None:
                        log(run.bn_conversion.summary())
            stage_lr = lr if lp_lr is None or index == last else lp_lr
            run.stages.append(_train_stage(
                model, batches, stage, iters=stage_iters, lr=stage_lr,
                head=heads[stage.head_scope], momentum=momentum, weight_decay=weight_decay,
                schedule=schedule, device=device, log=log, log_interval=log_interval,
                on_step=on_step, warmup_iters=warmup_iters))
    return run


def evaluate(model: nn.Module, loader: Iterable[Any], *,
             device: str | torch.device = 'cpu') -> float:
    """Top-1 accuracy in [0, 1]; every module's train/eval flag is restored afterwards."""
    return evaluate_loss(model, loader, device=device)[0]


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: Iterable[Any], *,
                  device: str | torch.device = 'cpu') -> tuple[float, float]:
    """``(top-1 accuracy, mean cross-entropy)``: the loss breaks accuracy ties in a selection
    on a small validation split. Module modes are restored as by :func:`evaluate`."""
    device = torch.device(device)
    correct = total = 0
    loss = 0.0
    with kept_modes(model):
        model.eval()
        for batch in loader:
            inputs, targets = _split_batch(batch, device)
            logits = model(inputs)
            correct += int((logits.argmax(dim=1) == targets).sum())
            loss += float(F.cross_entropy(logits, targets, reduction='sum'))
            total += int(targets.numel())
    if total == 0:
        raise ValueError('the evaluation loader yielded no sample')
    return correct / total, loss / total
