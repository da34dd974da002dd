# The CamVid detection comparison with a two-stage detector: Faster R-CNN (FPN) on the same boxes,
# backbone and schedule as compare_camvid_boxes_day_dusk.py (RetinaNet). In LP the RPN and the
# RoI head train on the frozen backbone's features.
#   python tools/compare.py configs/camvid/compare_camvid_boxes_day_dusk_faster-rcnn.py --search \
#       --cfg-options data_root=data/CamVid
_base_ = ['mmdet::_base_/models/faster-rcnn_r50_fpn.py',
          './_base_/camvid_boxes_day_dusk.py']
model = dict(
    backbone=dict(
        depth=18, deep_stem=True, stem_channels=16, base_channels=16,
        frozen_stages=-1, norm_eval=False, norm_cfg=dict(type='BN', requires_grad=True),
        init_cfg=None),
    neck=dict(in_channels=[16, 32, 64, 128], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64,
                  anchor_generator=dict(scales=[4])),  # boxes from 16 px (stock: 32)
    roi_head=dict(bbox_roi_extractor=dict(out_channels=64),
                  bbox_head=dict(in_channels=64, fc_out_channels=128, num_classes=3)),
    train_cfg=dict(rpn=dict(sampler=dict(num=128)),
                   rpn_proposal=dict(nms_pre=500, max_per_img=200),
                   rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=200), rcnn=dict(max_per_img=50)))
# DAFT's grid: the default shape (backbone LR x head ratio 10 / 100 / 1000, steps of 10), placed
# so its diagonal (head LR = lr x ratio) is 0.04, the highest LR at which FT trains here. At
# lr_scale's placement (lr 6.25e-5 .. 6.25e-3) the diagonal was 0.0625 and every point with a
# head LR of 0.0625 or more scored 0 ID-val mAP at the first rung, as FT does from 0.08 (a first
# search, seed 0, 444 iterations; ID-val only): 6 of DAFT's 9 points, and none with the head
# between 0.00625 and 0.0625. Here 6 of 9 have the head at 0.04 or below, three of them at 0.04
# (at the first rung 4 scored above 0: not a head at 4e-4, nor a backbone at 4e-5 under 0.04).
compare = dict(
    name='camvid_boxes_day_dusk_faster-rcnn',
    grids={'DAFT': dict(lr=(4e-5, 4e-4, 4e-3)),
           'DAFT w/o conversion': dict(lr=(4e-5, 4e-4, 4e-3))})
