"""The OpenMMLab layer of daft-mm: thin glue between ``daft_mm.core`` and mmengine/mmseg/mmdet.

Importing this package applies the environment fixes (:mod:`.compat`) and registers every
daft-mm component with the mmengine registries, so ``import daft_mm`` (or
``custom_imports = dict(imports=['daft_mm'])`` in a config) is all a tool needs.
"""
# compat first: it must patch checkpoint loading and check pkg_resources before anything else.
from . import compat  # noqa: F401  (fixes applied on import)
from . import datasets  # noqa: F401
from . import hooks  # noqa: F401  (DistortionHook; DAFTHook)
from . import models  # noqa: F401  (DAFTModel: the BN-conversion / fine-tuning-method wrapper)
from . import optim  # noqa: F401  (DAFTOptimWrapperConstructor, PolyLRGroupFloors)
from . import l2sp  # noqa: F401  (L2SPOptimWrapper and its constructor: a baseline)
# Every further submodule that registers something (hooks, models, transforms) gets one import
# line above; a module left out here is invisible to configs.
