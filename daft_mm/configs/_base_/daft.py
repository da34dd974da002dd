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
# When the config is loaded (tools/train.py, tools/compare.py: daft_mm.mm.cli.load_config), these
# keys go into optim_wrapper: constructor='DAFTOptimWrapperConstructor' builds the head's parameter
# groups from them when the Runner builds the optimizer (once), so a child config or
# `--cfg-options daft_head_lr_mult=20` takes effect and the dumped config records it; a PolyLR /
# cosine eta_min (stock 1e-4) becomes a floor per parameter group, so the head/backbone ratio holds
# to the end. Your config only sets what the stock base owns (mmengine forbids a key defined by two
# bases):
#
#   _base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py',
#             'path/to/configs/_base_/daft.py']
#   # optional: wrap the model to make the method explicit (BN policy, guard that DAFTHook ran)
#   model = dict(_delete_=True, type='DAFTModel', method='daft', model={{_base_.model}})
#   # more hooks: a config's custom_hooks replaces its base's list, so list DAFTHook again
#   custom_hooks = [dict(type='DAFTHook'), dict(type='DistortionHook')]
#
# Building the Runner yourself: cfg = daft_mm.mm.cli.load_config(path), or call
# daft_mm.mm.optim.complete_daft_config(cfg) before Runner.from_cfg(cfg).
# The backbone must train its BatchNorm (norm_eval=False, the mmseg default); norm_eval=True is
# refused when the plan is made. DAFTHook's options (all optional) are documented in one place,
# its docstring (daft_mm/mm/hooks/daft_hook.py).
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)

daft_predictors = ['decode_head.conv_seg', 'auxiliary_head.conv_seg']
daft_head_lr_mult = 10.0
daft_head_modules = 'new_modules'
custom_hooks = [dict(type='DAFTHook')]
