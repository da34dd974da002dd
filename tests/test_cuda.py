"""GPU checks (``pytest -m cuda``; skipped without CUDA). They need torch only, so they run on a
bare CUDA machine: BN conversion on the GPU in every precision regime against a float64 reference
of the same BN inputs (``benchmarks/bench_gpu.py`` holds the checks; its full run adds timings)."""
from __future__ import annotations

import pytest
import torch

from _tools import load_tool

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


@pytest.fixture(scope='module')
def bench():
    return load_tool('bench_gpu', folder='benchmarks')


@pytest.mark.parametrize('case', ['float32', 'channels_last', 'bf16_autocast', 'float16',
                                  'syncbn'])
def test_conversion_on_cuda_matches_float64_reference(bench, case):
    device = torch.device('cuda')
    base = bench.build_model(bench.argparse.Namespace(quick=True))
    batches = bench.make_batches(3, 2, (64, 96), device, seed=2)
    result = bench.check_case(case, base, batches, device)
    assert result['ok'], result
    # the statistics stay float32 buffers on the GPU, whatever the activations' precision
    assert result['layers'] == sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                   for m in base.modules())


def test_converted_cuda_model_equals_cpu_conversion(bench):
    """The GPU (var_mean) and CPU (row reductions) statistics paths agree on the same data."""
    base = bench.build_model(bench.argparse.Namespace(quick=True))
    gpu, cpu = base.cuda(), bench.copy.deepcopy(base).cpu()
    batches = bench.make_batches(2, 2, (64, 96), torch.device('cpu'), seed=4)
    torch.backends.cudnn.allow_tf32 = False
    try:
        bench.convert_bn(gpu, [x.cuda() for x in batches])
    finally:
        torch.backends.cudnn.allow_tf32 = True
    bench.convert_bn(cpu, batches)
    for (name, a), b in zip(gpu.state_dict().items(), cpu.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_bench_gpu_quick_on_cuda(bench, tmp_path):
    assert bench.main(['--quick', '--device', 'cuda', '--out', str(tmp_path / 'g.json')]) == 0
