# DAFT fine-tuning of DeepLabV3 (ResNet-50-D8) on Cityscapes, 512x1024 crops, 40k iterations:
# the stock mmseg config + the DAFT fragment. Everything not set here is the stock recipe.
_base_ = [
    'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-40k_cityscapes-512x1024.py',
    './_base_/daft.py',
]
# The method made explicit: BN in train mode, DAFTHook must have run before the first step.
# Checkpoints keep the stock keys (they load into the stock config for testing).
model = dict(_delete_=True, type='DAFTModel', method='daft', model={{_base_.model}})
# The head (daft_head_modules: by default the whole new decode and auxiliary heads; the zero
# predictors daft_predictors are part of it) trains at daft_head_lr_mult = 10x the backbone LR
# (integrated LP+FT): DAFTOptimWrapperConstructor builds those parameter groups, and the stock
# PolyLR's eta_min becomes a floor per group, so the ratio holds to the end (daft_mm/mm/optim.py).
