#!/usr/bin/env python
"""Fine-tune an image classifier with FT / LP / LP-FT / DAFT; report ID and OOD accuracy.

    python tools/train_cls.py --benchmark --out cls_benchmark.json   # the fair experiment
    python tools/train_cls.py --benchmark --quick                    # seconds, smoke test
    python tools/train_cls.py --generate-demo data/demo   # train/ test/ ood_stripes/ ood_noise/
    python tools/train_cls.py --train data/demo/train --test data/demo/test \\
        --ood stripes=data/demo/ood_stripes --ood noise=data/demo/ood_noise \\
        --method ft lp lp-ft daft --arch resnet10 --small-input --iters 100 --out results.json \\
        --save-dir work_dirs/cls          # <method>_<setting>_seed<N>.pth: each fine-tuned model
    python tools/train_cls.py --train imagenette/train --val imagenette/val --method ft \\
        --arch resnet18 --iters 5000 --save-dir work_dirs/pretrain   # pretraining from scratch

Several methods in one call all start from the same initial (or --checkpoint) weights,
so their numbers are comparable. --checkpoint takes a torchvision-layout ResNet state dict or
a ResNetV1c backbone of tools/pretrain_backbone.py; its classifier is dropped when the class
count differs. Without --checkpoint the weights are random and DAFT converts no BN layer (there
is no pretrained function to keep) unless --pretrained names the modules to convert. --iters is
every method's whole budget: LP-FT's probe stage takes --lp-iters of it (default half). Every
probe (the LP method and LP-FT's first stage) trains at --lp-lr (default 10 x --lr). Choose
settings on --val (reported as "id_val"), never on --test or the OOD sets.

--benchmark runs daft_mm.benchmark.classification (source-task pretraining, a fresh fc for
every method, equal budgets, ID-val selection, then ID test and OOD) and prints its table;
--set KEY=VALUE changes any field of its config (VALUE as JSON: --set seeds=[0,1,2,3]).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from daft_mm.classification import (ARCHS, ImageFolder, build_resnet, evaluate, finetune,
                                    generate_demo_datasets, load_torchvision_state_dict)
from daft_mm.classification.models import has_deep_stem
from daft_mm.core import HEAD_SCOPES, RECIPES, get_recipe, recipe_name


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition('=')
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f'expected NAME=PATH, got {text!r}')
    return name, Path(path)


def _recipe(text: str) -> str:
    try:
        return recipe_name(text)
    except KeyError as err:
        raise argparse.ArgumentTypeError(err.args[0]) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--generate-demo', metavar='DIR', type=Path,
                        help='write small generated ID/OOD image folders to DIR and exit')
    parser.add_argument('--demo-classes', type=int, default=3)
    parser.add_argument('--demo-train-per-class', type=int, default=16)
    parser.add_argument('--demo-test-per-class', type=int, default=8)

    parser.add_argument('--benchmark', action='store_true',
                        help='run the fair classification benchmark and print its table')
    parser.add_argument('--quick', action='store_true',
                        help='with --benchmark: a seconds-long configuration (no conclusions)')
    parser.add_argument('--set', dest='overrides', action='append', default=[],
                        metavar='KEY=VALUE', help='with --benchmark: a config field (repeatable)')

    parser.add_argument('--train', type=Path, help='ID training set (root/<class>/<image>)')
    parser.add_argument('--val', type=Path,
                        help='ID validation set (reported as "id_val"): choose settings on it')
    parser.add_argument('--test', type=Path, help='ID test set (reported as "id")')
    parser.add_argument('--ood', type=_named_path, action='append', default=[],
                        metavar='NAME=PATH', help='an OOD test set (repeatable)')
    parser.add_argument('--method', nargs='+', default=['daft'], type=_recipe,
                        choices=sorted(RECIPES), help='recipes, in any case or spelling the '
                        'comparison uses (lp_ft, "DAFT w/o conversion" = daft-no-convert)')

    parser.add_argument('--arch', default='resnet18', choices=sorted(ARCHS))
    parser.add_argument('--width', type=int, default=64, help='base width (64 = torchvision)')
    parser.add_argument('--small-input', action='store_true',
                        help='3x3 stride-1 stem without max-pool, for ~32px images')
    parser.add_argument('--checkpoint', type=Path,
                        help='torchvision-layout ResNet state dict, or a ResNetV1c backbone of '
                        'tools/pretrain_backbone.py (its deep stem is detected; give its --arch '
                        'and --width, e.g. resnet18 --width 16 for the shipped one)')
    parser.add_argument('--head', nargs='+', default=['fc'], help='final predictor module(s)')
    parser.add_argument('--head-scope', choices=HEAD_SCOPES,
                        help='modules at the head LR (and trained by LP): the predictors or '
                             'every module new to the pretrained model (default: the recipe\'s)')
    parser.add_argument('--pretrained', nargs='+',
                        help='pretrained top-level modules, for --head-scope new_modules '
                             '(default: all that hold no --head module)')

    parser.add_argument('--image-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--iters', type=int, default=1000,
                        help='iterations of every method, LP-FT\'s two stages together (the '
                        'equal-budget rule)')
    parser.add_argument('--lp-iters', type=int,
                        help='with lp-ft: iterations of its probe stage, out of --iters '
                        '(default half)')
    parser.add_argument('--lp-lr', type=float,
                        help='with lp or lp-ft: the LR of every probe (the LP method and LP-FT\'s '
                        'first stage; default 10 x --lr: a probe trains the head alone, at a '
                        'far higher LR than fine-tuning)')
    parser.add_argument('--lr', type=float, default=0.01, help='backbone learning rate')
    parser.add_argument('--head-lr-mult', type=float,
                        help='head LR = lr x this (default: the method\'s, 10 for DAFT, else 1)')
    parser.add_argument('--momentum', type=float, default=0.9)
    parser.add_argument('--weight-decay', type=float, default=1e-4,
                        help='SGD weight decay (default 1e-4, as finetune() and the benchmark)')
    parser.add_argument('--warmup-iters', type=int, default=0,
                        help='linear LR warm-up over the first iterations of every stage: a zero '
                        'head at a high --head-lr-mult can diverge in its first steps')
    parser.add_argument('--schedule', default='cosine', choices=('cosine', 'constant'))
    parser.add_argument('--bn-batches', type=int, help='batches measured by DAFT BN conversion')
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--log-interval', type=int, default=50)
    parser.add_argument('--out', type=Path, help='write results as JSON here')
    parser.add_argument('--save-dir', type=Path,
                        help='write each fine-tuned model to <save-dir>/<method>_<setting>_'
                        'seed<N>.pth (a torchvision-layout state dict, what --checkpoint reads) '
                        'with everything that decided the run (method, classes, LRs, head '
                        'multiplier, probe LR and iterations, schedule, seed, accuracies); an '
                        'existing file is not overwritten')
    args = parser.parse_args(argv)
    if (not args.benchmark and args.generate_demo is None
            and (args.train is None or (args.test is None and args.val is None))):
        parser.error('--train and --val or --test are required (or use --generate-demo DIR or '
                     '--benchmark)')
    if args.lp_iters is not None and not 0 < args.lp_iters < args.iters:
        parser.error(f'--lp-iters must be between 1 and --iters - 1 ({args.iters - 1}): LP-FT\'s '
                     f'two stages share --iters; got {args.lp_iters}')
    if args.warmup_iters < 0:
        parser.error(f'--warmup-iters must be >= 0, got {args.warmup_iters}')
    if (args.quick or args.overrides) and not args.benchmark:
        parser.error('--quick and --set go with --benchmark')
    if not args.benchmark and args.generate_demo is None:
        methods = set(args.method)
        if args.lp_iters is not None and 'lp-ft' not in methods:
            parser.error('--lp-iters is the probe stage of lp-ft, which --method does not include')
        if args.lp_lr is not None and not methods & {'lp', 'lp-ft'}:
            parser.error('--lp-lr is the LR of the probes (lp, lp-ft), which --method does not '
                         'include')
        if 'lp-ft' in methods and args.iters < 2:
            parser.error(f'lp-ft trains two stages within --iters: give --iters >= 2, got '
                         f'{args.iters}')
    return args


def _json_safe(value: object) -> object:
    """NaN/inf (a diverged loss) become null: the file stays valid JSON and the run is kept."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Path | None, data: dict, what: str) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(data), indent=1, allow_nan=False, default=str))
    print(f'{what} written to {path}')


def _loader(dataset: ImageFolder, args: argparse.Namespace, *, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, drop_last=shuffle
                      and len(dataset) > args.batch_size, num_workers=args.workers,
                      generator=generator)


def _config_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise SystemExit(f'--set expects KEY=VALUE, got {text!r}')
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string: --set head_scope=new_modules


def stage_iters(method: str, iters: int, lp_iters: int | None) -> tuple[int, int | None]:
    """``(iterations of the last stage, of the stages before it)`` so that every method trains
    ``iters`` in all: LP-FT's probe takes ``lp_iters`` of them, default half."""
    recipe = get_recipe(method)
    if len(recipe.stages) == 1:
        return iters, None
    if lp_iters is not None:
        return iters - lp_iters, lp_iters
    *early, last = recipe.stage_iterations(iters)
    return last, early[0]


def _probe_lr(args: argparse.Namespace) -> float:
    """The LR of every probe (the LP method, LP-FT's first stage): one rule for both."""
    return args.lp_lr if args.lp_lr is not None else 10 * args.lr


def _setting(args: argparse.Namespace, method: str) -> dict:
    """Everything that decides a run of ``method`` besides the data and the start weights."""
    recipe = get_recipe(method)
    head_mult = (args.head_lr_mult if args.head_lr_mult is not None
                 else recipe.stages[-1].head_lr_mult)
    _, lp_iters = stage_iters(method, args.iters, args.lp_iters)
    probe = method in ('lp', 'lp-ft')
    return {'method': method, 'lr': _probe_lr(args) if method == 'lp' else args.lr,
            'head_lr_mult': head_mult, 'head_scope': args.head_scope,
            'probe_lr': _probe_lr(args) if probe else None, 'probe_iters': lp_iters,
            'iters': args.iters, 'weight_decay': args.weight_decay,
            'momentum': args.momentum, 'warmup_iters': args.warmup_iters,
            'batch_size': args.batch_size, 'schedule': args.schedule, 'seed': args.seed}


def _model_path(args: argparse.Namespace, method: str) -> Path:
    """``<save-dir>/<method>_lr<LR>[_probe<LR>][_head<MULT>]_seed<N>.pth``: runs with other
    seeds or settings get other files."""
    s = _setting(args, method)
    name = f'{method}_lr{s["lr"]:g}'
    if s['probe_lr'] is not None and method != 'lp':
        name += f'_probe{s["probe_lr"]:g}'
    if s['head_lr_mult'] != 1.0:
        name += f'_head{s["head_lr_mult"]:g}'
    return args.save_dir / f'{name}_seed{args.seed}.pth'


def _save_model(model: torch.nn.Module, args: argparse.Namespace, method: str,
                classes: list[str], accuracy: dict) -> None:
    """The torchvision-layout state dict and everything that decided the run."""
    from daft_mm.utils import atomic_save
    path = _model_path(args, method)
    meta = dict(_setting(args, method), arch=args.arch, width=args.width,
                small_input=args.small_input, classes=classes, image_size=args.image_size,
                accuracy=accuracy, train=str(args.train),
                checkpoint=None if args.checkpoint is None else str(args.checkpoint),
                torch=str(torch.__version__))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save(lambda f: torch.save({'state_dict': state, 'meta': meta}, f), str(path))
    print(f'{method}: model written to {path}')


def run_benchmark(args: argparse.Namespace) -> dict:
    """The thin command line over :func:`run_classification_benchmark`."""
    from daft_mm.benchmark.classification import (ClassificationBenchmarkConfig,
                                                  format_table, quick_config, replace_config,
                                                  run_classification_benchmark)
    config = quick_config() if args.quick else ClassificationBenchmarkConfig()
    changes = dict(_config_value(text) for text in args.overrides)
    if args.head_scope is not None:
        changes.setdefault('head_scope', args.head_scope)
    try:
        config = replace_config(config, **changes)
    except (TypeError, ValueError) as error:
        raise SystemExit(f'--set: {error}') from None
    report = run_classification_benchmark(config, log=print)
    print(format_table(report))
    _write_json(args.out, report, 'report')
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.benchmark:
        return run_benchmark(args)
    if args.generate_demo is not None:
        written = generate_demo_datasets(
            args.generate_demo, num_classes=args.demo_classes,
            train_per_class=args.demo_train_per_class,
            test_per_class=args.demo_test_per_class, seed=args.seed)
        print(json.dumps({name: str(path) for name, path in written.items()}, indent=2))
        return {'generated': {name: str(path) for name, path in written.items()}}

    train_set = ImageFolder(args.train, image_size=args.image_size, hflip=True)
    classes = train_set.classes
    eval_sets = {}
    for name, path in [('id_val', args.val), ('id', args.test)] + list(args.ood):
        if path is None:
            continue
        if name in eval_sets:
            raise SystemExit(f'--ood name {name!r} is used twice (or is a reserved name: id, '
                             'id_val)')
        eval_sets[name] = ImageFolder(path, classes=classes, image_size=args.image_size)

    if args.save_dir is not None:  # before any training: a clash is found at once
        taken = [str(path) for path in (_model_path(args, m) for m in args.method)
                 if path.exists()]
        if taken:
            raise SystemExit(f'--save-dir: {", ".join(taken)} exist(s) already (the same method, '
                             'setting and seed); not overwritten. Fix: another --save-dir, or '
                             'remove them')
    torch.manual_seed(args.seed)
    saved = (None if args.checkpoint is None else  # read once: its layout decides the model
             torch.load(args.checkpoint, map_location='cpu', weights_only=True))
    deep_stem = saved is not None and has_deep_stem(saved)
    initial = build_resnet(args.arch, len(classes), base_width=args.width,
                           small_input=args.small_input, deep_stem=deep_stem)
    if deep_stem:
        print(f'{args.checkpoint}: a ResNetV1c deep stem (the OpenMMLab layout of '
              'tools/pretrain_backbone.py): the model is built with it')
    checkpoint = None
    if args.checkpoint is not None:
        checkpoint = load_torchvision_state_dict(initial, saved, head=args.head[0],
                                                 source=str(args.checkpoint))
        print(f'loaded {checkpoint.loaded} tensors from {checkpoint.path}'
              + (f'; new head {checkpoint.dropped_head}' if checkpoint.dropped_head else ''))

    results = {}
    for method in args.method:
        model = copy.deepcopy(initial)  # every method starts from the same weights
        start = time.perf_counter()
        iters, lp_iters = stage_iters(method, args.iters, args.lp_iters)
        recipe = get_recipe(method)
        if recipe.uses_bn_conversion and checkpoint is None and args.pretrained is None:
            print(f'WARNING {method}: no --checkpoint, so the weights are random and no BN layer '
                  'is converted (conversion keeps a pretrained function; from random weights '
                  'there is none): the run is its other parts alone. Pass --checkpoint with '
                  'pretrained weights, or --pretrained MODULES to convert chosen modules anyway')
            recipe = dataclasses.replace(recipe, stages=tuple(
                dataclasses.replace(stage, convert_bn=False) for stage in recipe.stages))
        run = finetune(model, _loader(train_set, args, shuffle=True), method=recipe,
                       iters=iters, lp_iters=lp_iters,
                       lr=_probe_lr(args) if method == 'lp' else args.lr,
                       lp_lr=_probe_lr(args),
                       bn_loader=_loader(train_set, args, shuffle=False),  # every image once
                       head_names=args.head, head_lr_mult=args.head_lr_mult,
                       head_scope=args.head_scope, pretrained=args.pretrained,
                       momentum=args.momentum, weight_decay=args.weight_decay,
                       schedule=args.schedule, warmup_iters=args.warmup_iters,
                       bn_max_batches=args.bn_batches, device=args.device, seed=args.seed,
                       log=print, log_interval=args.log_interval)
        if run.bn_conversion is not None and run.bn_conversion.layers:
            print(f'{method}: BN statistics from {run.bn_conversion.layers[0].num_samples} of '
                  f'the {len(train_set)} training images')
        accuracy = {name: evaluate(model, _loader(dataset, args, shuffle=False),
                                   device=args.device)
                    for name, dataset in eval_sets.items()}
        results[method] = {'accuracy': accuracy, 'seconds': time.perf_counter() - start,
                           **run.to_dict()}
        print(f'{method}: ' + ', '.join(f'{k} {v:.4f}' for k, v in accuracy.items()))
        if args.save_dir is not None:
            _save_model(model, args, method, classes, accuracy)

    summary = {
        'classes': classes,
        'datasets': {'train': str(args.train), **{k: str(v.root) for k, v in eval_sets.items()}},
        'budget': {'iters': args.iters},  # every method's; each run's stages say the split
        'checkpoint': None if checkpoint is None else vars(checkpoint),
        'args': {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k != 'ood'} | {'ood': {k: str(v) for k, v in args.ood}},
        'torch': torch.__version__,
        'results': results,
    }
    _write_json(args.out, summary, 'results')
    return summary


if __name__ == '__main__':
    main()
