# CamVid's dusk drive (0001TP, 124 frames) as the OOD test set of a model trained on its daytime
# drives (configs/camvid/*_camvid.py; the split lists: python -m daft_mm.mm.datasets.camvid_splits
# data/CamVid). E.g.
#   python tools/test.py configs/ood/camvid_dusk.py \
#       work_dirs/daft_deeplabv3_r50-d8_camvid/iter_20000.pth
_base_ = ['../camvid/ft_deeplabv3_r50-d8_camvid.py']
test_dataloader = dict(dataset=dict(ann_file='daft_splits/ood_dusk.txt'))
