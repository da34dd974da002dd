# DAFT fine-tuning of DeepLabV3 (ResNet-50-D8) on PASCAL VOC 2012 + SBD aug, 512x512, 20k
# iterations: the stock mmseg config + the DAFT fragment (see daft_deeplabv3_cityscapes.py).
_base_ = [
    'mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-20k_voc12aug-512x512.py',
    './_base_/daft.py',
]
model = dict(_delete_=True, type='DAFTModel', method='daft', model={{_base_.model}})
