"""Reliability of the tools' files: results never mixed across runs or clobbered, outputs never
replacing inputs, caches that a kill cannot poison, and writes that a kill leaves whole."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _mm_helpers import REPO, cpu_env
from _tools import load_tool

from daft_mm.utils import atomic_write

TINY_SEG = str(REPO / 'configs' / '_tiny_' / 'tiny_deeplabv3_cityscapes.py')


# --------------------------------------------------------------------------- atomic writes
def test_a_kill_while_writing_leaves_the_previous_file_whole(tmp_path):
    """A real process dies (os._exit, as under SIGKILL: no cleanup) in the middle of writing."""
    target = tmp_path / 'result.json'
    target.write_text('{"previous": true}')
    code = ('import os, sys; sys.path.insert(0, %r)\n'
            'from daft_mm.utils.io import atomic_write\n'
            'with atomic_write(%r) as f:\n'
            '    f.write("{\\"half\\": "); f.flush(); os._exit(9)\n') % (str(REPO), str(target))
    proc = subprocess.run([sys.executable, '-c', code], timeout=60)
    assert proc.returncode == 9
    assert json.loads(target.read_text()) == {'previous': True}
    # an exception inside the block leaves it whole too, and no temporary file behind
    with pytest.raises(KeyError):
        with atomic_write(str(target)) as f:
            f.write('{"half": ')
            raise KeyError('boom')
    assert json.loads(target.read_text()) == {'previous': True}
    # the killed writer's temporary file is all that is left besides it, never the target
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith('.tmp')] == ['result.json']


# ------------------------------------------------------------------- item 7/8: test_robustness
@pytest.fixture
def robustness(tiny_cfg, cityscapes_root, tmp_path):
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    import daft_mm  # noqa: F401
    init_default_scope('mmseg')
    cfg = tiny_cfg('tiny_deeplabv3_cityscapes', cityscapes_root,
                   **{'train_cfg.val_interval': 100, 'default_hooks.checkpoint.interval': 1})
    Runner.from_cfg(cfg).train()
    ckpt = Path(cfg.work_dir) / 'iter_1.pth'
    out = tmp_path / 'robustness'
    tool = load_tool('test_robustness')

    def run(*extra: str, checkpoint: Path = ckpt, data_root: str = cityscapes_root):
        return tool.main([TINY_SEG, str(checkpoint), '--corruptions', 'gaussian_noise',
                          '--severities', '1', '--work-dir', str(out), *extra,
                          '--cfg-options', f'data_root={data_root}'])

    return dict(run=run, ckpt=ckpt, out=out, root=cityscapes_root)


def test_robustness_never_mixes_or_clobbers_results(robustness, tmp_path):
    run, out = robustness['run'], robustness['out']
    first = run('--skip-clean')
    result_file = out / 'robustness.json'
    recorded = json.loads(result_file.read_text())

    # another run into the same work dir without --resume: refused, file untouched
    with pytest.raises(FileExistsError, match='--resume.*--overwrite'):
        run('--skip-clean')
    assert json.loads(result_file.read_text()) == recorded

    # --resume into a run that differs in data (another data_root), checkpoint content or metric
    other_root = tmp_path / 'other_root'
    other_root.symlink_to(robustness['root'])
    with pytest.raises(RuntimeError, match='another run.*config or --cfg-options'):
        run('--resume', data_root=str(other_root))
    with pytest.raises(RuntimeError, match='another run.*--metric'):
        run('--resume', '--metric', 'aAcc')
    ckpt = torch.load(robustness['ckpt'], weights_only=False)
    key = next(k for k in ckpt['state_dict'] if k.endswith('conv_seg.weight'))
    ckpt['state_dict'][key] = ckpt['state_dict'][key] + 1
    retrained = tmp_path / 'retrained' / 'iter_1.pth'  # same file name, other weights
    retrained.parent.mkdir()
    torch.save(ckpt, retrained)
    with pytest.raises(RuntimeError, match='another run.*checkpoint content'):
        run('--resume', checkpoint=retrained)
    assert json.loads(result_file.read_text()) == recorded

    assert set(recorded['provenance']) == {'config_sha256', 'checkpoint_sha256', 'metric', 'seed'}
    # the same run resumes; --overwrite replaces
    again = run('--resume', '--skip-clean')
    assert again['corrupted'] == first['corrupted']
    replaced = run('--overwrite', '--skip-clean', checkpoint=retrained)
    assert replaced['provenance']['checkpoint_sha256'] != recorded['provenance'][
        'checkpoint_sha256']

    # a truncated results file (a kill while an older version wrote it): a clear error
    result_file.write_text(result_file.read_text()[:40])
    with pytest.raises(RuntimeError, match='not valid JSON.*delete it'):
        run('--resume', '--skip-clean', checkpoint=retrained)


# ------------------------------------------------------------------ item 8: convert_checkpoint
def test_convert_checkpoint_refuses_to_replace_its_source_or_an_output(tmp_path):
    from mmseg.models.backbones import ResNet
    tool = load_tool('convert_checkpoint')
    src = tmp_path / 'resnet18_tv.pth'  # a torchvision-layout ResNet-18 with its classifier
    state = ResNet(depth=18, stem_channels=16, base_channels=16).state_dict()
    state.update({'fc.weight': torch.randn(10, 128), 'fc.bias': torch.randn(10)})
    torch.save(state, src)
    original = src.read_bytes()
    with pytest.raises(ValueError, match='source checkpoint itself'):
        tool.main([str(src), str(src)])
    os.symlink(src, tmp_path / 'link.pth')
    with pytest.raises(ValueError, match='source checkpoint itself'):
        tool.main([str(src), str(tmp_path / 'link.pth')])
    assert src.read_bytes() == original
    out = tmp_path / 'out.pth'
    tool.main([str(src), str(out)])
    converted = out.read_bytes()
    with pytest.raises(FileExistsError, match='--overwrite'):
        tool.main([str(src), str(out), '--prefix', 'backbone.'])
    assert out.read_bytes() == converted
    tool.main([str(src), str(out), '--prefix', 'backbone.', '--overwrite'])
    assert 'backbone.conv1.weight' in torch.load(out, weights_only=True)['state_dict']


# ------------------------------------------------------------------------- item 9: demo caches
def test_demo_rerun_after_kill_reuses_finished_runs_and_redoes_a_truncated_cache(tmp_path):
    work = tmp_path / 'demo'
    cmd = [sys.executable, str(REPO / 'tools' / 'demo.py'), '--quick', '--seeds', '1',
           '--concurrent-trials', '1', '--work-dir', str(work)]
    env = {**cpu_env(), 'PYTHONWARNINGS': 'ignore'}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        while not list(work.glob('runs/*/*/result.json')) and time.monotonic() < deadline:
            assert first.poll() is None, 'the demo ended before its first fine-tuning run'
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    finished = sorted(p.parent.name for p in work.glob('runs/*/*/result.json'))
    assert finished, 'no fine-tuning run finished before the kill'

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    # every run finished before the kill is reused; a trial whose Ray worker was finishing as
    # the driver died may have written its (complete) result too, and is then reused as well
    assert rerun.stdout.count('finished earlier: reused') >= len(finished), \
        rerun.stdout[-3000:]
    report = json.loads((work / 'report.json').read_text())
    assert all(len(runs) == 1 for runs in report['runs'].values())

    # a pretrained cache cut short, as a kill while saving left it before saves were atomic
    ckpt = next(work.glob('pretrain/*/backbone.pth'))
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[:len(data) // 2])
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert 'cannot be read' in again.stdout and 'pretraining again' in again.stdout
    assert torch.load(ckpt, weights_only=True)['state_dict']


# ----------------------------------- issue 22 item 7: tools/test.py with a checkpoint that misfits
def test_tools_test_refuses_a_checkpoint_that_does_not_fit(cityscapes_root, tmp_path):
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    init_default_scope('mmseg')
    torch.manual_seed(0)
    state = MODELS.build(Config.fromfile(TINY_SEG).model).state_dict()
    ckpt = tmp_path / 'ckpt.pth'
    torch.save({'state_dict': state, 'meta': {}}, ckpt)
    test = load_tool('test')
    base = [TINY_SEG, str(ckpt), '--work-dir', str(tmp_path / 'w'), '--cfg-options',
            f'data_root={cityscapes_root}']
    other_classes = ['model.decode_head.num_classes=8', 'model.auxiliary_head.num_classes=8']
    with pytest.raises(ValueError, match=r'does not fit.*4 with another shape.*'
                       r'decode_head\.conv_seg\.weight.*--allow-partial-checkpoint'):
        test.main(base + other_classes)
    missing = tmp_path / 'missing.pth'
    torch.save({'state_dict': {k: v for k, v in state.items() if 'layer4' not in k}}, missing)
    with pytest.raises(ValueError, match=r'weights missing \(backbone\.layer4'):
        test.main([TINY_SEG, str(missing)] + base[2:])
    # intended: the flag lets it through; a checkpoint that fits passes without it
    assert 'mIoU' in test.main(base + other_classes + ['--allow-partial-checkpoint'])
    assert 'mIoU' in test.main(base)


# --------------------------------------------- issue 22 item 8: outputs keep the user's umask
def test_atomic_writes_keep_the_users_umask(tmp_path):
    """test_robustness and convert_checkpoint write through these: teammates must read them."""
    from daft_mm.utils import atomic_save
    old = os.umask(0o027)
    try:
        with atomic_write(str(tmp_path / 'a.json')) as f:
            f.write('{}')
        atomic_save(lambda f: torch.save({'x': 1}, f), str(tmp_path / 'b.pth'))
    finally:
        os.umask(old)
    for name in ('a.json', 'b.pth'):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
