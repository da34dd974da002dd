"""The versions daft-mm is tested with, in one place: ``setup.py`` declares them and
``tools/check_env.py`` checks an existing environment against them.

Pure data (no imports), so both can read it without torch or mmengine installed. CI tests two lanes:

* default: Python 3.11, torch 2.13.0 (CPU wheel), mmcv 2.1.0 built for it, mmengine 0.10.7,
  mmsegmentation 1.2.2, mmdet 3.3.0, NumPy 1.26.4 (``requirements.txt``, ``tools/install.sh``);
* torch 2.1: the same with torch 2.1.2 (PyPI's default CUDA 12.1 wheel, run on CPUs) and mmcv 2.1.0
  built for it: the environment OpenMMLab's prebuilt mmcv wheels give GPU users.
"""

#: What CI runs (both lanes are Python 3.11).
PYTHON = '>=3.11,<3.12'

#: Checked, never installed by ``pip install -e .``: a GPU user's torch build and the mmcv compiled
#: against it must stay; a bare ``torch`` requirement would pull a second, multi-GB torch.
TORCH = '>=2.1,<2.14'
MMCV = '>=2.1.0,<2.2.0'  # mmseg 1.2.2 and mmdet 3.3.0 refuse mmcv >= 2.2

#: Pure-Python dependencies (none of them requires torch or mmcv): ``pip install -e .`` installs
#: whichever is missing.
RUNTIME = [
    'mmengine>=0.10.7,<0.11',
    'mmsegmentation>=1.2.2,<1.3',
    'mmdet>=3.3.0,<3.4',
    'numpy>=1.26,<2',
    'setuptools>=61,<82',  # pkg_resources: mmengine resolves mmseg:: / mmdet:: config bases with it
    'opencv-python>=4.8,<4.11',
    'matplotlib>=3.7,<3.11',
    'scipy>=1.11,<1.15',
    'ftfy',
    'regex',
    'imagecorruptions-imaug>=1.1.5,<1.2',
    'scikit-image>=0.22,<0.27',
    'ray[tune]>=2.50,<2.59',  # the comparison's trials (daft_mm.benchmark.engine)
    'pyarrow>=14,<19',  # ray.tune imports it; 19+ needs NumPy 2
]

TEST = ['pytest>=8,<9', 'pytest-timeout>=2.3,<3']
