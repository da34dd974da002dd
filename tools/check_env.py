#!/usr/bin/env python
"""Check the current Python environment against the versions daft-mm is tested with, and say
exactly what is missing, too old, too new or broken, with the command that fixes each.

    python tools/check_env.py               # everything daft-mm needs
    python tools/check_env.py --before-pip  # only what `pip install -e .` must not install itself:
                                            # Python, torch, mmcv with its compiled ops

Exit status 0 when all is fine, 1 otherwise. ``make install-here`` runs the first form before and
the second after ``pip install -e .``. Imports nothing of daft_mm (it must run where daft_mm cannot
be imported yet); the tested ranges come from ``daft_mm/_versions.py``.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare environment: pip always carries its own copy
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

VERSIONS = runpy.run_path(str(Path(__file__).resolve().parents[1] / 'daft_mm' / '_versions.py'))
OPENMMLAB_MMCV_INDEX = 'https://download.openmmlab.com/mmcv/dist/{tag}/torch2.1/index.html'
# OpenMMLab publishes prebuilt mmcv 2.1.0 wheels for torch 2.1 with these CUDA versions (and CPU).
PREBUILT_CUDA = {'11.8': 'cu118', '12.1': 'cu121'}


@dataclass
class Finding:
    """One line of the report: a package, its state and, unless it is fine, the fix."""
    name: str
    state: str  # 'ok', 'MISSING', 'TOO OLD', 'TOO NEW', 'BROKEN'
    found: str = ''
    wanted: str = ''
    fix: str = ''

    @property
    def ok(self) -> bool:
        return self.state == 'ok'

    def line(self) -> str:
        text = f'  {self.state:<8} {self.name:<22} {self.found:<24} (tested: {self.wanted})'
        return text + (f'\n           -> {self.fix}' if self.fix else '')


def compare(name: str, found: str | None, wanted: str, fix: str) -> Finding:
    """Place ``found`` against the range ``wanted``: ok, missing, too old or too new."""
    if found is None:
        return Finding(name, 'MISSING', '', wanted or 'any', fix)
    if not wanted:
        return Finding(name, 'ok', found, 'any')
    spec = SpecifierSet(wanted)
    try:
        version = Version(found)
    except InvalidVersion:
        return Finding(name, 'BROKEN', found, wanted, f'unreadable version; {fix}')
    # Compare the release only: torch's local part (2.1.2+cu121) must not affect the range.
    release = Version(version.base_version)
    if release in spec:
        return Finding(name, 'ok', found, wanted)
    too_new = any(s.operator in ('<', '<=') and not s.contains(release) for s in spec)
    return Finding(name, 'TOO NEW' if too_new else 'TOO OLD', found, wanted, fix)


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def python_finding() -> Finding:
    found = '.'.join(map(str, sys.version_info[:3]))
    return compare('python', found, VERSIONS['PYTHON'],
                   'CI tests Python 3.11 only; create a Python 3.11 environment')


def torch_finding() -> tuple[Finding, object | None]:
    """The torch check, and the imported module when it is usable (the mmcv advice depends on it)."""
    fix = ('install a torch in the tested range first, e.g. torch 2.1.2 for CUDA 12.1 (what '
           "OpenMMLab's prebuilt mmcv wheels need): pip install torch==2.1.2 "
           '--index-url https://download.pytorch.org/whl/cu121')
    finding = compare('torch', installed('torch'), VERSIONS['TORCH'], fix)
    if finding.state == 'MISSING':
        return finding, None
    try:
        import torch
    except Exception as err:  # noqa: BLE001  (a broken install: report it, do not crash)
        return Finding('torch', 'BROKEN', finding.found, VERSIONS['TORCH'],
                       f'import torch fails ({type(err).__name__}: {err}); reinstall torch'), None
    cuda = torch.version.cuda
    gpus = torch.cuda.device_count() if cuda else 0
    finding.found = f'{torch.__version__}'
    if finding.ok:
        finding.fix = ''
    note = f'CUDA {cuda}, {gpus} GPU(s) visible' if cuda else 'CPU-only build'
    finding.wanted = f'{VERSIONS["TORCH"]}; this one: {note}'
    return finding, torch


def mmcv_install_command(torch: object | None) -> str:
    """The command that installs an mmcv 2.1.0 with ops matching the installed torch."""
    if torch is None:
        return 'install torch first, then mmcv 2.1.0 built for it (docs/install.md)'
    release = torch.__version__.split('+')[0]
    cuda = torch.version.cuda
    if release.startswith('2.1.') and (cuda is None or cuda in PREBUILT_CUDA):
        tag = PREBUILT_CUDA[cuda] if cuda else 'cpu'
        return (f'pip install mmcv==2.1.0 -f {OPENMMLAB_MMCV_INDEX.format(tag=tag)}  '
                "(OpenMMLab's prebuilt wheel)")
    force = 1 if cuda else 0
    need = f' (needs nvcc {cuda}, the CUDA torch was built with)' if cuda else ''
    return (f'no prebuilt mmcv 2.1.0 for torch {torch.__version__}: build it{need}, ~30-60 min: '
            f'pip install "setuptools<82" && MMCV_WITH_OPS=1 FORCE_CUDA={force} '
            'pip install --no-build-isolation --no-binary mmcv mmcv==2.1.0')


def mmcv_finding(torch: object | None, import_ops: Callable[[], object] | None = None) -> Finding:
    """mmcv: version, compiled ops that load with this torch, and CUDA ops where there is a GPU."""
    fix = mmcv_install_command(torch)
    finding = compare('mmcv', installed('mmcv'), VERSIONS['MMCV'], fix)
    if installed('mmcv-lite') and finding.state == 'MISSING':
        return Finding('mmcv', 'BROKEN', 'mmcv-lite ' + installed('mmcv-lite'), VERSIONS['MMCV'],
                       f'mmcv-lite has no compiled ops; pip uninstall mmcv-lite, then {fix}')
    if not finding.ok or torch is None:
        return finding
    if import_ops is None:
        def import_ops() -> object:
            import mmcv.ops
            return mmcv.ops
    try:
        ops = import_ops()
    except ModuleNotFoundError as err:  # mmcv._ext missing: built without ops
        return Finding('mmcv', 'BROKEN', finding.found, VERSIONS['MMCV'],
                       f'installed without its compiled ops ({err}); reinstall: {fix}')
    except (ImportError, OSError) as err:  # undefined symbol: compiled against another torch
        return Finding('mmcv', 'BROKEN', finding.found, VERSIONS['MMCV'],
                       f'its compiled ops do not load with torch {torch.__version__} (built for '
                       f'another torch?): {str(err).splitlines()[0][:160]}; reinstall: {fix}')
    compiled_cuda = ops.get_compiling_cuda_version()
    finding.found += ', ops: ' + ('CPU only' if compiled_cuda == 'not available'
                                  else f'CUDA {compiled_cuda}')
    if torch.cuda.is_available() and compiled_cuda == 'not available':
        return Finding('mmcv', 'BROKEN', finding.found, VERSIONS['MMCV'],
                       'this machine has a GPU but mmcv was built without CUDA ops (detection '
                       f'heads need them on GPU tensors); reinstall: {fix}')
    return finding


def runtime_findings() -> list[Finding]:
    """The pure-Python packages of ``RUNTIME`` (``pip install -e .`` installs what is missing)."""
    findings = []
    for requirement in VERSIONS['RUNTIME']:
        name = requirement.split('>')[0].split('<')[0].split('=')[0].split('!')[0].strip()
        wanted = requirement[len(name):]
        name = name.split('[')[0]  # 'ray[tune]': the distribution is ray
        findings.append(compare(name, installed(name), wanted, f'pip install "{requirement}"'))
    if importlib.util.find_spec('pkg_resources') is None:
        findings.append(Finding('pkg_resources', 'MISSING', '', 'setuptools<82',
                                'pip install "setuptools>=61,<82"'))
    return findings


def check(before_pip: bool = False) -> list[Finding]:
    findings = [python_finding()]
    torch_result, torch = torch_finding()
    findings += [torch_result, mmcv_finding(torch if torch_result.ok else None)]
    if not before_pip:
        findings += runtime_findings()
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--before-pip', action='store_true',
                        help='check only Python, torch and mmcv (what pip install -e . leaves alone)')
    args = parser.parse_args(argv)
    findings = check(args.before_pip)
    print(f'daft-mm environment check: {sys.executable}')
    for finding in findings:
        print(finding.line())
    problems = [f for f in findings if not f.ok]
    if problems:
        print(f'{len(problems)} problem(s): ' + ', '.join(f'{f.name} {f.state.lower()}'
                                                          for f in problems))
        return 1
    print('all tested versions found' + (' (torch, mmcv)' if args.before_pip else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
