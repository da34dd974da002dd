# The CamVid detection comparison (tools/compare.py): FT, LP, LP-FT, DAFT and its ablations for a
# RetinaNet on CamVid's daytime drives, tested on an unseen daytime drive (ID), the dusk drive
# and corruptions (OOD). The boxes are DERIVED FROM THE SEMANTIC LABEL MAPS (connected regions of
# car, pedestrian, bicyclist), not instance annotations: see _base_/camvid_boxes_day_dusk.py.
# CPU-sized: the ResNetV1c-18 at 1/4 width pretrained on Imagenette (the segmentation task's),
# frames at 180x240, BN in train mode for every method.
#   python -m daft_mm.mm.datasets.camvid_splits data/CamVid   # the day/dusk split lists
#   python -m daft_mm.mm.datasets.camvid_boxes data/CamVid    # their boxes (COCO json)
#   python tools/compare.py configs/camvid/compare_camvid_boxes_day_dusk.py --search \
#       --cfg-options data_root=data/CamVid
_base_ = ['mmdet::_base_/models/retinanet_r50_fpn.py', './_base_/camvid_boxes_day_dusk.py']
model = dict(
    backbone=dict(
        # mmseg's ResNetV1c: a deep stem, as the pretrained checkpoint has
        depth=18, deep_stem=True, stem_channels=16, base_channels=16,
        # every stage and every BN trains (batch 4): the same BN mode for every method
        frozen_stages=-1, norm_eval=False, norm_cfg=dict(type='BN', requires_grad=True),
        init_cfg=None),  # every method starts from compare.backbone (its init_cfg)
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=64),
    bbox_head=dict(
        num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2,
        # pedestrians are 4-15 px tall at this scale: anchors from 16 px (stock: 32)
        anchor_generator=dict(octave_base_scale=2)),
    test_cfg=dict(nms_pre=300, max_per_img=50))
