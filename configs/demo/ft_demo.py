# Demo, FT baseline: everything fine-tuned at one LR from the pretrained model.
# The real config baselines/ft_deeplabv3_cityscapes.py shrunk by ./_base_/demo_common.py for CPU (tiny
# DeepLabV3, 64x128 images, short schedule). Run by tools/demo.py; by hand:
#   python tools/train.py configs/demo/ft_demo.py --cfg-options \
#       data_root=<work_dir>/data/<key>/id \
#       model.model.backbone.init_cfg.type=Pretrained model.model.backbone.init_cfg.prefix=backbone. \
#       model.model.backbone.init_cfg.checkpoint=<work_dir>/pretrain/<key>/backbone.pth
_base_ = ['../baselines/ft_deeplabv3_cityscapes.py', './_base_/demo_common.py']
model = dict(model={{_base_.demo_model}})
train_dataloader = {{_base_.demo_train_dataloader}}
val_dataloader = {{_base_.demo_test_dataloader}}
test_dataloader = {{_base_.demo_test_dataloader}}
train_cfg = {{_base_.demo_train_cfg}}
default_hooks = {{_base_.demo_default_hooks}}
param_scheduler = {{_base_.demo_param_scheduler}}
env_cfg = {{_base_.demo_env_cfg}}
