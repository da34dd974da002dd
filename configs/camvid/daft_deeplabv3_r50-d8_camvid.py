# DAFT on CamVid day -> dusk: the FT config's model, data and schedule with the DAFT fragment (BN
# conversion of the ImageNet backbone on the daytime training frames, zero predictors, the new
# decode head at daft_head_lr_mult x the base LR; the stock PolyLR keeps that ratio per group).
_base_ = ['./_base_/deeplabv3_r50-d8_camvid.py', '../_base_/daft.py']
