# DAFT (Domain-Aware Fine-Tuning) for a segmentation config: the fragment a user config inherits.
#
# It adds (keys no stock mmseg/mmdet base defines, so it merges with any of them):
#   custom_imports     registers daft_mm (DAFTHook, DAFTModel)
#   custom_hooks       DAFTHook: before the first step, one eval-mode pass over the training data
#                      re-centres the pretrained BatchNorm layers on the target data without
#                      changing the function (BN conversion), then the final predictors start at
#                      zero. "Pretrained" follows from how the weights are loaded: the backbone of
#                      model.pretrained / a Pretrained init_cfg, and every module that load_from
#                      holds with the same shapes. The BN layers of new modules (a fresh decode
#                      head) stay exactly as initialised and train as in FT; the start-up log lists
#                      both. Override: daft_convert_modules = 'all' or ['backbone', ...]
#   daft_predictors    the final predictor layers (module paths of the segmentor)
#   daft_head_lr_mult  the head's LR over the backbone's ("far above": DAFT's integrated LP+FT)
#   daft_head_modules  what "the head" is for that LR: 'new_modules' (default, the DAFT
#                      recipe's: every top-level module outside the backbone, i.e. the whole
#                      fresh decode and auxiliary heads), 'predictors' (the layers above only)
#                      or a list of module paths; zero-init stays on the predictors
#
# DAFTHook reads daft_predictors and daft_head_lr_mult from the final config when training starts
# and adds the multiplier to optim_wrapper.paramwise_cfg.custom_keys itself, so a child config or
# `--cfg-options daft_head_lr_mult=20` takes effect (the log line "DAFTHook: effective start
# LRs" shows it). Your config only sets what the stock base owns (mmengine forbids a key defined
# by two bases), the LR schedule:
#
#   _base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py',
#             'path/to/configs/_base_/daft.py']
#   # PolyLR's absolute eta_min (stock 1e-4) would pull every group to the same lr and erase the
#   # predictor/backbone ratio; with eta_min=0 the ratio holds at every step. `end` defaults to
#   # max_iters.
#   param_scheduler = [dict(type='PolyLR', eta_min=0.0, power=0.9, begin=0, by_epoch=False)]
#   # optional: wrap the model to make the method explicit (BN policy, guard that DAFTHook ran)
#   model = dict(_delete_=True, type='DAFTModel', method='daft', model={{_base_.model}})
#   # more hooks: a config's custom_hooks replaces its base's list, so list DAFTHook again
#   custom_hooks = [dict(type='DAFTHook'), dict(type='DistortionHook')]
#
# The backbone must train its BatchNorm (norm_eval=False, the mmseg default); DAFTHook refuses
# norm_eval=True at start-up. DAFTHook options (all optional):
#   predictors=None          default: daft_predictors, else DAFTModel's, else the stock names
#   num_batches=None         statistics pass length per rank; default one pass over the train set
#   dataloader=None          a dataloader config for the pass; default the training set + pipeline
#   var_mode='batch'         or 'population' (see daft_mm.core.convert_bn)
#   modules=None             BN layers to convert (module paths); default the pretrained ones
#                            (same as daft_convert_modules, which new configs use)
#   forward_mode='loss'      'loss' reaches every BN a training step uses (auxiliary heads too)
#   convert=True             False: no BN conversion (an ablation)
#   zero_init=True           False: keep the predictors (fine-tune further from a trained DAFT
#                            checkpoint; the head keeps daft_head_lr_mult)
#   check_lr=True            start-up check of the LR ratio and of eta_min
#   save_converted=True      <work_dir>/converted.pth: the model right after the preparation
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)

daft_predictors = ['decode_head.conv_seg', 'auxiliary_head.conv_seg']
daft_head_lr_mult = 10.0
daft_head_modules = 'new_modules'
# Kept for configs written before DAFTHook derived it (optim_wrapper =
# dict(paramwise_cfg={{_base_.daft_paramwise_cfg}})): computed here, when this file is parsed,
# so it does NOT follow a child's daft_head_lr_mult; DAFTHook then stops with an error naming
# both keys. New configs leave optim_wrapper alone.
daft_paramwise_cfg = dict(
    custom_keys={name: dict(lr_mult=daft_head_lr_mult) for name in daft_predictors})

custom_hooks = [dict(type='DAFTHook')]
