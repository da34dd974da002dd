# The pure-Python (read_base) DAFT config for DeepLabV3 R50-D8 on Cityscapes, as shipped inside
# the package: daft_mm/configs/daft_deeplabv3_r50_d8_cityscapes.py. This file runs it from the
# checkout (tools/train.py configs/new_style/daft_deeplabv3_r50_d8_cityscapes.py) and shows the
# import your own config in any folder uses.
from mmengine.config import read_base

with read_base():
    from daft_mm.configs.daft_deeplabv3_r50_d8_cityscapes import *  # noqa: F401,F403
