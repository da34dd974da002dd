"""Config mistakes that used to pass in silence (issue 22): a ``data_root`` override that reaches
no dataloader, a misspelt ``daft_*`` key, the head LR multiplier lost with ``zero_init=False``,
stock LR schedules with an absolute floor, and a DAFT backbone fragment users can extend."""
from __future__ import annotations

from pathlib import Path

import pytest
from mmengine.config import Config

from daft_mm.mm.cli import dataset_roots, load_config

REPO = Path(__file__).resolve().parents[1]
TINY_SEG = REPO / 'configs' / '_tiny_' / 'tiny_deeplabv3_cityscapes.py'


def _own_root_config(tmp_path: Path) -> Path:
    """A user's config that sets its own top-level data_root (the OpenMMLab habit) without passing
    it to the dataloaders, which keep the root their base resolved."""
    path = tmp_path / 'my_config.py'
    path.write_text(f"_base_ = ['{TINY_SEG}']\ndata_root = 'data/my_cityscapes/'\n")
    return path


def test_data_root_override_that_reaches_no_dataloader_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r'reaches no dataloader.*train_dataloader\.dataset\.'
                       r'data_root=.*Fix: .*train_dataloader\.dataset\.data_root=/new/root'):
        load_config(str(_own_root_config(tmp_path)), {'data_root': '/new/root'})


def test_data_root_override_with_explicit_dataloader_keys_is_applied(tmp_path):
    options = {'data_root': '/new/root'}
    options.update({f'{k}_dataloader.dataset.data_root': '/new/root'
                    for k in ('train', 'val', 'test')})
    cfg = load_config(str(_own_root_config(tmp_path)), options)
    assert {value for _, value in dataset_roots(cfg)} == {'/new/root'}


def test_data_root_override_follows_a_config_that_passes_it_on(tmp_path):
    cfg = load_config(str(TINY_SEG), {'data_root': '/new/root'})
    assert {value for _, value in dataset_roots(cfg)} == {'/new/root'}
    mixed = Config(dict(data_root='a', train_dataloader=dict(dataset=dict(
        type='ConcatDataset', datasets=[dict(data_root='a'), dict(data_root='other')]))))
    from daft_mm.mm.cli import apply_cfg_options
    apply_cfg_options(mixed, {'data_root': 'b'})  # one dataset follows: a mix is kept
    assert [d['data_root'] for d in mixed.train_dataloader.dataset.datasets] == ['b', 'other']


# ------------------------------------------------------------ item 6: a misspelt daft_* key
def test_misspelt_daft_key_is_refused_with_the_closest_key(tmp_path):
    with pytest.raises(ValueError, match=r'daft_head_lr_mul \(did you mean daft_head_lr_mult\?\)'):
        load_config(str(REPO / 'configs' / '_tiny_' / 'tiny_daft_deeplabv3_cityscapes.py'),
                    {'daft_head_lr_mul': 20})


def test_misspelt_daft_key_is_refused_by_the_hook_too(cityscapes_root, tmp_path):
    """A Runner built without daft-mm's tools (a user's own script) meets the same check."""
    from mmengine.runner import Runner

    from _mm_helpers import load_tiny
    cfg = load_tiny(REPO / 'configs' / '_tiny_' / 'tiny_daft_deeplabv3_cityscapes.py',
                    tmp_path / 'work', cityscapes_root, **{'train_cfg.max_iters': 1})
    cfg.daft_convert_module = ['backbone']
    with pytest.raises(ValueError, match=r'did you mean daft_convert_modules'):
        Runner.from_cfg(cfg).train()


# ----------------------------------------------- item 12: the backbone fragment can be extended
def test_daft_backbone_fragment_extends_in_a_users_config(tmp_path):
    config = tmp_path / 'my_detector.py'
    config.write_text(
        "_base_ = ['mmdet::pascal_voc/retinanet_r50_fpn_1x_voc0712.py',\n"
        f"          '{REPO / 'configs' / '_base_' / 'daft_detection.py'}']\n"
        "model = dict(backbone=dict(_base_.daft_backbone, depth=18,\n"
        "                           init_cfg=dict(type='Pretrained', checkpoint='r18.pth')))\n")
    backbone = Config.fromfile(str(config)).model.backbone
    assert backbone.depth == 18 and backbone.norm_eval is False and backbone.frozen_stages == -1
    assert backbone.norm_cfg.type == 'SyncBN' and backbone.init_cfg.checkpoint == 'r18.pth'


# ------------------------------------------- issue 22 item 15: the DAFT summary stands out
def test_daft_startup_block_is_the_last_word_before_training(cityscapes_root, tmp_path):
    from mmengine.runner import Runner

    from _mm_helpers import load_tiny
    cfg = load_tiny(REPO / 'configs' / '_tiny_' / 'tiny_daft_deeplabv3_cityscapes.py',
                    tmp_path / 'work', cityscapes_root, **{'train_cfg.max_iters': 1})
    runner = Runner.from_cfg(cfg)
    runner.train()
    log = next(Path(runner.log_dir).glob('*.log')).read_text().splitlines()
    start = next(i for i, line in enumerate(log) if 'DAFT start-up' in line)
    block = log[start:start + 8]
    config_dump = max(i for i, line in enumerate(log) if line.startswith('daft_head_lr_mult = '))
    assert start > config_dump  # after the config dump and the per-part lines
    text = '\n'.join(block)
    for part in ('method daft', 'BN converted:', 'left as initialised', 'predictors zeroed: '
                 'decode_head.conv_seg', 'head (new_modules', 'effective start LRs: '):
        assert part in text, (part, text)
    assert not any('DAFTHook' in line for line in log[start:]), 'nothing of DAFT after the block'


# ------------------------------ issue 22 item 16: package configs, and a wrong import named
def test_package_config_imports_from_any_folder_and_a_wrong_one_is_named(tmp_path):
    import subprocess
    import sys
    good = tmp_path / 'good.py'
    good.write_text('from mmengine.config import read_base\nwith read_base():\n'
                    '    from daft_mm.configs.daft_deeplabv3_r50_d8_cityscapes import *\n'
                    'daft_head_lr_mult = 20.0\n')
    bad = tmp_path / 'bad.py'
    bad.write_text('from mmengine.config import read_base\nwith read_base():\n'
                   '    from daft_mm.configs.daft_deeplabv3_cityscapes import *\n')
    script = ('import sys; from daft_mm.mm.cli import load_config\n'
              'cfg = load_config(sys.argv[1]); print(cfg.daft_head_lr_mult, cfg.model.type)\n')
    run = subprocess.run([sys.executable, '-c', script, str(good)], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ['20.0', 'DAFTModel']
    run = subprocess.run([sys.executable, '-c', script, str(bad)], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120)
    assert run.returncode != 0
    assert 'names no config file' in run.stderr
    assert 'daft_mm.configs.daft_deeplabv3_r50_d8_cityscapes' in run.stderr


# ------------------------------------------------- issue 32 item 2: loaders the root misses
_PART = {'train': "train_dataloader = dict(dataset=dict(data_root=data_root))\n",
         'train_val': "train_dataloader = dict(dataset=dict(data_root=data_root))\n"
                      "val_dataloader = dict(dataset=dict(data_root=data_root))\n"}


def _classic_child(tmp_path: Path, which: str) -> Path:
    """A child config with its own data_root passed to some dataloaders only: the others keep
    the root the base resolved when it was parsed."""
    path = tmp_path / f'child_{which}.py'
    path.write_text(f"_base_ = ['{TINY_SEG}']\ndata_root = 'data/mine/'\n{_PART[which]}")
    return path


def _python_child(tmp_path: Path) -> Path:
    """The same in mmengine's pure-Python style, inheriting the config shipped in the package."""
    path = tmp_path / 'child_python.py'
    path.write_text(
        'from mmengine.config import read_base\n\nwith read_base():\n'
        '    from daft_mm.configs.daft_deeplabv3_r50_d8_cityscapes import *  # noqa\n\n'
        "data_root = 'data/mine/'\n"
        "train_dataloader['dataset']['data_root'] = data_root\n")
    return path


@pytest.mark.parametrize('which', ['train', 'train_val', 'python'])
def test_data_root_override_that_misses_loaders_a_tool_reads_names_them(tmp_path, which):
    """Training reads train and val, testing reads test: a loader the tool reads but the new
    data_root did not reach is named with the exact key, for classic and pure-Python configs."""
    from daft_mm.mm.cli import TEST_LOADERS, TRAIN_LOADERS
    path = _python_child(tmp_path) if which == 'python' else _classic_child(tmp_path, which)
    options = {'data_root': '/new/root'}
    for used, missed in ((TRAIN_LOADERS, [] if which == 'train_val' else ['val']),
                         (TEST_LOADERS, ['test'])):
        if not missed:  # train and val both follow: training reads the new folder only
            cfg = load_config(str(path), options, used_loaders=used)
            assert {v for k, v in dataset_roots(cfg) if k.split('.')[0] in used} == \
                {'/new/root'}
            continue
        with pytest.raises(ValueError) as err:
            load_config(str(path), options, used_loaders=used)
        text = str(err.value)
        assert 'reaches train_dataloader.dataset.data_root' in text
        fix = text.split('Fix:')[1]
        assert [loader for loader in ('train', 'val', 'test')
                if f'{loader}_dataloader.dataset.data_root=/new/root' in fix] == missed
        # the keys it names make the tool's loaders read the new folder
        fixed = dict(options, **{f'{m}_dataloader.dataset.data_root': '/new/root'
                                 for m in missed})
        cfg = load_config(str(path), fixed, used_loaders=used)
        assert {v for k, v in dataset_roots(cfg) if k.split('.')[0] in used} == {'/new/root'}


def test_test_py_refuses_to_score_the_old_folder(tmp_path):
    from _tools import load_tool
    checkpoint = tmp_path / 'any.pth'
    checkpoint.write_bytes(b'not read: the config is refused first')
    with pytest.raises(ValueError, match=r'test_dataloader\.dataset\.data_root=/new/root'):
        load_tool('test').main([str(_classic_child(tmp_path, 'train_val')), str(checkpoint),
                                '--cfg-options', 'data_root=/new/root'])


def test_an_ood_test_config_moves_its_test_set_only(tmp_path):
    """configs/ood/*: the test set on the shifted data, training on the source domain: testing
    reads the new folder, and the training loader left on the source is no error."""
    from daft_mm.mm.cli import TEST_LOADERS
    cfg = load_config(str(REPO / 'configs' / 'ood' / 'acdc_fog.py'), {'data_root': '/acdc'},
                      used_loaders=TEST_LOADERS)
    assert cfg.test_dataloader.dataset.data_root == '/acdc'


def test_a_detection_evaluator_ann_file_is_named_with_its_loader(tmp_path):
    tiny_det = REPO / 'configs' / '_tiny_' / 'tiny_retinanet_cityscapes.py'
    base = Config.fromfile(str(tiny_det))
    if not isinstance(base.get('val_evaluator'), dict) or 'ann_file' not in base.val_evaluator:
        pytest.skip('this tiny detection config has no evaluator ann_file')
    path = tmp_path / 'det_child.py'
    path.write_text(f"_base_ = ['{tiny_det}']\ndata_root = 'data/mine/'\n{_PART['train']}")
    from daft_mm.mm.cli import TRAIN_LOADERS
    with pytest.raises(ValueError, match=r'val_evaluator\.ann_file=/new/root/'):
        load_config(str(path), {'data_root': '/new/root'}, used_loaders=TRAIN_LOADERS)
