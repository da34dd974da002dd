"""A script of tools/ (or benchmarks/) as a module, for the tests of its command line: they call
its ``main(argv)`` / ``parse_args(argv)`` in-process (seconds instead of a fresh interpreter per
run). Library code is not reached this way: it lives in the package and the tests import it. Not a
test module (no ``test_`` prefix). The module is registered as ``daft_tools_<name>``: several
tools' names (test.py, test_robustness.py) would clash with test modules or with each other."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str, folder: str = 'tools') -> ModuleType:
    """``<folder>/<name>.py`` (a script of tools/ or benchmarks/) as a module, loaded once per
    test session."""
    key = f'daft_{folder}_{name}'
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / folder / f'{name}.py')
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # before exec: dataclasses resolve their module by name
        spec.loader.exec_module(module)
    return sys.modules[key]
