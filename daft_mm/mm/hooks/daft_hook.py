"""DAFTHook: when DAFT's preparation happens in an mmengine Runner, and the state that says it did.

The plan was decided when the Runner built the optimizer (:mod:`daft_mm.mm.optim`); the
preparation is :func:`daft_mm.core.prepare`, run once in ``before_train``, after the weights are
loaded and the optimizer built (parameters are edited in place: the optimizer and DDP keep the
same tensors). Its state travels in every checkpoint, as EMAHook's does: ``--resume`` never
converts or zeroes a second time.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Dict, Optional, Sequence, Union

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from mmengine.runner import BaseLoop
from mmengine.utils import ProgressBar

from daft_mm.core import VAR_MODES, flush_subnormals, prepare

from .. import startup
from ..optim import check_head_lr, check_lr_floors, daft_settings, describe_lrs, effective_lrs
from ..plan import DAFTPlan, split_model
from ..predictors import predictor_priors
from ..preparation import bad_samples, mm_forward, naming_files, statistics_loader
from ..settings import check_daft_keys

__all__ = ['DAFTHook']

_CKPT_KEY = 'daft'


@HOOKS.register_module()
class DAFTHook(Hook):
    """Convert BatchNorm to the target data and zero the final predictors before training.

    Every DAFT setting of a run is documented here and in ``daft_mm/configs/_base_/daft.py``'s
    keys; the plan arguments (``predictors``, ``convert``, ``zero_init``, ``modules``) are read by
    the optimizer constructor with the ``daft_*`` keys, the others by this hook.

    Args:
        predictors: final predictor layers to zero (module paths / globs, e.g.
            ``['decode_head.conv_seg']``); default ``daft_predictors``, else the ``DAFTModel``'s,
            else the head table (:mod:`daft_mm.mm.predictors`); a dict ``{head class: [layers]}``
            adds table entries. Each starts at weight 0 and its head's prior bias (sigmoid/focal
            classifiers), else 0.
        convert: run the BN conversion (``False``: zero-init only, an ablation).
        zero_init: zero the predictors (``False``: keep them, to fine-tune further from a trained
            DAFT checkpoint; the head keeps its LR multiplier).
        dataloader: a dataloader config for the statistics pass; default: the training set with
            its pipeline and batch size, one pass, as a finite loader.
        num_batches: at most this many batches per rank (default: one pass).
        var_mode: ``'batch'`` or ``'population'`` (:func:`daft_mm.core.convert_bn`).
        modules: which BN layers to convert (module paths); default those that loaded pretrained
            weights (as ``daft_convert_modules``, which new configs use).
        forward_mode: model mode of the statistics pass: ``'loss'`` (every module a training step
            runs, auxiliary heads included) or ``'tensor'``.
        skip_incompatible: leave BN layers without affine/running stats as they are.
        check_lr: require the head's LR above the rest, and per-group LR floors.
        flush_subnormals: on the CPU, flush subnormal floats to zero while training (zero
            predictors otherwise slow the first steps ~20x on x86).
        save_converted: write the model right after the preparation to
            ``<work_dir>/converted.pth`` (main process, once per run; not on resume).
        progress_bar: an mmengine ProgressBar over the statistics pass (main process).
    """

    priority = 'ABOVE_NORMAL'  # before NORMAL hooks that may read the weights in before_train

    def __init__(self,
                 predictors: Union[None, Sequence[str], Dict[str, Sequence[str]]] = None,
                 convert: bool = True,
                 zero_init: bool = True,
                 dataloader: Optional[Any] = None,
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
        mm_forward(forward_mode)  # validates the mode now, at config time
        self.predictors, self.convert, self.zero_init = predictors, convert, zero_init
        self.modules = [modules] if isinstance(modules, str) else modules
        self.dataloader, self.num_batches, self.var_mode = dataloader, num_batches, var_mode
        self.forward_mode, self.skip_incompatible = forward_mode, skip_incompatible
        self.check_lr, self.flush_subnormals = check_lr, flush_subnormals
        self.save_converted, self.progress_bar = save_converted, progress_bar
        self.plan: Optional[DAFTPlan] = None  # the optimizer constructor's, read in before_run
        self.effective_lrs: Dict[str, Any] = {}
        self._during_training = ExitStack()  # settings held from before_train to after_train
        self._state: Dict[str, Any] = {}
        self._loaded_state: Optional[Dict[str, Any]] = None

    def before_run(self, runner: Any) -> None:
        """Take the plan the optimizer was built from; check it is still the config's. Only
        when the Runner trains (``tools/test.py`` runs the same hooks)."""
        if not isinstance(getattr(runner, '_train_loop', None), BaseLoop):
            return
        wrapper = runner.optim_wrapper
        self.plan = getattr(wrapper, 'daft_plan', None)
        if self.plan is None:
            raise RuntimeError(
                'DAFTHook: the optimizer was not built by DAFTOptimWrapperConstructor, so no DAFT '
                'plan decided its parameter groups. Fix: load the config with '
                'daft_mm.mm.cli.load_config (tools/train.py does), or call '
                'daft_mm.mm.optim.complete_daft_config(cfg) before Runner.from_cfg(cfg)')
        check_daft_keys(runner.cfg)  # a key misspelt after loading
        wanted = daft_settings(runner.cfg)
        if wrapper.daft_settings != wanted:
            raise RuntimeError(
                f'DAFTHook: the optimizer was built from the DAFT settings '
                f'{wrapper.daft_settings} but the config now says {wanted} (changed after it was '
                'completed). Fix: call daft_mm.mm.optim.complete_daft_config(cfg) after the last '
                'change, before Runner.from_cfg(cfg)')
        if self.plan.head_lr and self.check_lr:
            check_lr_floors(runner.param_schedulers)
            self.effective_lrs = effective_lrs(wrapper.optimizer, split_model(runner.model)[1],
                                               self.plan)
            check_head_lr(self.effective_lrs, self.plan)
            runner.logger.info(f'DAFTHook: effective start LRs (predictors: '
                               f'{self.plan.head_lr_mult:g} from {self.plan.head_lr_mult_from}): '
                               + describe_lrs(self.effective_lrs))
        runner.logger.info('DAFTHook: ' + self.plan.summary())

    def before_save_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        checkpoint[_CKPT_KEY] = dict(self._state)  # what is done travels with the checkpoint

    def after_load_checkpoint(self, runner: Any, checkpoint: dict) -> None:
        """Resume and ``load_from`` alike; a resume of a checkpoint not trained with DAFT fails
        here, before its optimizer state (other groups) meets ours."""
        self._loaded_state = checkpoint.get(_CKPT_KEY)
        meta = checkpoint.get('meta') or {}
        if getattr(runner, '_resume', False) and (meta.get('iter') or meta.get('epoch')):
            self._require_done(self._loaded_state, meta.get('iter', 0))

    @staticmethod
    def _require_done(state: Optional[dict], at: int) -> None:
        if not (state or {}).get('done'):
            raise RuntimeError(
                f'resuming at iter {at} from a checkpoint without DAFTHook state: it was not '
                'trained with DAFT, and converting BN or zeroing predictors in the middle of '
                'training would break it. Fix: start DAFT from those weights with '
                'load_from=<checkpoint> (and resume=False), or resume a DAFT checkpoint')

    def before_train(self, runner: Any) -> None:
        model, net, _ = split_model(runner.model)
        plan = self.plan
        if self.flush_subnormals and plan.zero_init and next(net.parameters()).is_cpu:
            self._during_training.enter_context(flush_subnormals())
        if runner.iter > 0 or runner.epoch > 0:
            self._require_done(self._loaded_state, runner.iter)
            self._state = dict(self._loaded_state)
            runner.logger.info(f'DAFTHook: resumed at iter {runner.iter}; BN conversion and '
                               'predictor init were done before, not repeated')
            if model is not net:
                model.prepared = True
            return
        self._refuse_second_preparation(runner)
        core = plan.core(predictor_priors(net, list(plan.predictors)) if plan.zero_init else {})
        loader, bar, total = None, None, None
        if core.convert:
            loader, total = statistics_loader(runner, self.dataloader, self.num_batches)
            if self.progress_bar and is_main_process() and total:
                bar = ProgressBar(total)
        elif plan.convert:
            runner.logger.warning(
                'DAFTHook: no BatchNorm layer is converted: no module with BN loaded pretrained '
                'weights (no Pretrained init_cfg / model.pretrained, no load_from holding them); '
                'the run is integrated LP+FT alone. Fix: load the pretrained weights, or '
                'daft_convert_modules=[...] to convert chosen modules anyway'
                + ''.join(f'. {note}' for note in plan.conversion.notes))
        done = prepare(net, loader, core, forward=naming_files(mm_forward(self.forward_mode)),
                       max_batches=total or None, var_mode=self.var_mode,
                       skip_incompatible=self.skip_incompatible,
                       progress=(lambda _: bar.update()) if bar is not None else None)
        if bar is not None:
            bar.file.write('\n')
        self._state = {'done': True, 'plan': plan.to_dict(), 'zeroed': done.zeroed,
                       'converted_layers': len(done.report.layers) if done.report else 0}
        if done.report is not None:
            runner.logger.info('DAFTHook: ' + done.report.summary())
            startup.visualize(runner, done.report)
            self._state['num_batches'] = done.report.num_batches
            if is_main_process():
                startup.save_report(runner, done.report, plan)
        if model is not net:  # a DAFTModel refuses to train until this is set
            model.prepared = True
        if self.save_converted and is_main_process():
            path = startup.save_converted(runner, net, self._state)
            runner.logger.info(f'DAFTHook: the converted model (the start of this run): {path}')
        runner.logger.info(startup.startup_block(plan, done, self.effective_lrs))

    def _refuse_second_preparation(self, runner: Any) -> None:
        """``load_from`` a checkpoint that already went through DAFT: zeroing its predictors
        would throw away what they learnt. Refused unless ``zero_init=False``."""
        state = self._loaded_state
        if not state or not state.get('done'):
            return
        source = runner.cfg.get('load_from')
        done = (f"converted {state.get('converted_layers', '?')} BN layers, zeroed "
                f"{state.get('zeroed', '?')}")
        if self.plan.zero_init:
            hooks = list(runner.cfg.get('custom_hooks') or [])
            index = next((i for i, h in enumerate(hooks) if isinstance(h, dict)
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
        """Name the file of a bad label map before the loss meets it (mmseg's "Target 25 is out
        of bounds" names none)."""
        found = bad_samples(split_model(runner.model)[1], data_batch)
        if found:
            raise ValueError('bad annotation(s) in the training data: ' + '; '.join(found))

    def after_train(self, runner: Any) -> None:
        self._during_training.close()
