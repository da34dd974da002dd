# DAFT for an mmdet detector config, classic style: the fragment a config inherits with
#   _base_ = ['mmdet::...', 'path/to/configs/_base_/daft_detection.py']
# It lives in the package (daft_mm/configs/_base_/daft_detection.py, which documents every key),
# so that pure-Python configs anywhere can import it as daft_mm.configs._base_.daft_detection.
_base_ = ['../../daft_mm/configs/_base_/daft_detection.py']
