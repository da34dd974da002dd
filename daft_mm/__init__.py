"""daft-mm: Domain-Aware Fine-Tuning for OpenMMLab dense prediction.

``daft_mm.core`` needs torch only. Importing ``daft_mm`` with mmengine installed also registers the
OpenMMLab layer (hooks, models, transforms) so that configs can say
``custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)``.
"""
from importlib.util import find_spec

__version__ = '0.1.0'

if find_spec('mmengine') is not None:
    from . import mm  # noqa: F401  (registers everything on import)
