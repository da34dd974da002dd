# Tiny RetinaNet on the Cityscapes instance layout (see tiny_mask-rcnn_cityscapes.py): that config's
# data and schedule with the tiny RetinaNet model (8 classes; the masks it loads go unused).
_base_ = ['./tiny_mask-rcnn_cityscapes.py', './_base_/retinanet_r18-tiny.py']
model = {{_base_.tiny_retinanet_cityscapes}}
val_evaluator = dict(metric='bbox')
test_evaluator = val_evaluator
