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
#   daft_paramwise_cfg  10x LR on the predictors (param names containing these keys)
#
# Your config sets the keys the stock bases own:
#
#   _base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
#             'path/to/configs/_base_/daft_detection.py']
#   model = dict(backbone={{_base_.daft_backbone}})
#   optim_wrapper = dict(paramwise_cfg={{_base_.daft_paramwise_cfg}})
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
# Leaf names of the predictors in the head table, as mmengine custom_keys (substrings of parameter
# names): '.fc_cls.' matches roi_head.bbox_head.fc_cls.weight and roi_head.bbox_head.0.fc_cls.bias
# but no RPN layer. DAFTHook checks at start-up that every predictor it found trains above the
# backbone's LR and names the key to add otherwise.
daft_predictor_keys = [
    # RoI heads (Faster / Mask / Cascade R-CNN, HTC, MS R-CNN, Grid R-CNN, PointRend, Sparse R-CNN)
    'fc_cls', 'fc_reg', 'conv_logits', 'fc_logits', 'fc_mask_iou', 'deconv2',
    # dense heads
    'retina_cls', 'retina_reg', 'conv_cls', 'conv_reg', 'conv_centerness', 'atss_cls',
    'atss_reg', 'atss_centerness', 'atss_iou', 'gfl_cls', 'gfl_reg', 'vfnet_cls', 'vfnet_reg',
    'vfnet_reg_refine', 'tood_cls', 'tood_reg', 'cls_score', 'bbox_pred', 'object_pred',
    'reppoints_cls_out', 'reppoints_pts_init_out', 'reppoints_pts_refine_out', 'conv_loc',
    'conv_shape', 'controller', 'conv_coeff', 'conv_kernel', 'conv_mask_list',
    'conv_mask_list_x', 'conv_mask_list_y', 'cls_branches', 'cls_embed',
]
daft_paramwise_cfg = dict(
    custom_keys={f'.{name}.': dict(lr_mult=daft_head_lr_mult) for name in daft_predictor_keys})

custom_hooks = [dict(type='DAFTHook')]
