# DAFT fragment for mmdet detectors (two-stage, one-stage / dense, instance and panoptic
# segmentation): the detection counterpart of configs/_base_/daft.py, used the same way.
#
# It adds (keys no stock mmdet base defines, so it merges with any of them):
#   custom_imports      registers daft_mm (DAFTHook, DAFTModel)
#   custom_hooks        DAFTHook: BN conversion of the pretrained BN layers (the backbone's; with
#                       load_from a whole detector, every module it holds) on the target training
#                       data (new necks and heads keep their BN as initialised), then the final
#                       predictors start at weight 0 and the bias their head's own init gives (the
#                       prior: p = 0.01 for focal / sigmoid classifiers such as RetinaNet's; 0 for
#                       softmax ones). The predictors come from the head table
#                       (daft_mm/mm/predictors.py): roi_head bbox / mask / mask-IoU / grid / point
#                       heads, every dense head (RetinaNet, FCOS, ATSS, GFL, ...), SOLO, YOLACT,
#                       DETR-type branches. The RPN of a two-stage detector keeps its init: its
#                       proposals must be informative from the first step.
#   daft_backbone       what DAFT needs of the backbone; stock mmdet configs freeze BN
#                       (norm_eval=True, frozen_stages=1, caffe-style norm_cfg requires_grad=False)
#   daft_head_lr_mult   the predictors' LR over the backbone's; DAFTOptimWrapperConstructor adds
#                       it to optim_wrapper.paramwise_cfg.custom_keys when the optimizer is
#                       built (the config is completed when loaded), one entry per
#                       predictor the head table found (exact module paths: no RPN layer, no inner
#                       layer of a DETR MLP branch), and logs the effective LRs
#
# Your config sets the keys the stock bases own:
#
#   _base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
#             'path/to/configs/_base_/daft_detection.py']
#   model = dict(backbone=_base_.daft_backbone)
#   # or extended in the same line (a plain dict: {{_base_.daft_backbone}} is a whole value only)
#   model = dict(backbone=dict(_base_.daft_backbone, depth=101,
#                              init_cfg=dict(type='Pretrained',
#                                            checkpoint='torchvision://resnet101')))
#
# Your own optim_wrapper.paramwise_cfg (custom_keys for other modules, norm_decay_mult, ...) keeps
# working: the DAFT constructor adds the predictors' entries to it; an entry of yours for a predictor with
# another lr_mult is an error naming both keys.
#
# SyncBN: detection trains with 1-2 images per GPU, too few for BatchNorm's batch statistics
# (and for the converted statistics to stay meaningful); SyncBN computes them over the global
# batch. A single-process run reverts it to BN (mmengine does). frozen_stages=-1 trains every
# stage; set frozen_stages=0 to keep the stem frozen (DAFTHook allows it and logs which BN layers
# stay frozen); anything above is refused at start-up, as are norm_eval=True and frozen BN weights.
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)

# eps: some stock configs (NAS-FCOS) set eps=0, which frozen BN tolerates and train-mode BN
# does not; 1e-5 is torch's default and what the pretrained ImageNet ResNets were trained with.
daft_backbone = dict(
    norm_cfg=dict(type='SyncBN', requires_grad=True, eps=1e-5), norm_eval=False,
    frozen_stages=-1)

daft_head_lr_mult = 10.0
# The head LR goes to the final predictors only: the whole-new-head default of segmentation
# ('new_modules': neck, RPN and RoI heads) has not been measured on detection.
daft_head_modules = 'predictors'
custom_hooks = [dict(type='DAFTHook')]
