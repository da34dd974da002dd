"""tools/compare.py: the comparison of methods as a tool for any config, one code path with the
demo. End to end in its seconds-long mode on the committed real CamVid sample (the shipped CamVid
specification), a rerun that reuses every finished run, one seed giving identical numbers in a
fresh work dir, and a user's own config given by flags alone; plus the refusals that keep a
comparison honest (choosing on test images, a backbone that does not fit)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from _mm_helpers import CONFIGS, REPO, cpu_env, pretrained_backbone

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')

SAMPLE = REPO / 'tests' / 'samples' / 'camvid' / 'CamVid'
CAMVID_SPEC = CONFIGS / 'camvid' / 'compare_camvid_day_dusk.py'
ROWS = ('FT', 'LP', 'LP-FT', 'DAFT', 'DAFT w/o conversion', 'conversion only')


def _compare(python: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([python, str(REPO / 'tools' / 'compare.py'), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=cpu_env())
    return proc


@pytest.fixture(scope='module')
def camvid_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('camvid') / 'CamVid'
    shutil.copytree(SAMPLE, root)
    from daft_mm.mm.datasets.camvid_splits import write_day_dusk_splits
    write_day_dusk_splits(root, gap=1)
    return root


@pytest.fixture(scope='module')
def compared(tmp_path_factory, camvid_root, python):
    work = tmp_path_factory.mktemp('compare')
    proc = _compare(python, CAMVID_SPEC, '--quick', '--search', '--work-dir', work,
                    '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc.stdout


def test_camvid_specification_end_to_end(compared, camvid_root):
    work, out = compared
    report = json.loads((work / 'report.json').read_text())
    assert tuple(report['methods']) == ROWS
    # the specification's OOD sets: the dusk drive and three corruptions of the ID test frames
    assert report['ood_sets'] == ['dusk', 'gaussian_noise-3', 'motion_blur-3', 'fog-3']
    task = report['task']
    assert task['name'] == 'camvid_day_dusk' and len(task['classes']) == 11
    assert task['id_val']['ann_file'] == 'daft_splits/id_val.txt'
    assert task['ood']['dusk']['ann_file'] == 'daft_splits/ood_dusk.txt'
    assert task['backbone'].endswith('imagenette_resnetv1c18w16_64px.pth')
    for name, runs in report['runs'].items():
        assert all(sum(r['budgets'].values()) == 4 for r in runs), name
    # LP keeps the pretrained backbone: its features are the Imagenette backbone's
    assert report['methods']['LP']['cosine_similarity']['mean'] == pytest.approx(1.0, abs=1e-6)
    check = report['budget_check']
    assert check['budget'] == 4 and check['verdict'].startswith('FT at its choice')
    assert json.loads((work / 'search.json').read_text())['chosen'].keys() == set(ROWS)
    assert (work / 'report.png').stat().st_size > 1000
    md = (work / 'report.md').read_text()
    assert 'camvid_day_dusk' in md.splitlines()[0] and '| dusk |' in md and 'Budget: FT' in md
    assert '- DAFT (4 settings searched): ' in md  # its Pareto front, in words
    # provenance: every set's list and image count, the data's source commit, the backbone
    sets = report['provenance']['sets']
    commit = (SAMPLE / '.source_commit').read_text().strip()
    assert set(sets) == {'id_train', 'id_val', 'id_test', 'ood/dusk'}
    for name, record in sets.items():
        listed = (camvid_root / record['ann_file']).read_text().split('\n')
        assert record['images'] == len([line for line in listed if line.strip()]) > 0, name
        assert record['source_commit'] == commit, name
    backbone = report['provenance']['backbone']
    assert len(backbone['sha256']) == 64 and backbone['pretraining']['val_top1'] > 70
    assert f'source commit {commit[:12]}' in md and 'val top-1' in md


def test_publish_report_rerenders_under_a_name(compared, python, tmp_path):
    work, _ = compared
    proc = subprocess.run([python, str(REPO / 'benchmarks' / 'publish_report.py'), str(work),
                           'camvid', '--out-dir', str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / 'camvid.json').read_text()) == \
        json.loads((work / 'report.json').read_text())
    assert '![camvid](camvid.png)' in (tmp_path / 'camvid.md').read_text()
    assert (tmp_path / 'camvid.png').stat().st_size > 1000
    # a report written before reports recorded provenance gets it when published
    old = json.loads((work / 'report.json').read_text())
    del old['provenance']
    (tmp_path / 'old').mkdir()
    (tmp_path / 'old' / 'report.json').write_text(json.dumps(old))
    proc = subprocess.run([python, str(REPO / 'benchmarks' / 'publish_report.py'),
                           str(tmp_path / 'old'), 'old', '--out-dir', str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    published = json.loads((tmp_path / 'old.json').read_text())['provenance']
    assert published['recorded'] == 'when published'
    assert published['sets'] == json.loads((work / 'report.json').read_text())[
        'provenance']['sets']


def test_rerun_reuses_every_run_and_one_seed_gives_identical_numbers(compared, camvid_root,
                                                                     python, tmp_path):
    work, _ = compared
    # the same work dir: every run finished earlier is reused (a stopped search resumes so)
    proc = _compare(python, CAMVID_SPEC, '--quick', '--recorded', work / 'search.json',
                    '--work-dir', work, '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = json.loads((work / 'report.json').read_text())
    assert first['trained_runs'] == 0
    # a fresh work dir: every run trained again, with the same seed: the same numbers, exactly
    fresh = tmp_path / 'fresh'
    proc = _compare(python, CAMVID_SPEC, '--quick', '--recorded', work / 'search.json',
                    '--no-budget-check', '--work-dir', fresh,
                    '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    second = json.loads((fresh / 'report.json').read_text())
    assert second['trained_runs'] == len(ROWS)
    for method in ROWS:
        a, b = first['runs'][method][0], second['runs'][method][0]
        assert (a['id_val'], a['id'], a['ood'], a['cosine']) == \
            (b['id_val'], b['id'], b['ood'], b['cosine']), method


def _tiny_user_task(tmp_path: Path):
    """A user's config and data: the tiny DeepLabV3 on generated scenes, ID-val and two OOD
    looks as config files of their own."""
    from daft_mm.mm.datasets import make_cityscapes
    roots = {}
    for name, style in (('id', None), ('val', None), ('night', dict(brightness=0.4)),
                        ('haze', dict(contrast=0.4, color_shift=(80.0, 80.0, 85.0)))):
        roots[name] = tmp_path / name
        make_cityscapes(roots[name], num_train=6 if name == 'id' else 0, num_val=3,
                        size=(64, 128), seed={'val': 5}.get(name, 1), style=style)
    config = CONFIGS / '_tiny_' / 'tiny_deeplabv3_cityscapes.py'
    files = {}
    for name in ('val', 'night', 'haze'):
        files[name] = tmp_path / f'{name}.py'
        files[name].write_text(f"_base_ = ['{config}']\n"
                               f"test_dataloader = dict(dataset=dict(data_root='{roots[name]}'))\n")
    return config, roots, files


def test_a_users_own_config_by_flags(tmp_path, python):
    from mmengine.config import Config
    config, roots, files = _tiny_user_task(tmp_path)
    backbone = pretrained_backbone(Config.fromfile(str(config)))  # the backbone's own keys
    common = ['--backbone', backbone, '--backbone-prefix', '', '--quick', '--search',
              '--work-dir', tmp_path / 'work', '--cfg-options', f'data_root={roots["id"]}']
    # the stock Cityscapes config validates on its test set: choosing there is refused
    proc = _compare(python, config, *common, '--ood', f'night={files["night"]}')
    assert proc.returncode != 0 and 'its validation set is its test set' in proc.stderr
    assert '--id-val' in proc.stderr
    proc = _compare(python, config, *common, '--id-val', files['val'],
                    '--ood', f'night={files["night"]}', '--ood', f'haze={files["haze"]}',
                    '--corruptions')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'work' / 'report.json').read_text())
    assert report['ood_sets'] == ['night', 'haze'] and tuple(report['methods']) == ROWS
    assert report['task']['id_val']['data_root'] == str(roots['val'])
    assert len(report['task']['classes']) == 19


def test_a_backbone_that_does_not_fit_is_refused(tmp_path, python, camvid_root):
    import torch
    wrong = tmp_path / 'wrong.pth'
    torch.save({'state_dict': {'backbone.conv1.weight': torch.zeros(3)}}, wrong)
    proc = _compare(python, CAMVID_SPEC, '--quick', '--search', '--backbone', wrong,
                    '--work-dir', tmp_path / 'w', '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode != 0
    assert 'does not fit the config\'s backbone' in proc.stderr and 'missing' in proc.stderr


def test_compare_needs_a_search_or_recorded_choices(python):
    proc = _compare(python, CAMVID_SPEC)
    assert proc.returncode == 2 and '--search' in proc.stderr


def test_every_method_is_derived_from_one_config():
    """The derived configs carry what the shipped per-method configs carry."""
    from daft_mm.benchmark.methods import Point, get_method
    from daft_mm.benchmark.variants import method_config
    from daft_mm.mm.cli import load_config
    ft = str(CONFIGS / 'camvid' / 'ft_deeplabv3_r50-d8_camvid.py')
    derived = {name: method_config(load_config(ft), get_method(name),
                                   Point(lr=0.01, ratio=100.0, scope='predictors'),
                                   backbone='b.pth')
               for name in ('FT', 'LP', 'DAFT', 'DAFT w/o conversion', 'conversion only')}
    for name, cfg in derived.items():
        assert cfg.model.type == 'DAFTModel', name
        assert cfg.model.model.type == 'EncoderDecoder' and cfg.model.model.pretrained is None
        assert cfg.model.model.backbone.init_cfg == dict(type='Pretrained', checkpoint='b.pth',
                                                         prefix='backbone.')
        assert cfg.optim_wrapper.optimizer.lr == 0.01
    assert derived['LP'].model.method == 'lp'
    assert derived['LP'].model.feature_extractor == ['backbone']
    assert not any(h['type'] == 'DAFTHook' for h in derived['FT'].get('custom_hooks', []))
    daft = derived['DAFT']
    assert daft.model.method == 'daft' and daft.daft_head_lr_mult == 100.0
    assert daft.daft_head_modules == 'predictors'
    assert [h['type'] for h in daft.custom_hooks].count('DAFTHook') == 1
    assert derived['DAFT w/o conversion'].model.method == 'daft-no-convert'
    assert derived['conversion only'].model.method == 'daft-convert-only'
    # a config already wrapped (the shipped DAFT config) is unwrapped, not wrapped twice
    shipped = load_config(str(CONFIGS / 'camvid' / 'daft_deeplabv3_r50-d8_camvid.py'))
    again = method_config(shipped, get_method('FT'), Point(lr=0.1), backbone='b.pth')
    assert again.model.model.type == 'EncoderDecoder' and again.model.method == 'ft'
    assert not any(h['type'] == 'DAFTHook' for h in again.get('custom_hooks', []))


def test_specification_keys_and_id_val_are_checked(tmp_path):
    from daft_mm.benchmark.task import task_from_config
    task = task_from_config(str(CAMVID_SPEC), options={'data_root': str(tmp_path)})
    # a dict without `type` changes the ID test set: same dataset and pipeline, another list
    assert task.ood['dusk'] == dict(task.id_test, ann_file='daft_splits/ood_dusk.txt')
    assert task.id_test['data_root'] == str(tmp_path) and task.budget == 300
    assert task.ood_names == ['dusk', 'gaussian_noise-3', 'motion_blur-3', 'fog-3']
    spec = tmp_path / 'spec.py'
    spec.write_text(f"_base_ = ['{CAMVID_SPEC}']\ncompare = dict(budgt=100)\n")
    with pytest.raises(ValueError, match=r"unknown compare key\(s\) \['budgt'\]"):
        task_from_config(str(spec))
    with pytest.raises(ValueError, match='the ID-val set is the ID test set'):
        task_from_config(str(CAMVID_SPEC), id_val=dict(ann_file='daft_splits/id_test.txt'))


def test_provenance_counts_each_part_of_a_concatenated_set(tmp_path):
    """VOC-aug style training sets are ConcatDatasets: each part is recorded and shown."""
    from daft_mm.benchmark.experiment import _provenance_md
    from daft_mm.benchmark.task import provenance
    (tmp_path / '.source_commit').write_text('abc123\n')
    for name, n in (('a.txt', 3), ('b.txt', 2)):
        (tmp_path / name).write_text(''.join(f'img{i} ann{i}\n' for i in range(n)) + '\n')
    part = dict(type='CamVidDataset', data_root=str(tmp_path))
    concat = dict(type='ConcatDataset', datasets=[dict(part, ann_file='a.txt'),
                                                  dict(part, ann_file='b.txt')])
    backbone = tmp_path / 'bb.pth'
    backbone.write_bytes(b'weights')
    record = provenance(dict(config=str(CAMVID_SPEC), options={}, id_val=concat,
                             id_test=dict(part, ann_file='a.txt'), ood={},
                             backbone=str(backbone)))
    parts = record['sets']['id_val']['parts']
    assert [p['images'] for p in parts] == [3, 2]
    assert all(p['source_commit'] == 'abc123' for p in parts)
    assert record['sets']['id_train']['ann_file'] == 'daft_splits/id_train.txt'
    assert 'pretraining' not in record['backbone']  # no sidecar JSON beside it
    md = _provenance_md(record)
    assert '- id_val [1]: `b.txt`' in md and '2 images, source commit abc123' in md
    assert '- id_test: `a.txt`' in md and 'bb.pth' in md
