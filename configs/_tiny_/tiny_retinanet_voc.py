# Tiny RetinaNet (ResNet-18 at 1/4 width, FPN, 2-conv head) on a PASCAL VOC 2012-layout dataset: the
# tiny Faster R-CNN's data and schedule with the stock RetinaNet model shrunk, e.g. on the
# synthetic set from
#   python -m daft_mm.mm.datasets data/synthetic --which voc
_base_ = ['./tiny_faster-rcnn_voc.py', './_base_/retinanet_r18-tiny.py']
model = {{_base_.tiny_retinanet}}
