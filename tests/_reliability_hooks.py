"""Hooks the reliability tests put into real ``tools/train.py`` runs (through ``custom_imports``):
a kill in the middle of DAFT's BN conversion, a pause that keeps a run alive, and a record of the
weights a run starts training from. Not a test module (no ``test_`` prefix)."""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch.nn.modules.batchnorm import _BatchNorm


def _inner(runner: Any) -> torch.nn.Module:
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    return getattr(model, 'model', model)  # DAFTModel wraps the segmentor


@HOOKS.register_module()
class SaveStartWeights(Hook):
    """Saves the weights the run starts from (after load_from / resume, before DAFTHook)."""

    priority = 'HIGHEST'

    def __init__(self, path: str) -> None:
        self.path = path

    def before_train(self, runner: Any) -> None:
        state = {k: v.detach().clone() for k, v in _inner(runner).state_dict().items()}
        torch.save({'iter': runner.iter, 'state': state}, self.path)


@HOOKS.register_module()
class KillDuringConversion(Hook):
    """With ``DAFT_TEST_KILL=1`` in the environment, SIGKILLs the process at the first BN call
    of the conversion pass (eval mode, after the pretrained weights are loaded): a crash before
    the first checkpoint is saved."""

    priority = 'HIGHEST'

    def before_train(self, runner: Any) -> None:
        if os.environ.get('DAFT_TEST_KILL') != '1':
            return
        bn = next(m for m in _inner(runner).modules() if isinstance(m, _BatchNorm))

        def kill(module: torch.nn.Module, args: Any) -> None:
            if not module.training:
                os.kill(os.getpid(), signal.SIGKILL)

        bn.register_forward_pre_hook(kill)


@HOOKS.register_module()
class PauseUntilFile(Hook):
    """With ``DAFT_TEST_PAUSE=1`` in the environment, keeps a run alive in ``before_train`` until
    ``path`` exists (at most ``timeout`` s), after writing ``ready`` so the test knows the run
    holds its work dir."""

    priority = 'HIGHEST'

    def __init__(self, path: str, ready: str, timeout: float = 120.0) -> None:
        self.path, self.ready, self.timeout = path, ready, timeout

    def before_train(self, runner: Any) -> None:
        if os.environ.get('DAFT_TEST_PAUSE') != '1':
            return
        open(self.ready, 'w').close()
        deadline = time.monotonic() + self.timeout
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.1)
