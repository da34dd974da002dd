"""DAFTHook: DAFT's preparation (BN conversion on the target training data, zero predictors),
once, before the first training step, in any mmengine Runner.

Timing. ``before_train`` runs after the pretrained weights are loaded (``init_cfg``/``load_from``)
or a checkpoint is resumed, and after the optimizer is built: parameters are edited in place, so
the optimizer (and DDP) keep holding the same tensors. State that says the preparation is done
travels in the checkpoint (``before_save_checkpoint`` / ``after_load_checkpoint``, as EMAHook
does), so ``--resume`` never converts or zeroes a second time.

The DAFT math lives in :mod:`daft_mm.core`; this file only feeds it mmengine data and reports.
"""
from __future__ import annotations

import json
import math
import os.path as osp
from contextlib import ExitStack
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from mmengine.dataset import DefaultSampler, InfiniteSampler
from mmengine.dist import get_dist_info, is_main_process
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from mmengine.utils import ProgressBar
from torch import nn
from torch.utils.data import DataLoader

from daft_mm.core import (VAR_MODES, convert_bn, find_batchnorms, flush_subnormals,
                          resolve_modules, zero_init_predictors)

from ..models.daft_model import (DAFTModel, check_predictors, mm_forward, predictor_names,
                                 predictor_priors, require_bn_train)

__all__ = ['DAFTHook']

_CKPT_KEY = 'daft'


@HOOKS.register_module()
class DAFTHook(Hook):
    """Convert BatchNorm to the target data and zero the final predictors before training.

    Args:
        predictors: final predictor layers to zero (module paths / globs of the segmentor or
            detector, e.g. ``['decode_head.conv_seg', 'auxiliary_head.conv_seg']``). Default: the
            ``DAFTModel``'s predictors, else the head table (:mod:`daft_mm.mm.predictors`); a dict
            ``{head class: [layers]}`` adds entries to that table. Each starts at weight 0 and the
            bias its head's own init gives (the prior of a sigmoid/focal classifier), else 0.
        convert: run the BN conversion (``False``: zero-init only, an ablation).
        zero_init: zero the predictors (``False``: conversion only, an ablation).
        dataloader: a dataloader config for the statistics pass; default: the training dataset
            with its training pipeline and batch size, one pass, as a finite loader (the
            training loader's ``InfiniteSampler`` never ends).
        num_batches: at most this many batches per rank (default: one pass over the data).
        var_mode: ``'batch'`` or ``'population'``, see :func:`daft_mm.core.convert_bn`.
        modules: which BN layers to convert (module paths); default all.
        forward_mode: model mode of the statistics pass: ``'loss'`` (every module a training step
            runs, auxiliary heads included) or ``'tensor'``.
        skip_incompatible: leave BN layers without affine/running stats as they are.
        check_lr: at start-up, require the predictors' LR above the rest (``paramwise_cfg``) and
            no LR scheduler with an absolute ``eta_min > 0`` (it erases that ratio).
        flush_subnormals: on the CPU, flush subnormal floats to zero during training (see
            :func:`daft_mm.core.flush_subnormals`: zero predictors otherwise slow the first
            steps ~20x on x86).
    """

    priority = 'ABOVE_NORMAL'  # before NORMAL hooks that may read the weights in before_train

    def __init__(self,
                 predictors: Union[None, Sequence[str], Dict[str, Sequence[str]]] = None,
                 convert: bool = True,
                 zero_init: bool = True,
                 dataloader: Optional[Union[dict, DataLoader]] = None,
                 num_batches: Optional[int] = None,
                 var_mode: str = 'batch',
                 modules: Optional[Sequence[str]] = None,
                 forward_mode: str = 'loss',
                 skip_incompatible: bool = False,
                 check_lr: bool = True,
                 flush_subnormals: bool = True) -> None:
        if var_mode not in VAR_MODES:
            raise ValueError(f'DAFTHook.var_mode must be one of {VAR_MODES}, got {var_mode!r}')
        if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f'DAFTHook.num_batches must be a positive int or None (one pass), '
                             f'got {num_batches!r}')
        if not (convert or zero_init):
            raise ValueError('DAFTHook with convert=False and zero_init=False does nothing; '
                             'remove the hook instead')
        if isinstance(predictors, str):
            predictors = [predictors]
        mm_forward(forward_mode)  # validates the mode now, at config time
        self.predictors = (predictors if predictors is None or isinstance(predictors, dict)
                           else list(predictors))
        self.convert = convert
        self.zero_init = zero_init
        self.dataloader = dataloader
        self.num_batches = num_batches
        self.var_mode = var_mode
        self.modules = [modules] if isinstance(modules, str) else modules
        self.forward_mode = forward_mode
        self.skip_incompatible = skip_incompatible
        self.check_lr = check_lr
        self.flush_subnormals = flush_subnormals
        self._during_training = ExitStack()  # settings held from before_train to after_train
        self._state: Dict[str, Any] = {}  # what is done; saved with every checkpoint
        self._loaded_state: Optional[Dict[str, Any]] = None
        self._loaded_checkpoint = False

    # ----------------------------------------------------------------------- model access
    @staticmethod
    def _models(runner: Any) -> Tuple[nn.Module, nn.Module, str]:
        """(outer model, the segmentor/detector, config key prefix of the latter)."""
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if isinstance(model, DAFTModel):
            return model, model.model, 'model.model.'
        return model, model, 'model.'

    def _predictor_names(self, model: nn.Module, net: nn.Module) -> List[str]:
        if self.predictors is None and isinstance(model, DAFTModel):
            return list(model.predictors)
        return predictor_names(net, self.predictors, 'custom_hooks[DAFTHook].predictors')

    # ----------------------------------------------------------------------- start-up checks
    def before_run(self, runner: Any) -> None:
        """Config mistakes fail here, before any data is read, naming the key and the fix."""
        model, net, key = self._models(runner)
        if isinstance(model, DAFTModel) and not (model.stage.convert_bn
                                                 or model.stage.zero_init_head):
            raise ValueError(
                f"DAFTHook is configured but model.method={model.method!r} does not use DAFT's "
                "preparation. Fix: set model.method='daft', or remove DAFTHook from custom_hooks")
        if self.zero_init:
            check_predictors(net, self._predictor_names(model, net),
                             'custom_hooks[DAFTHook].predictors')
        if self.convert:
            try:
                find_batchnorms(net, self.modules)
            except ValueError as exc:
                raise ValueError(f'custom_hooks[DAFTHook].modules: {exc}') from None
            require_bn_train(net, key, 'DAFT (on the converted statistics)')

    def _check_lr(self, runner: Any, model: nn.Module, net: nn.Module) -> None:
        optim_wrapper = runner.optim_wrapper
        optimizer = getattr(optim_wrapper, 'optimizer', None)
        if optimizer is None:  # OptimWrapperDict (several optimizers): no single ratio to check
            return
        names = self._predictor_names(model, net)
        head_ids = {id(p) for m in resolve_modules(net, names).values() for p in m.parameters()}
        head_lr, rest_lr = [], []
        for group in optimizer.param_groups:
            lr = group.get('initial_lr', group['lr'])
            for p in group['params']:
                (head_lr if id(p) in head_ids else rest_lr).append(lr)
        if head_lr and rest_lr and min(head_lr) <= max(rest_lr):
            keys = ', '.join(f"'{n}': dict(lr_mult=10.0)" for n in names)
            raise ValueError(
                f'optim_wrapper.paramwise_cfg: the predictors {names} train with lr '
                f'{min(head_lr):g}, not above the rest of the model ({max(rest_lr):g}); DAFT '
                "trains them with an LR far above the backbone's. Fix: optim_wrapper = "
                f'dict(paramwise_cfg=dict(custom_keys={{{keys}}})) (configs/_base_/daft.py '
                'defines daft_paramwise_cfg), or DAFTHook(check_lr=False) to train them at one LR')
        schedulers = runner.param_schedulers or []
        if isinstance(schedulers, dict):
            schedulers = [s for group in schedulers.values() for s in group]
        for i, sched in enumerate(schedulers):
            eta_min = getattr(sched, 'eta_min', None)
            if (getattr(sched, 'param_name', None) == 'lr' and eta_min
                    and getattr(sched, 'eta_min_ratio', None) is None and len(set(head_lr)
                                                                            | set(rest_lr)) > 1):
                raise ValueError(
                    f'param_scheduler[{i}] ({type(sched).__name__}, eta_min={eta_min:g}) decays '
                    f'every param group to the same absolute lr {eta_min:g}, which erases the '
                    'predictor/backbone LR ratio by the end of training. Fix: eta_min=0 (the '
                    'ratio then holds at every step; DAFT configs use it), or eta_min_ratio for '
                    'schedulers that have it (CosineAnnealingLR)')
        if head_lr and rest_lr:
            runner.logger.info(f'DAFTHook: predictors start at lr {min(head_lr):g}, the rest at '
                               f'most {max(rest_lr):g}')

    # ----------------------------------------------------------------------- checkpoint state
    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        checkpoint[_CKPT_KEY] = dict(self._state)

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        # Called for resume and for load_from alike; before_train tells them apart by the
        # iteration the runner starts from.
        self._loaded_checkpoint = True
        self._loaded_state = checkpoint.get(_CKPT_KEY)

    # ----------------------------------------------------------------------- the preparation
    def before_train(self, runner: Any) -> None:
        model, net, _ = self._models(runner)
        on_cpu = next(net.parameters()).device.type == 'cpu'
        if self.flush_subnormals and self.zero_init and on_cpu:
            self._during_training.enter_context(flush_subnormals())
        resumed = runner.iter > 0 or runner.epoch > 0
        if resumed:
            state = self._loaded_state
            if not state or not state.get('done'):
                raise RuntimeError(
                    f'resuming at iter {runner.iter} from a checkpoint without DAFTHook state: it '
                    'was not trained with DAFT, and converting BN or zeroing predictors in the '
                    'middle of training would break it. Fix: start DAFT from those weights with '
                    'load_from=<checkpoint> (and resume=False), or resume a DAFT checkpoint')
            self._state = dict(state)
            runner.logger.info(f'DAFTHook: resumed at iter {runner.iter}; BN conversion and '
                               'predictor init were done before, not repeated')
            if isinstance(model, DAFTModel):
                model.prepared = True
            return
        if self.check_lr and self.zero_init:
            self._check_lr(runner, model, net)

        state: Dict[str, Any] = {'done': False}
        if self.convert:
            loader, total = self._build_loader(runner)
            bar = ProgressBar(total) if is_main_process() else None
            report = convert_bn(
                net, loader, forward=mm_forward(self.forward_mode), max_batches=total,
                var_mode=self.var_mode, modules=self.modules,
                skip_incompatible=self.skip_incompatible,
                progress=(lambda _: bar.update()) if bar is not None else None)
            if bar is not None:
                bar.file.write('\n')
            runner.logger.info('DAFTHook: ' + report.summary())
            if is_main_process():
                with open(osp.join(runner.log_dir, 'daft_bn_conversion.json'), 'w') as f:
                    json.dump(report.to_dict(), f, indent=1)
            state['converted_layers'] = len(report.layers)
            state['num_batches'] = report.num_batches
        if self.zero_init:
            names = self._predictor_names(model, net)
            zeroed = zero_init_predictors(net, names, predictor_priors(net, names))
            runner.logger.info(f'DAFTHook: zero-initialised predictors {zeroed}')
            state['zeroed'] = zeroed
        state['done'] = True
        self._state = state
        if isinstance(model, DAFTModel):
            model.prepared = True

    def after_train(self, runner: Any) -> None:
        self._during_training.close()

    def _build_loader(self, runner: Any) -> Tuple[Any, int]:
        """A finite loader and the number of batches this rank runs (the same bound on every
        rank is not needed: the core pools whatever each rank saw)."""
        rank, world_size = get_dist_info()
        if self.dataloader is None:
            train = runner.train_dataloader
            dataset = train.dataset
            # A fresh, finite sampler over the training dataset: iterating the training loader
            # itself would never end (InfiniteSampler) and, with persistent workers, would reset
            # the iterator the training loop already holds.
            # mmdet trains with a batch sampler (AspectRatioBatchSampler): the loader's own
            # batch_size is None then, and the sampler's is the one that counts.
            batch_size = train.batch_size or getattr(train.batch_sampler, 'batch_size', None) or 1
            loader = DataLoader(
                dataset, batch_size=batch_size, num_workers=train.num_workers,
                sampler=DefaultSampler(dataset, shuffle=True, seed=runner.seed, round_up=False),
                collate_fn=train.collate_fn, worker_init_fn=train.worker_init_fn,
                persistent_workers=False)
        elif isinstance(self.dataloader, dict):
            loader = runner.build_dataloader(self.dataloader, seed=runner.seed)
        else:
            loader = self.dataloader
        sampler = getattr(loader, 'sampler', None)
        batch_sampler = getattr(loader, 'batch_sampler', None)
        infinite = isinstance(sampler, InfiniteSampler) or isinstance(
            getattr(batch_sampler, 'sampler', None), InfiniteSampler)
        if infinite:
            # One pass over the dataset, shared by the ranks.
            batch_size = loader.batch_size or getattr(batch_sampler, 'batch_size', 1)
            one_pass = math.ceil(len(loader.dataset) / (batch_size * world_size))
        else:
            one_pass = len(loader)
        total = min(one_pass, self.num_batches) if self.num_batches else one_pass
        if total < 1:
            raise ValueError(f'DAFTHook: the statistics loader has no batch on rank {rank} '
                             f'(dataset of {len(loader.dataset)} samples). Fix: give '
                             'custom_hooks[DAFTHook].dataloader a non-empty dataset')
        return loader, total

