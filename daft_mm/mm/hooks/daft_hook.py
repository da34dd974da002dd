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

import copy
import json
import os.path as osp
from contextlib import ExitStack
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop
from mmengine.runner.checkpoint import weights_to_cpu
from mmengine.utils import ProgressBar
from torch import nn
from torch.utils.data import DataLoader

from daft_mm.core import VAR_MODES, find_batchnorms, flush_subnormals, resolve_modules

from ..models.daft_model import DAFTModel
from ..preparation import (bad_samples, count_batches, mm_forward, one_pass_loader, prepare,
                           require_bn_train)
from ..schedules import keep_lr_ratio
from ..settings import (DAFTPlan, checkpoint_pretrained, decide_plan, describe_lrs,
                        predictor_lr_cfg, unwrap)

__all__ = ['DAFTHook']

_CKPT_KEY = 'daft'
#: written to the work dir once the preparation is done: the start of a DAFT run, the reference
#: ``tools/analyze_distortion.py --reference-converted`` compares against
CONVERTED_CHECKPOINT = 'converted.pth'


@HOOKS.register_module()
class DAFTHook(Hook):
    """Convert BatchNorm to the target data and zero the final predictors before training.

    Settings read from the whole config at start-up (``before_run``, training only), so a child
    config or ``--cfg-options`` that changes them takes effect: ``daft_predictors`` and
    ``daft_head_lr_mult`` (top-level keys of ``configs/_base_/daft.py``). The predictors' LR
    multiplier is added to ``optim_wrapper.paramwise_cfg.custom_keys`` there (the optimizer and
    the LR schedulers are rebuilt through the Runner), and the effective LRs are logged.

    Args:
        predictors: final predictor layers to zero (module paths / globs of the segmentor or
            detector, e.g. ``['decode_head.conv_seg', 'auxiliary_head.conv_seg']``). Default: the
            config's ``daft_predictors``, else the ``DAFTModel``'s predictors, else the head table
            (:mod:`daft_mm.mm.predictors`); a dict ``{head class: [layers]}`` adds entries to that
            table. Each starts at weight 0 and the bias its head's own init gives (the prior of a
            sigmoid/focal classifier), else 0.
        convert: run the BN conversion (``False``: zero-init only, an ablation).
        zero_init: zero the predictors (``False``: keep them, to fine-tune further from a trained
            DAFT checkpoint; the head keeps its LR multiplier. The conversion-only ablation is
            ``DAFTModel(method='daft-convert-only')``).
        dataloader: a dataloader config for the statistics pass; default: the training dataset
            with its training pipeline and batch size, one pass, as a finite loader (the
            training loader's ``InfiniteSampler`` never ends).
        num_batches: at most this many batches per rank (default: one pass over the data).
        var_mode: ``'batch'`` or ``'population'``, see :func:`daft_mm.core.convert_bn`.
        modules: which BN layers to convert (module paths); default: those whose weights came
            from pretrained weights (a backbone's ``init_cfg`` / ``model.pretrained``, and every
            module ``load_from`` holds with the same shapes); the BN layers of new modules (a
            fresh decode head) stay as initialised. The config key ``daft_convert_modules``
            (a list, or ``'all'``) sets the same; see :func:`daft_mm.mm.settings.conversion_plan`.
        forward_mode: model mode of the statistics pass: ``'loss'`` (every module a training step
            runs, auxiliary heads included) or ``'tensor'``.
        skip_incompatible: leave BN layers without affine/running stats as they are.
        check_lr: at start-up, require the predictors' LR above the rest (``paramwise_cfg``) and
            no LR scheduler with an absolute ``eta_min > 0`` (it erases that ratio).
        flush_subnormals: on the CPU, flush subnormal floats to zero during training (see
            :func:`daft_mm.core.flush_subnormals`: zero predictors otherwise slow the first
            steps ~20x on x86).
        save_converted: write the model right after the preparation to
            ``<work_dir>/converted.pth`` (main process, once per run; not on resume).
        progress_bar: an mmengine ProgressBar over the statistics pass (main process); off for
            runs that report progress themselves (``tools/compare.py`` runs several at once).
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
                 flush_subnormals: bool = True,
                 save_converted: bool = True,
                 progress_bar: bool = True) -> None:
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
        self.save_converted = save_converted
        self.progress_bar = progress_bar
        self.effective_lrs: Dict[str, List[float]] = {}  # start-up LR per predictor / module
        #: what this run does, decided in before_run (settings.DAFTPlan); None before
        self.plan: Optional[DAFTPlan] = None
        self._during_training = ExitStack()  # settings held from before_train to after_train
        self._state: Dict[str, Any] = {}  # what is done; saved with every checkpoint
        self._loaded_state: Optional[Dict[str, Any]] = None
        self._loaded_checkpoint = False

    # ----------------------------------------------------------------------- model access
    @staticmethod
    def _models(runner: Any) -> Tuple[nn.Module, nn.Module, str]:
        """(outer model, the segmentor/detector, config key prefix of the latter)."""
        model = unwrap(runner.model)  # DDP, and TTA models in tools/test.py --tta
        if isinstance(model, DAFTModel):
            return model, model.model, 'model.model.'
        return model, model, 'model.'

    @property
    def conversion_plan(self):
        """The plan's BN conversion (which layers are converted, which left as new)."""
        return None if self.plan is None else self.plan.conversion

    # ----------------------------------------------------------------------- start-up checks
    def before_run(self, runner: Any) -> None:
        """Config mistakes fail here, before any data is read, naming the key and the fix; the
        DAFT settings are read from the final config and the predictors' LR derived from them.

        Only when the Runner trains: ``tools/test.py`` (with or without ``--tta``) runs the same
        config, hooks included, and there is nothing to prepare or check then."""
        if not isinstance(getattr(runner, '_train_loop', None), BaseLoop):
            return
        model, net, key = self._models(runner)
        plan = self.plan = decide_plan(runner.cfg, model, net, predictors=self.predictors,
                                       convert=self.convert, zero_init=self.zero_init,
                                       modules=self.modules)
        if plan.head_lr:
            # the predictors too: a legacy per-predictor entry with another multiplier is a
            # conflict to report, not a silent exception inside the head
            self._apply_head_lr_mult(runner, list(dict.fromkeys(plan.head_modules
                                                                + plan.predictors)))
            self._keep_lr_ratio(runner)
            if self.check_lr:
                self._check_lr(runner, net)
        if plan.convert:
            if plan.convert_override is not None:
                modules, where = plan.convert_override
                try:
                    find_batchnorms(net, None if modules is None else list(modules))
                except ValueError as exc:
                    raise ValueError(f'{where}: {exc}') from None
            require_bn_train(net, key, 'DAFT (on the converted statistics)')
        runner.logger.info('DAFTHook: ' + plan.summary())

    def _apply_head_lr_mult(self, runner: Any, names: Sequence[str]) -> None:
        """Give the predictors ``daft_head_lr_mult`` through ``paramwise_cfg.custom_keys``: when
        the config lacks those entries, rebuild the optimizer wrapper and the LR schedulers from
        the completed config with the Runner's own builders (nothing has stepped yet, and a
        resumed state is loaded after ``before_run``)."""
        optim_cfg = runner.cfg.get('optim_wrapper')
        if not isinstance(optim_cfg, Mapping) or 'optimizer' not in optim_cfg:
            return  # a Runner built without a config, or several optimizers: checked only
        mult, source = self.plan.head_lr_mult, self.plan.head_lr_mult_from
        new_cfg = predictor_lr_cfg(optim_cfg, names, mult, source)
        if new_cfg is None:
            return
        runner.optim_wrapper = runner.build_optim_wrapper(new_cfg)
        runner.scale_lr(runner.optim_wrapper, runner.auto_scale_lr)
        if runner.param_schedulers is not None and runner.cfg.get('param_scheduler') is not None:
            runner.param_schedulers = runner.build_param_scheduler(
                copy.deepcopy(runner.cfg.param_scheduler))
        runner.logger.info(f'DAFTHook: {list(names)} ({self.plan.head_scope}) train at {mult:g}x '
                           f'the base LR ({source}): added to '
                           'optim_wrapper.paramwise_cfg.custom_keys')

    @staticmethod
    def _keep_lr_ratio(runner: Any) -> None:
        """Stock schedules (PolyLR ``eta_min=1e-4``) keep the head/backbone ratio down to their
        floor (:func:`daft_mm.mm.schedules.keep_lr_ratio`); a floor that cannot be kept per group
        is refused."""
        schedulers = runner.param_schedulers or []
        if isinstance(schedulers, dict):
            schedulers = [s for group in schedulers.values() for s in group]
        for note in keep_lr_ratio(schedulers):
            runner.logger.info(f'DAFTHook: {note}')

    def _check_lr(self, runner: Any, net: nn.Module) -> None:
        """Predictors above the rest; logs the start LR of each predictor and of each top-level
        module's other parameters."""
        optim_wrapper = runner.optim_wrapper
        optimizer = getattr(optim_wrapper, 'optimizer', None)
        if optimizer is None:  # OptimWrapperDict (several optimizers): no single ratio to check
            return
        names = list(self.plan.predictors)
        owner: Dict[int, str] = {}
        for top, module in net.named_children():
            for p in module.parameters():
                owner[id(p)] = top
        # Most specific last: a predictor inside a head module is reported under its own name.
        head_names = set()
        for group in (list(self.plan.head_modules), names):
            for name, module in (resolve_modules(net, list(group)).items() if group else ()):
                head_names.add(name)
                for p in module.parameters():
                    owner[id(p)] = name
        head_lr, rest_lr = [], []
        effective: Dict[str, List[float]] = {}
        for group in optimizer.param_groups:
            lr = group.get('initial_lr', group['lr'])
            for p in group['params']:
                where = owner.get(id(p), 'other')
                effective.setdefault(where, []).append(lr)
                (head_lr if where in head_names else rest_lr).append(lr)
        self.effective_lrs = dict(sorted(effective.items(),
                                         key=lambda kv: (kv[0] not in head_names, kv[0])))
        if head_lr and rest_lr and min(head_lr) <= max(rest_lr):
            raise ValueError(
                f'the head {sorted(head_names)} trains with lr {min(head_lr):g}, not above the '
                f'rest of the model ({max(rest_lr):g}); DAFT trains it with an LR far above the '
                f"backbone's. Effective LRs: {describe_lrs(self.effective_lrs)}. Fix: "
                'daft_head_lr_mult=10 (DAFTHook derives optim_wrapper.paramwise_cfg from it), or '
                'DAFTHook(check_lr=False) to train them at one LR')
        source = f'{self.plan.head_lr_mult:g} from {self.plan.head_lr_mult_from}'
        runner.logger.info(f'DAFTHook: effective start LRs (predictors: {source}): '
                           + describe_lrs(self.effective_lrs))

    # ----------------------------------------------------------------------- checkpoint state
    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        checkpoint[_CKPT_KEY] = dict(self._state)

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        # Called for resume and for load_from alike; before_train tells them apart by the
        # iteration the runner starts from.
        self._refuse_non_daft_resume(runner, checkpoint)
        self._loaded_checkpoint = True
        self._loaded_state = checkpoint.get(_CKPT_KEY)
        if self.plan is not None and not getattr(runner, '_resume', False):
            # load_from a whole model: every module it holds (same shapes) is pretrained
            net = self._models(runner)[1]
            source = runner.cfg.get('load_from') if hasattr(runner, 'cfg') else None
            loaded = checkpoint_pretrained(net, checkpoint.get('state_dict', checkpoint),
                                           str(source or 'checkpoint'))
            if loaded and self.plan.convert:  # the start-up block could not know this yet
                self.plan = self.plan.with_checkpoint(net, loaded)
                runner.logger.info('DAFTHook: with load_from, ' + self.plan.conversion.summary())

    @staticmethod
    def _refuse_non_daft_resume(runner: Any, checkpoint: dict) -> None:
        """Resuming a checkpoint that was not trained with DAFT fails here, in
        ``Runner.load_checkpoint``, before its optimizer state is loaded: an FT optimizer has
        other parameter groups, and torch's own error would hide the reason."""
        if not getattr(runner, '_resume', False) or (checkpoint.get(_CKPT_KEY) or {}).get('done'):
            return
        meta = checkpoint.get('meta') or {}
        if not (meta.get('iter') or meta.get('epoch')):
            return  # a step-0 checkpoint: nothing trained yet, the preparation runs as usual
        raise RuntimeError(
            f"resuming at iter {meta.get('iter', 0)} from a checkpoint without DAFTHook state: it "
            'was not trained with DAFT, and converting BN or zeroing predictors in the middle of '
            'training would break it. Fix: start DAFT from those weights with '
            'load_from=<checkpoint> (and resume=False), or resume a DAFT checkpoint')

    # ----------------------------------------------------------------------- the preparation
    def before_train(self, runner: Any) -> None:
        model, net, _ = self._models(runner)
        plan = self.plan
        on_cpu = next(net.parameters()).device.type == 'cpu'
        if self.flush_subnormals and plan.zero_init and on_cpu:
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
        self._refuse_second_preparation(runner)

        loader = bar = None
        if plan.convert and plan.conversion.converted:
            loader, total = self._build_loader(runner)
            show = self.progress_bar and is_main_process() and total
            bar = ProgressBar(total) if show else None
        elif plan.convert:
            runner.logger.warning(
                'DAFTHook: no BatchNorm layer is converted: no module with BN loaded pretrained '
                'weights (no Pretrained init_cfg / model.pretrained, no load_from holding them). '
                'BN conversion keeps a *pretrained* function; from random weights there is none, '
                'and the run is integrated LP+FT alone. Fix: load the pretrained weights '
                "(model.backbone.init_cfg=dict(type='Pretrained', checkpoint=...) or load_from), "
                'or daft_convert_modules=[...] to convert chosen modules anyway'
                + ''.join(f'. {note}' for note in plan.conversion.notes))
        done = prepare(net, loader, plan, num_batches=self.num_batches, var_mode=self.var_mode,
                       forward_mode=self.forward_mode, skip_incompatible=self.skip_incompatible,
                       progress=(lambda _: bar.update()) if bar is not None else None)
        if bar is not None:
            bar.file.write('\n')
        state: Dict[str, Any] = {'done': True, 'plan': plan.to_dict()}
        if plan.convert:
            state['converted_layers'] = 0
        if done.report is not None:
            runner.logger.info('DAFTHook: ' + done.report.summary())
            self._visualize(runner, done.report)
            if is_main_process():
                with open(osp.join(runner.log_dir, 'daft_bn_conversion.json'), 'w') as f:
                    json.dump(dict(done.report.to_dict(), plan=plan.conversion.to_dict()), f,
                              indent=1)
            state['converted_layers'] = len(done.report.layers)
            state['num_batches'] = done.report.num_batches
        if plan.zero_init:
            runner.logger.info(f'DAFTHook: zero-initialised predictors {done.zeroed}')
            state['zeroed'] = done.zeroed
        self._state = state
        if isinstance(model, DAFTModel):
            model.prepared = True
        if self.save_converted and is_main_process():
            self._save_converted(runner, net, state)
        runner.logger.info(self.startup_block(done))

    def startup_block(self, done: Any) -> str:
        """The run's DAFT settings as one framed block, logged last before the first step: the
        start-up log holds the config dump (hundreds of lines) and the per-part lines above; this
        is the part to read."""
        plan = self.plan
        lines = [f'method {plan.method}: ' + ', '.join(
            part for part, on in (('BN conversion', plan.convert),
                                  ('zero predictors', plan.zero_init),
                                  (f'head at {plan.head_lr_mult:g}x the base LR', plan.head_lr))
            if on)]
        if plan.conversion is not None:
            conv = plan.conversion
            pretrained = ', '.join(path or '(whole model)' for path, _ in conv.pretrained[:4])
            batches = ''
            if done.report is not None:
                images = done.report.layers[0].num_samples if done.report.layers else 0
                batches = (f' over {done.report.num_batches} batch(es) per rank, {images} '
                           'image(s) in all')
            lines.append(f'BN converted: {len(conv.converted)} layer(s){batches} (pretrained: '
                         f'{pretrained or "none"}; decided by {conv.decided_by}); left as '
                         f'initialised: {len(conv.left_new)}')
            lines += [f'NOTE {note}' for note in conv.notes]
        if plan.zero_init:
            lines.append(f'predictors zeroed: {", ".join(done.zeroed)}')
        if plan.head_lr:
            lines.append(f'head ({plan.head_scope}, {plan.head_lr_mult_from}): '
                         f'{", ".join(plan.head_modules)}')
        if self.effective_lrs:
            lines.append(f'effective start LRs: {describe_lrs(self.effective_lrs)}')
        heading = f'{"=" * 30} DAFT start-up {"=" * 30}'
        return '\n'.join([heading] + [f'  {line}' for line in lines] + ['=' * len(heading)])

    @staticmethod
    def _visualize(runner: Any, report: Any) -> None:
        """Per converted layer, how far its statistics moved, as scalars of the runner's
        visualizer (TensorBoard, the local backend...): ``daft_bn/<layer>/mean_shift`` and
        ``daft_bn/<layer>/std_ratio``, at the step the preparation ran."""
        visualizer = getattr(runner, 'visualizer', None)
        if visualizer is None or not report.layers:
            return
        scalars = {}
        for layer in report.layers:
            scalars[f'daft_bn/{layer.name}/mean_shift'] = float(layer.mean_shift)
            scalars[f'daft_bn/{layer.name}/std_ratio'] = float(layer.std_ratio)
        visualizer.add_scalars(scalars, step=runner.iter)

    @staticmethod
    def _save_converted(runner: Any, net: nn.Module, state: Dict[str, Any]) -> None:
        """``<work_dir>/converted.pth``: the model right after BN conversion and zero init, in
        the stock keys, the reference of ``tools/analyze_distortion.py --reference-converted``."""
        path = osp.join(runner.work_dir, CONVERTED_CHECKPOINT)
        torch.save({'meta': {'daft': dict(state), 'iter': runner.iter},
                    'state_dict': weights_to_cpu(net.state_dict())}, path)
        runner.logger.info(f'DAFTHook: the converted model (the start of this run) is saved to '
                           f'{path}')

    def _refuse_second_preparation(self, runner: Any) -> None:
        """``load_from`` a checkpoint that already went through DAFT (it carries the hook's state):
        zeroing its predictors would throw away what they learnt, and the BN layers were converted
        already. Refused, unless the config says to keep the predictors (``zero_init=False``)."""
        state = self._loaded_state if self._loaded_checkpoint else None
        if not state or not state.get('done'):
            return
        source = runner.cfg.get('load_from') if hasattr(runner, 'cfg') else None
        done = (f"converted {state.get('converted_layers', '?')} BN layers, zeroed "
                f"{state.get('zeroed', '?')}")
        if self.plan.zero_init:
            hooks = list(runner.cfg.get('custom_hooks') or []) if hasattr(runner, 'cfg') else []
            index = next((i for i, h in enumerate(hooks) if isinstance(h, Mapping)
                          and str(h.get('type', '')).split('.')[-1] == 'DAFTHook'), 0)
            raise RuntimeError(
                f'DAFTHook: load_from={source} is a checkpoint that already went through DAFT '
                f'({done}) and was trained since; preparing it again would zero its trained '
                'predictors. Fix: --resume (or resume=True) to continue that run where it '
                f'stopped, or --cfg-options custom_hooks.{index}.zero_init=False to fine-tune '
                'further from its weights (the predictors are kept and the head keeps its LR; BN '
                'is re-centred on this data, the function kept)')
        runner.logger.warning(
            f'DAFTHook: load_from={source} already went through DAFT ({done}); zero_init=False '
            'keeps its trained predictors, and BN is re-centred on this data (function kept)')

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        """Name the file of a bad label map before the loss meets it: mmseg fails on it with
        "Target 25 is out of bounds" or "stack expects each tensor to be equal size", naming no
        file (the statistics pass checks every batch it reads the same way)."""
        found = bad_samples(self._models(runner)[1], data_batch)
        if found:
            raise ValueError('bad annotation(s) in the training data: ' + '; '.join(found))

    def after_train(self, runner: Any) -> None:
        self._during_training.close()

    def _build_loader(self, runner: Any) -> Tuple[Any, int]:
        """A finite loader and the number of batches this rank runs (the same bound on every
        rank is not needed: the core pools whatever each rank saw)."""
        if self.dataloader is None:
            loader = one_pass_loader(runner.train_dataloader, runner.seed)
        elif isinstance(self.dataloader, dict):
            loader = runner.build_dataloader(self.dataloader, seed=runner.seed)
        else:
            loader = self.dataloader
        total = count_batches(loader, self.num_batches)
        if total < 1 and len(loader.dataset) == 0:
            raise ValueError(
                'DAFTHook: the dataset of the statistics pass is empty (0 samples): check '
                'data_root and the dataset\'s data_prefix / ann_file (or '
                'custom_hooks[DAFTHook].dataloader); DAFT measures BN statistics on target images')
        # A dataset smaller than the number of ranks leaves some ranks without a batch: they run
        # no forward but still take part in pooling the statistics (core.convert_bn sums them).
        return loader, total

