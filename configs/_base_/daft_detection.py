# DAFT fragment for two-stage mmdet detectors (Faster/Mask R-CNN): as configs/_base_/daft.py, with
# the ROI bbox head's classifier and box regressor as the final predictors. The RPN predictors keep
# their standard init: the proposals must be informative from the first step for the ROI head to
# learn anything. Use it exactly like daft.py.
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)

daft_predictors = ['roi_head.bbox_head.fc_cls', 'roi_head.bbox_head.fc_reg']
daft_head_lr_mult = 10.0
daft_paramwise_cfg = dict(
    custom_keys={name: dict(lr_mult=daft_head_lr_mult) for name in daft_predictors})

custom_hooks = [dict(type='DAFTHook', predictors=daft_predictors)]
