"""daft-mm's package metadata. The tested versions live in ``daft_mm/_versions.py``.

``pip install -e .`` never installs torch or mmcv: they must match each other and the user's GPU
(a bare ``torch`` requirement would pull a second, multi-GB CUDA build), so they are checked by
``tools/check_env.py`` (``make install-here``) instead. The ``torch`` extra records the tested torch
range for a new environment (``pip install -e .[torch]``); mmcv has no extra, since PyPI only has its
source, which must be built against the installed torch (README, "Install modes").
"""
import runpy
from pathlib import Path

from setuptools import find_packages, setup

versions = runpy.run_path(str(Path(__file__).parent / 'daft_mm' / '_versions.py'))

setup(
    name='daft-mm',
    version='0.1.0',
    description='Domain-Aware Fine-Tuning (DAFT) for OpenMMLab dense prediction',
    packages=find_packages(include=['daft_mm', 'daft_mm.*']),
    python_requires=versions['PYTHON'],
    install_requires=versions['RUNTIME'],
    extras_require={
        'test': versions['TEST'],
        'torch': [f"torch{versions['TORCH']}"],
    },
)
