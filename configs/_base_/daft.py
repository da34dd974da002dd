# DAFT for a segmentation config, classic style: the fragment a config inherits with
#   _base_ = ['mmseg::...', 'path/to/configs/_base_/daft.py']
# It lives in the package (daft_mm/configs/_base_/daft.py, which documents every key), so that
# pure-Python configs anywhere can import it as daft_mm.configs._base_.daft.
_base_ = ['../../daft_mm/configs/_base_/daft.py']
