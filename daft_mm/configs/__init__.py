"""DAFT's config fragments and pure-Python (``read_base``) configs, inside the installed package
as ``mmdet.configs`` / ``mmseg.configs`` are, so a config in any folder can say::

    from mmengine.config import read_base
    with read_base():
        from daft_mm.configs.daft_deeplabv3_r50_d8_cityscapes import *  # noqa: F401,F403

The classic configs under the checkout's ``configs/`` inherit the same fragments
(``configs/_base_/daft.py`` is a one-line ``_base_`` pointing here). These files are configs,
read by mmengine, not modules to import.
"""
