# Baseline FT: fine-tune everything with one learning rate, standard head init, BN in train mode.
# This is the stock mmseg recipe; the wrapper only states the method (and keeps stock keys).
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py']
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)
model = dict(_delete_=True, type='DAFTModel', method='ft', model={{_base_.model}})
