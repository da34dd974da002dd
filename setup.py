from setuptools import find_packages, setup

setup(
    name='daft-mm',
    version='0.1.0',
    description='Domain-Aware Fine-Tuning (DAFT) for OpenMMLab dense prediction',
    packages=find_packages(include=['daft_mm', 'daft_mm.*']),
    python_requires='>=3.11',
    # The pinned stack lives in requirements.txt and is installed by tools/install.sh;
    # here only what daft_mm.core itself needs, so `pip install -e .` never pulls a CUDA torch.
    install_requires=[],
)
