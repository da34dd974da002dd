"""The benchmarks run end to end in --quick mode and write valid JSON (no speed targets here:
timings on shared machines are noise; the figures live in docs/performance.md)."""
from __future__ import annotations

import json
import math
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
