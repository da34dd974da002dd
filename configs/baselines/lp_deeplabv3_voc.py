# Baseline LP (linear probing): the pretrained backbone is frozen (requires_grad=False before the
# optimizer is built, so it holds no backbone state) and its BatchNorm stays in eval mode after
# every train(); the randomly initialised decode and auxiliary heads train. Stage 1 of LP-FT.
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py']
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)
model = dict(
    _delete_=True,
    type='DAFTModel',
    method='lp',
    feature_extractor=['backbone'],
    model={{_base_.model}})
