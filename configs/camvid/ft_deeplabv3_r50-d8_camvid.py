# FT (the baseline): DeepLabV3 R50-D8 from an ImageNet backbone on CamVid's daytime drives, one LR
# for everything. Test ID on Seq05VD (this config's test set) and OOD on the dusk drive:
#   python tools/test.py configs/ood/camvid_dusk.py CKPT
_base_ = ['./_base_/deeplabv3_r50-d8_camvid.py']
custom_imports = dict(imports=['daft_mm'], allow_failed_imports=False)  # CamVidDataset
