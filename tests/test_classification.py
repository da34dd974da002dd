"""daft_mm.classification and tools/train_cls.py, on tiny real models and generated data."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from daft_mm.classification import (ImageFolder, build_resnet, evaluate, finetune,
                                    generate_demo_datasets, load_torchvision_state_dict)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared, loaded CPU torch's
    thread pool makes these tests up to 30x slower; restored for other modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_resnet(num_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_resnet('resnet10', num_classes, base_width=4, small_input=True)


def colour_loader(n: int = 48, seed: int = 0, batch_size: int = 16) -> DataLoader:
    """Class k = images whose channel k is bright: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randn(n, 3, 8, 8, generator=gen) * 0.5
    images[torch.arange(n), labels] += 2.0
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True,
                      generator=gen)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


# ------------------------------------------------------------------ models
def test_resnet_matches_torchvision_layout():
    # torchvision's published parameter counts and state-dict key counts.
    r18, r50 = build_resnet('resnet18', 1000), build_resnet('resnet50', 1000)
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032
    assert len(r18.state_dict()) == 122 and len(r50.state_dict()) == 320
    keys = set(r50.state_dict())
    assert {'conv1.weight', 'bn1.running_var', 'layer1.0.downsample.0.weight',
            'layer4.2.bn3.num_batches_tracked', 'fc.weight', 'fc.bias'} <= keys
    assert r50.layer2[0].conv2.stride == (2, 2)  # stride on the 3x3, as in torchvision
    assert r18(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_checkpoint_with_other_class_count_loads_backbone_and_keeps_new_head(tmp_path):
    source = build_resnet('resnet10', 1000, base_width=4, small_input=True)
    wrapped = {'state_dict': {f'module.{k}': v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / 'ckpt.pth')
    target = tiny_resnet(num_classes=3)
    own_fc = target.fc.weight.detach().clone()

    load = load_torchvision_state_dict(target, tmp_path / 'ckpt.pth')
    assert load.dropped_head == ['fc.weight', 'fc.bias']
    for key, value in source.state_dict().items():
        if not key.startswith('fc.'):
            assert torch.equal(target.state_dict()[key], value), key
    assert torch.equal(target.fc.weight, own_fc)


def test_checkpoint_of_another_architecture_is_refused():
    deeper = build_resnet('resnet18', 3, base_width=4, small_input=True).state_dict()
    with pytest.raises(ValueError, match='unexpected'):
        load_torchvision_state_dict(tiny_resnet(), deeper)
    wider = build_resnet('resnet10', 3, base_width=8, small_input=True).state_dict()
    with pytest.raises(ValueError, match='shapes differ'):
        load_torchvision_state_dict(tiny_resnet(), wider)


# ------------------------------------------------------------------ data
def test_image_folder_reads_generated_data_with_shared_class_indices(tmp_path):
    splits = generate_demo_datasets(tmp_path, num_classes=3, train_per_class=2,
                                    test_per_class=1, image_size=16)
    assert set(splits) == {'train', 'test', 'ood_stripes', 'ood_noise'}
    train = ImageFolder(splits['train'], image_size=12)
    assert train.classes == ['circle', 'square', 'triangle'] and len(train) == 6
    image, label = train[5]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32 and label == 2

    (tmp_path / 'ood_stripes' / 'circle').rename(tmp_path / 'ood_stripes' / 'gone')
    with pytest.raises(ValueError, match="'gone'"):
        ImageFolder(splits['ood_stripes'], classes=train.classes)
    ood = ImageFolder(splits['ood_noise'], classes=['triangle', 'circle', 'square'])
    assert [label for _, label in ood.samples] == [1, 2, 0]  # folder names -> given indices
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / 'missing')


# ------------------------------------------------------------------ finetune / evaluate
def test_lp_leaves_backbone_weights_and_bn_stats_untouched():
    model = tiny_resnet()
    before = snapshot(model)
    run = finetune(model, colour_loader(), method='lp', iters=4, lr=0.1, seed=0)
    assert changed(before, model) == {'fc.weight', 'fc.bias'}
    assert all(p.requires_grad for p in model.parameters())  # freezing undone afterwards
    (stage,) = run.stages
    assert stage.trainable_params == sum(p.numel() for p in model.fc.parameters())


def test_daft_converts_bn_zeroes_the_head_and_then_trains_everything():
    model = tiny_resnet()
    before = snapshot(model)
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    run = finetune(model, colour_loader(), method='daft', iters=3, lr=0.05, seed=0,
                   bn_max_batches=2)
    assert run.bn_conversion is not None and len(run.bn_conversion.converted) == bn_count
    assert run.bn_conversion.num_batches == 2
    (stage,) = run.stages
    assert stage.head_lr == pytest.approx(10 * stage.lr)
    assert model.fc.weight.any()  # started at zero, trained from there
    assert 'layer1.0.conv1.weight' in changed(before, model)  # the backbone moved too


def test_daft_head_starts_at_zero():
    model = tiny_resnet()
    finetune(model, colour_loader(), method='daft', iters=1, lr=0.0, head_lr_mult=1.0,
             bn_max_batches=1)
    assert not model.fc.weight.any() and not model.fc.bias.any()  # lr 0: still the init


def test_lp_ft_runs_lp_then_full_fine_tuning():
    model = tiny_resnet()
    before = snapshot(model)
    run = finetune(model, colour_loader(), method='lp-ft', iters=3, lp_iters=2, lr=0.05,
                   seed=0)
    lp, ft = run.stages
    assert (lp.name, lp.iters, ft.name, ft.iters) == ('lp', 2, 'ft', 3)
    assert lp.trainable_params < ft.trainable_params == sum(p.numel() for p in
                                                            model.parameters())
    assert 'layer1.0.conv1.weight' in changed(before, model)


def test_daft_learns_a_separable_task():
    model = tiny_resnet()
    loader = colour_loader(n=96)
    finetune(model, loader, method='daft', iters=30, lr=0.05, seed=0)
    assert evaluate(model, loader) >= 0.9


def test_evaluate_counts_correctly_and_restores_modes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3, bias=False), nn.BatchNorm1d(3))
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3))
    model.train()
    model[2].eval()
    inputs = torch.eye(3).repeat(2, 1)
    targets = torch.tensor([0, 1, 2, 0, 0, 0])
    accuracy = evaluate(model, DataLoader(TensorDataset(inputs, targets), batch_size=4))
    assert accuracy == pytest.approx(4 / 6)
    assert model.training and model[1].training and not model[2].training


def test_bad_arguments_fail_before_training():
    with pytest.raises(KeyError, match='unknown fine-tuning method'):
        finetune(tiny_resnet(), colour_loader(), method='sft', iters=1, lr=0.1)
    with pytest.raises(KeyError, match="'head'"):
        finetune(tiny_resnet(), colour_loader(), method='ft', iters=1, lr=0.1,
                 head_names=['head'])
    with pytest.raises(ValueError, match='no batch'):
        finetune(tiny_resnet(), [], method='ft', iters=1, lr=0.1)
    model = tiny_resnet()
    before = snapshot(model)
    with pytest.raises(TypeError, match='only final predictor'):  # a block, not a predictor
        finetune(model, colour_loader(), method='daft', iters=1, lr=0.1, head_names=['layer4'])
    assert not changed(before, model)  # refused before BN conversion rewrote anything


# ------------------------------------------------------------------ tools/train_cls.py
def _run_tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # see one_thread
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / 'train_cls.py'), *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_train_cls_end_to_end_all_methods(tmp_path):
    data = tmp_path / 'demo'
    generate_demo_datasets(data, train_per_class=8, test_per_class=4)  # what --generate-demo runs
    checkpoint = tmp_path / 'pretrained.pth'  # torchvision layout, 1000-class head
    torch.save(build_resnet('resnet10', 1000, base_width=4, small_input=True).state_dict(),
               checkpoint)
    out = tmp_path / 'results' / 'run.json'
    _run_tool('--train', str(data / 'train'), '--test', str(data / 'test'),
              '--ood', f'stripes={data / "ood_stripes"}', '--ood', f'noise={data / "ood_noise"}',
              '--method', 'ft', 'lp', 'lp-ft', 'daft', '--arch', 'resnet10', '--width', '4',
              '--small-input', '--checkpoint', str(checkpoint), '--image-size', '32',
              '--batch-size', '8', '--iters', '2', '--lp-iters', '1', '--lr', '0.01',
              '--out', str(out))

    summary = json.loads(out.read_text())
    assert summary['classes'] == ['circle', 'square', 'triangle']
    assert summary['checkpoint']['dropped_head'] == ['fc.weight', 'fc.bias']
    results = summary['results']
    assert list(results) == ['ft', 'lp', 'lp-ft', 'daft']
    for method, result in results.items():
        assert set(result['accuracy']) == {'id', 'stripes', 'noise'}, method
        for value in result['accuracy'].values():
            assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert [s['name'] for s in results['lp-ft']['stages']] == ['lp', 'ft']
    assert results['daft']['bn_conversion']['layers']
    assert results['ft']['bn_conversion'] is None


def test_daft_leaves_a_new_head_batchnorm_as_initialised():
    """The rule of every front end: a new module's BN has no pretrained function to keep, so
    conversion leaves it exactly as initialised (here a fresh neck in front of ``fc``)."""
    model = tiny_resnet()
    model.fc = nn.Sequential(nn.BatchNorm1d(model.fc.in_features), nn.Linear(model.fc.in_features, 3))
    head_bn = snapshot(model.fc[0])
    backbone = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    loader = colour_loader()
    run = finetune(model, loader, method='daft', iters=1, lr=0.0, head_names=['fc.1'],
                   pretrained=['conv1', 'bn1', 'layer1', 'layer2', 'layer3', 'layer4'],
                   bn_max_batches=1)
    assert run.bn_conversion.converted == backbone
    assert run.bn_conversion.left_as_initialised == ['fc.0']
    # lr 0: after conversion nothing but the train-mode statistics of fc.0 moved; its
    # affine parameters are its initialisation
    assert torch.equal(model.fc[0].weight, head_bn['weight'])
    assert torch.equal(model.fc[0].bias, head_bn['bias'])


def test_statistics_pass_reads_the_whole_training_set_when_given_its_loader():
    """A training loader with drop_last skips the last images; bn_loader reads every one."""
    data = colour_loader(n=40, batch_size=16).dataset
    train = DataLoader(data, batch_size=16, shuffle=True, drop_last=True)
    dropped = finetune(tiny_resnet(), train, method='daft', iters=1, lr=0.0)
    whole = finetune(tiny_resnet(), train, method='daft', iters=1, lr=0.0,
                     bn_loader=DataLoader(data, batch_size=16))
    assert dropped.bn_conversion.layers[0].num_samples == 32
    assert whole.bn_conversion.layers[0].num_samples == 40


def test_train_cls_as_a_researcher_uses_it(tmp_path):
    """Issue 22 item 17: an ID-val set, equal budgets for LP-FT, a probe LR of its own, models
    saved (and read back as --checkpoint), one weight-decay default, a warm-up option."""
    import inspect
    data = tmp_path / 'demo'
    generate_demo_datasets(data, train_per_class=8, test_per_class=4)
    out, saved = tmp_path / 'run.json', tmp_path / 'models'
    common = ['--train', str(data / 'train'), '--arch', 'resnet10', '--width', '4',
              '--small-input', '--image-size', '32', '--batch-size', '8', '--lr', '0.01']
    _run_tool(*common, '--val', str(data / 'test'), '--method', 'ft', 'lp-ft', 'daft',
              '--iters', '4', '--warmup-iters', '2', '--save-dir', str(saved), '--out', str(out))
    summary = json.loads(out.read_text())
    for method, result in summary['results'].items():
        assert set(result['accuracy']) == {'id_val'}, method  # not called "id"
        assert sum(stage['iters'] for stage in result['stages']) == 4, method  # equal budgets
    probe = summary['results']['lp-ft']['stages'][0]
    assert probe['name'] == 'lp' and probe['lr'] == pytest.approx(0.1)  # 10 x --lr by default
    # one default for the command line and the API
    tool = _load_train_cls()
    assert tool.parse_args(['--train', 'a', '--test', 'b']).weight_decay == \
        inspect.signature(finetune).parameters['weight_decay'].default
    # a saved model is what --checkpoint reads: the same classes, nothing dropped
    meta = torch.load(saved / 'ft_lr0.01_seed0.pth', weights_only=True)['meta']
    assert meta['method'] == 'ft' and meta['classes'] == ['circle', 'square', 'triangle']
    proc = _run_tool(*common, '--test', str(data / 'test'), '--checkpoint',
                     str(saved / 'ft_lr0.01_seed0.pth'), '--method', 'ft', '--iters', '1')
    assert 'new head' not in proc.stdout and 'loaded' in proc.stdout


def test_train_cls_one_probe_rule_named_models_and_checked_flags(tmp_path):
    """Issue 32 item 6: every probe at --lp-lr; models named by method, setting and seed and
    never overwritten, their metadata complete; DAFT's statistics pass reads every training
    image (the training loader drops the last partial batch); DAFT without --checkpoint converts
    nothing and says so; flags without their method are usage errors; a backbone written by
    tools/pretrain_backbone.py is refused with the reason."""
    data = tmp_path / 'demo'
    generate_demo_datasets(data, train_per_class=8, test_per_class=4)  # 24 training images
    out, saved = tmp_path / 'run.json', tmp_path / 'models'
    common = ['--train', str(data / 'train'), '--test', str(data / 'test'), '--arch', 'resnet10',
              '--width', '4', '--small-input', '--image-size', '32', '--batch-size', '10',
              '--lr', '0.01']
    proc = _run_tool(*common, '--method', 'lp', 'lp-ft', 'daft', '--iters', '4',
                     '--save-dir', str(saved), '--out', str(out))
    results = json.loads(out.read_text())['results']
    assert results['lp']['stages'][0]['lr'] == results['lp-ft']['stages'][0]['lr'] == \
        pytest.approx(0.1)  # one rule: 10 x --lr for every probe
    assert 'WARNING daft: no --checkpoint' in proc.stdout
    assert results['daft']['bn_conversion'] is None
    names = sorted(p.name for p in saved.iterdir())
    assert names == ['daft_lr0.01_head10_seed0.pth', 'lp-ft_lr0.01_probe0.1_seed0.pth',
                     'lp_lr0.1_seed0.pth']
    meta = torch.load(saved / 'lp-ft_lr0.01_probe0.1_seed0.pth', weights_only=True)['meta']
    assert {k: meta[k] for k in ('probe_lr', 'probe_iters', 'head_lr_mult', 'weight_decay',
                                 'warmup_iters', 'batch_size', 'schedule', 'seed')} == dict(
        probe_lr=pytest.approx(0.1), probe_iters=2, head_lr_mult=1.0, weight_decay=1e-4,
        warmup_iters=0, batch_size=10, schedule='cosine', seed=0)
    # the same run again is refused before it trains; another seed gets files of its own
    again = subprocess.run([sys.executable, str(REPO / 'tools' / 'train_cls.py'), *common,
                            '--method', 'lp', '--iters', '4', '--save-dir', str(saved)],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode != 0 and 'not overwritten' in again.stderr
    assert 'model written' not in again.stdout
    # DAFT from pretrained weights: its statistics pass reads all 24 images, not 20
    proc = _run_tool(*common, '--method', 'daft', '--iters', '1', '--seed', '1',
                     '--checkpoint', str(saved / 'lp_lr0.1_seed0.pth'), '--save-dir', str(saved))
    assert 'daft: BN statistics from 24 of the 24 training images' in proc.stdout
    assert (saved / 'daft_lr0.01_head10_seed1.pth').is_file()
    tool = _load_train_cls()
    for bad in (['--method', 'ft', '--lp-iters', '2'],
                ['--method', 'ft', 'daft', '--lp-lr', '1'], ['--method', 'lp-ft', '--iters', '1']):
        with pytest.raises(SystemExit) as exit_:
            tool.parse_args(['--train', 'a', '--test', 'b'] + bad)
        assert exit_.value.code == 2, bad
    # the backbone tools/pretrain_backbone.py wrote (ResNetV1c-18 at 1/4 width, OpenMMLab
    # layout) loads: its deep stem is detected, every backbone tensor fills, the head is new
    shipped = REPO / 'benchmarks' / 'pretrained' / 'imagenette_resnetv1c18w16_64px.pth'
    proc = _run_tool('--train', str(data / 'train'), '--test', str(data / 'test'), '--arch',
                     'resnet18', '--width', '16', '--image-size', '32', '--batch-size', '10',
                     '--method', 'daft', '--iters', '1', '--checkpoint', str(shipped))
    assert 'a ResNetV1c deep stem' in proc.stdout
    backbone = torch.load(shipped, weights_only=True)['state_dict']
    assert f'loaded {len(backbone)} tensors from {shipped}; new head' in proc.stdout
    assert 'daft: BN statistics from 24 of the 24 training images' in proc.stdout


def _load_train_cls():
    from _tools import load_tool
    return load_tool('train_cls')  # its command line, in-process


def test_warmup_ramps_the_learning_rate_from_zero():
    lrs = []
    finetune(tiny_resnet(), colour_loader(), method='daft', iters=6, lr=0.1, warmup_iters=4,
             schedule='constant', bn_max_batches=1,
             on_step=lambda info: lrs.append(info.optimizer.param_groups[0]['lr']))
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
