"""Reliability of training: auto-resume after a crash before the first checkpoint, a finished DAFT
checkpoint as load_from, one live run per work dir, and clean exits of distributed runs. Real
``tools/train.py`` processes, the real Runner and real gloo process groups."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip('mmseg')

import daft_mm  # noqa: E402,F401  (registers DAFTHook / DAFTModel)
from _mm_helpers import (CONFIGS, REPO, TINY, cpu_env, load_tiny, pretrained_options,  # noqa: E402
                         shrink_config)
from _tools import load_tool  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from daft_mm.utils import WorkDirBusyError, WorkDirLock  # noqa: E402
from daft_mm.mm.optim import complete_daft_config  # noqa: E402

TESTS = Path(__file__).resolve().parent
PREDICTORS = ['decode_head.conv_seg', 'auxiliary_head.conv_seg']


def _env(**extra: str) -> Dict[str, str]:
    env = cpu_env()
    env['PYTHONPATH'] = f'{REPO}{os.pathsep}{TESTS}'  # _reliability_hooks for custom_imports
    env['PYTHONWARNINGS'] = 'ignore'
    env.update(extra)
    return env


def _pretrained(path: Path) -> Dict[str, torch.Tensor]:
    """A load_from checkpoint whose weights differ from any initialisation."""
    init_default_scope('mmseg')
    torch.manual_seed(1)
    model = MODELS.build(Config.fromfile(str(TINY / 'tiny_deeplabv3_cityscapes.py')).model)
    state = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            value = value * (1 + 0.1 * torch.rand_like(value)) + 0.01
        state[key] = value
    torch.save({'state_dict': state, 'meta': {}}, path)
    return state


def _write_config(tmp_path: Path, load_from: Path, hooks: List[str]) -> Path:
    shrunk = shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', tmp_path)
    path = tmp_path / 'run_cfg.py'
    path.write_text(
        f"_base_ = ['{shrunk}']\n"
        "custom_imports = dict(imports=['daft_mm', '_reliability_hooks'], "
        "allow_failed_imports=False)\n"
        f"load_from = '{load_from}'\n"
        f"custom_hooks = [dict(type='DAFTHook', predictors={PREDICTORS!r}), {', '.join(hooks)}]\n")
    return path


def _train_cmd(config: Path, work_dir: Path, data_root: str, *extra: str) -> List[str]:
    return [sys.executable, str(REPO / 'tools' / 'train.py'), str(config), '--work-dir',
            str(work_dir), *extra, '--cfg-options', f'data_root={data_root}',
            'train_cfg.max_iters=1', 'train_cfg.val_interval=1000', 'train_dataloader.batch_size=2',
            'default_hooks.checkpoint.interval=1', 'default_hooks.logger.interval=1']


# ------------------------------------------------------------------------------ item 1: resume
def test_auto_resume_before_first_checkpoint_starts_from_load_from(cityscapes_root, tmp_path):
    """A DAFT run from load_from is killed during the BN conversion (no checkpoint yet); the
    rerun with --resume must train from the load_from weights, not from the init weights, and
    say so. Upstream (and the old tools/train.py) dropped load_from and trained from init."""
    pretrained = _pretrained(tmp_path / 'pretrained.pth')
    start = tmp_path / 'start.pt'
    config = _write_config(tmp_path, tmp_path / 'pretrained.pth',
                           ["dict(type='KillDuringConversion')",
                            f"dict(type='SaveStartWeights', path='{start}')"])
    work = tmp_path / 'work'
    killed = subprocess.run(_train_cmd(config, work, cityscapes_root), cwd=REPO,
                            env=_env(DAFT_TEST_KILL='1'), capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not list(work.glob('*.pth'))  # killed before its first save
    lock_left = (work / WorkDirLock.NAME).exists()  # the killed run's lock stays behind
    start.unlink()

    rerun = subprocess.run(_train_cmd(config, work, cityscapes_root, '--resume'), cwd=REPO,
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    started = torch.load(start, weights_only=False)
    assert started['iter'] == 0
    for key, value in pretrained.items():
        assert torch.equal(started['state'][key], value), key
    log = rerun.stdout + rerun.stderr
    assert 'starts over from load_from=' in log, log[-3000:]
    assert lock_left and 'no longer runs' in log  # the dead run's lock was taken over
    # the resumed run finished DAFT: its checkpoint is there, prepared once
    ckpt = torch.load(work / 'iter_1.pth', weights_only=False)
    assert ckpt['daft']['done']
    assert not (work / WorkDirLock.NAME).exists()  # released at the end


def test_auto_resume_with_a_checkpoint_resumes_it(cityscapes_root, tmp_path):
    """The other half of the rule: a checkpoint in the work dir wins over load_from."""
    from daft_mm.mm import resume as train
    cfg = Config(dict(work_dir=str(tmp_path), load_from='/some/pretrained.pth'))
    torch.save({'state_dict': {}, 'meta': {'iter': 3}}, tmp_path / 'iter_3.pth')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_3.pth'))
    note = train.resolve_resume(cfg, 'auto')
    assert cfg.resume is True and cfg.load_from == str(tmp_path / 'iter_3.pth')
    assert 'latest checkpoint' in note
    (tmp_path / 'iter_3.pth').unlink()  # last_checkpoint names a file that is gone
    with pytest.raises(FileNotFoundError, match='last_checkpoint'):
        train.resolve_resume(Config(dict(work_dir=str(tmp_path), load_from=None)), 'auto')


# ----------------------------------------------------------------- item 3: load_from a DAFT ckpt
def test_load_from_a_finished_daft_checkpoint_is_refused(cityscapes_root, tmp_path):
    shrunk = shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', tmp_path)
    opts = {'train_cfg.max_iters': 1, 'train_dataloader.batch_size': 2,
            'default_hooks.checkpoint.interval': 1}
    first = load_tiny(shrunk, tmp_path / 'first', cityscapes_root, **opts)
    Runner.from_cfg(first).train()
    daft_ckpt = tmp_path / 'first' / 'iter_1.pth'
    trained = torch.load(daft_ckpt, weights_only=False)
    assert trained['daft']['done']

    again = load_tiny(shrunk, tmp_path / 'again', cityscapes_root, **opts)
    again.load_from = str(daft_ckpt)
    complete_daft_config(again)  # the plan reads load_from: complete after changing it
    with pytest.raises(RuntimeError, match=r'already went through DAFT.*--resume') as refused:
        Runner.from_cfg(again).train()

    # The way on the message gives, as it gives it (a --cfg-options key that works): the trained
    # predictors are kept and the head keeps its LR multiplier (issue 22 item 5).
    option = re.search(r'--cfg-options (custom_hooks\.\d+\.zero_init)=False',
                       str(refused.value)).group(1)
    keep = load_tiny(shrunk, tmp_path / 'keep', cityscapes_root, **opts, **{option: False})
    keep.load_from = str(daft_ckpt)
    complete_daft_config(keep)
    runner = Runner.from_cfg(keep)
    runner.train()
    net = runner.model.model
    head = net.decode_head.conv_seg.weight
    assert head.abs().sum() > 0
    lr_of = {id(p): g.get('initial_lr', g['lr']) for g in runner.optim_wrapper.param_groups
             for p in g['params']}
    base = lr_of[id(next(net.backbone.parameters()))]
    assert lr_of[id(head)] == pytest.approx(10 * base)
    hook = next(h for h in runner.hooks if type(h).__name__ == 'DAFTHook')
    assert hook.plan.head_lr and not hook.plan.zero_init


def _paused_run(tmp_path: Path, data_root: str) -> tuple:
    """A real tools/train.py run held in before_train until ``release`` exists: (process, config,
    work dir, release file), returned once the run is training."""
    _pretrained(tmp_path / 'pretrained.pth')
    release, ready = tmp_path / 'release', tmp_path / 'ready'
    config = _write_config(tmp_path, tmp_path / 'pretrained.pth', [
        f"dict(type='PauseUntilFile', path='{release}', ready='{ready}')"])
    work = tmp_path / 'work'
    run = subprocess.Popen(_train_cmd(config, work, data_root), cwd=REPO,
                           env=_env(DAFT_TEST_PAUSE='1'), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not ready.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not ready.exists():
        release.touch()
        run.kill()
        raise AssertionError('the run never started training: ' + run.communicate()[0][-3000:])
    return run, config, work, release


# ------------------------------------------------------------------------ item 10: live work dir
def test_second_run_in_a_live_work_dir_is_refused(cityscapes_root, tmp_path):
    first, config, work, release = _paused_run(tmp_path, cityscapes_root)
    try:
        logs_before = sorted(p.name for p in work.iterdir())
        with pytest.raises(WorkDirBusyError, match=rf'pid {first.pid}.*--work-dir'):
            load_tool('train').main([str(config), '--work-dir', str(work), '--cfg-options',
                                     f'data_root={cityscapes_root}'])
        assert sorted(p.name for p in work.iterdir()) == logs_before  # nothing written
    finally:
        release.touch()
        out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]


def test_work_dir_lock_takes_over_a_dead_owner(tmp_path):
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / WorkDirLock.NAME).write_text(
        f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}", "started": "x"}}')
    with WorkDirLock(str(tmp_path)) as lock:
        assert lock.taken_over['pid'] == dead.pid
        with pytest.raises(WorkDirBusyError, match='in use'):
            WorkDirLock(str(tmp_path)).acquire()
    assert not (tmp_path / WorkDirLock.NAME).exists()


# ------------------------------------------- issue 22 item 3: a fresh run into a finished work dir
def test_fresh_run_into_a_finished_work_dir_is_refused(cityscapes_root, tmp_path):
    from daft_mm.utils import file_digest
    _pretrained(tmp_path / 'pretrained.pth')
    config = _write_config(tmp_path, tmp_path / 'pretrained.pth', [])
    work = tmp_path / 'work'
    args = [str(config), '--work-dir', str(work), '--cfg-options', f'data_root={cityscapes_root}',
            'train_cfg.max_iters=1', 'train_cfg.val_interval=1000',
            'train_dataloader.batch_size=2', 'default_hooks.checkpoint.interval=1']
    load_tool('train').main(args)
    kept = {p.name: file_digest(str(p)) for p in work.iterdir() if p.is_file()}
    assert {'converted.pth', 'iter_1.pth', 'last_checkpoint'} <= set(kept)
    with pytest.raises(FileExistsError, match=r'holds an earlier run.*--resume.*--work-dir'):
        load_tool('train').main(args)
    assert {p.name: file_digest(str(p)) for p in work.iterdir() if p.is_file()} == kept


# --------------------------------------------------- issue 22 item 4: locks do not outlive runs
def test_sigterm_releases_the_work_dir_lock(cityscapes_root, tmp_path):
    run, _, work, release = _paused_run(tmp_path, cityscapes_root)
    try:
        assert (work / WorkDirLock.NAME).exists()
        run.terminate()  # SIGTERM, as a timeout or Slurm preemption sends it
        out, _ = run.communicate(timeout=60)
    finally:
        release.touch()
        if run.poll() is None:
            run.kill()
    assert run.returncode == 128 + 15, out[-2000:]
    assert not (work / WorkDirLock.NAME).exists(), 'the lock outlived its run'


def test_a_lock_whose_heartbeat_stopped_is_taken_over_from_any_host(tmp_path):
    lock_file = tmp_path / WorkDirLock.NAME
    lock_file.write_text('{"pid": 4242, "host": "another-node", "started": "x"}')
    with pytest.raises(WorkDirBusyError, match=r'another-node.*heartbeat.*--break-lock'):
        WorkDirLock(str(tmp_path)).acquire()  # fresh heartbeat: a live run elsewhere
    old = time.time() - WorkDirLock.STALE_AFTER - 60
    os.utime(lock_file, (old, old))
    with WorkDirLock(str(tmp_path)) as lock:  # a requeue on another node after a kill
        assert lock.taken_over['host'] == 'another-node'
        lock.HEARTBEAT = 0.05
        lock._stop.set()
        lock._start_heartbeat()
        os.utime(lock_file, (old, old))
        time.sleep(0.5)
        assert time.time() - lock_file.stat().st_mtime < 5, 'the heartbeat keeps the lock fresh'
    assert not lock_file.exists()


def test_garbage_in_a_lock_file_is_reported_and_break_lock_clears_it(tmp_path):
    lock_file = tmp_path / WorkDirLock.NAME
    lock_file.write_text('\x00\x00 not a lock')
    with pytest.raises(WorkDirBusyError, match=r'no readable owner.*--break-lock'):
        WorkDirLock(str(tmp_path)).acquire()
    assert lock_file.read_text() == '\x00\x00 not a lock'  # not silently taken over
    assert load_tool('train').parse_args(['x.py', '--break-lock']).break_lock
    lock = WorkDirLock(str(tmp_path)).acquire(force=True)
    try:
        assert 'not a lock' in lock.broken and lock_file.exists()
    finally:
        lock.release()
    assert not lock_file.exists()


# --------------------------------------------------------------------- item 5: distributed exits
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _train_rank(rank: int, port: int, config: str, work_dir: str, data_root: str,
                out_dir: str) -> None:
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    load_tool('train').main([config, '--launcher', 'pytorch', '--work-dir', work_dir,
                             '--cfg-options', f'data_root={data_root}', 'train_cfg.max_iters=1',
                             'train_cfg.val_interval=1', 'train_dataloader.batch_size=2',
                             *pretrained_options(Path(config))])
    torch.save({'initialized_after': dist.is_initialized()}, os.path.join(out_dir, f'{rank}.pt'))


def test_distributed_training_destroys_its_process_group(cityscapes_root, tmp_path):
    """tools/train.py ends a successful distributed run by destroying the process group on every
    rank (a leaked gloo group is torn down at interpreter exit, where it can SIGABRT a rank)."""
    shrunk = shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', tmp_path)
    mp.spawn(_train_rank, nprocs=WORLD, join=True,
             args=(_free_port(), str(shrunk), str(tmp_path / 'work'), cityscapes_root,
                   str(tmp_path)))
    for rank in range(WORLD):
        assert torch.load(tmp_path / f'{rank}.pt')['initialized_after'] is False


RUNS = 3


def test_torchrun_two_process_training_exits_zero_every_time(cityscapes_root, tmp_path):
    """The launcher's verdict over several real 2-process gloo trainings: rc 0 each time."""
    shrunk = shrink_config(CONFIGS / 'daft_deeplabv3_cityscapes.py', tmp_path)
    codes = []
    for run in range(RUNS):
        env = _env(PORT=str(_free_port()), PYTHON=sys.executable)
        proc = subprocess.run(
            ['bash', str(REPO / 'tools' / 'dist_train.sh'), str(shrunk), str(WORLD),
             '--work-dir', str(tmp_path / f'run{run}'), '--cfg-options',
             f'data_root={cityscapes_root}', 'train_cfg.max_iters=1', 'train_cfg.val_interval=1',
             'train_dataloader.batch_size=2', 'default_hooks.checkpoint.interval=1',
             *pretrained_options(shrunk)],  # the user's path: both ranks pool the statistics
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        codes.append(proc.returncode)
        assert proc.returncode == 0, (codes, proc.stderr[-3000:])
        assert 'final validation metrics' in proc.stdout
    assert codes == [0] * RUNS


# ------------------------------------------- issue 32 item 4: a stopped owner keeps its lock
def test_a_stopped_owner_keeps_its_lock_and_takeovers_say_what_was_checked(tmp_path):
    """A run suspended with SIGSTOP beats no more but is alive: on its host the lock is judged by
    its process (pid and start time), not by the heartbeat; a pid reused by another process and
    a dead pid are taken over, each with the reason that was checked."""
    import signal

    from daft_mm.utils.io import _process_start
    lock_file = tmp_path / WorkDirLock.NAME
    old = time.time() - WorkDirLock.STALE_AFTER - 60
    here = socket.gethostname()
    stopped = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        os.kill(stopped.pid, signal.SIGSTOP)
        start = _process_start(stopped.pid)
        assert start is not None
        lock_file.write_text(json.dumps(dict(pid=stopped.pid, host=here, started='x',
                                             process_start=start)))
        os.utime(lock_file, (old, old))  # its heartbeat stopped long ago
        with pytest.raises(WorkDirBusyError, match=rf'pid {stopped.pid}'):
            WorkDirLock(str(tmp_path)).acquire()
        # the same pid with another start time: the number was reused by another process
        lock_file.write_text(json.dumps(dict(pid=stopped.pid, host=here, started='x',
                                             process_start=str(int(start) + 1))))
        with WorkDirLock(str(tmp_path)) as lock:
            assert 'now belongs to another process' in lock.taken_over_because
    finally:
        os.kill(stopped.pid, signal.SIGKILL)
        stopped.wait()
    lock_file.write_text(json.dumps(dict(pid=stopped.pid, host=here, started='x',
                                         process_start=start)))
    with WorkDirLock(str(tmp_path)) as lock:
        assert lock.taken_over_because == f'its process (pid {stopped.pid}) no longer runs on ' \
                                          'this host'
    lock_file.write_text('{"pid": 4242, "host": "another-node", "started": "x"}')
    os.utime(lock_file, (old, old))
    with WorkDirLock(str(tmp_path)) as lock:
        assert lock.taken_over_because.startswith('its heartbeat stopped')
        assert 'another-node' in lock.taken_over_because
