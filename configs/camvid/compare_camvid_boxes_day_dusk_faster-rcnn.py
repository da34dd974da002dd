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
compare = dict(name='camvid_boxes_day_dusk_faster-rcnn')
