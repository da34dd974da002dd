# Demo pretraining: the "pretrained model" of the demo is the tiny DeepLabV3 trained from scratch on
# the diverse source set, through the FT baseline config (the same model definition the
# fine-tuning configs shrink, so its checkpoint loads into them key for key). Run by tools/demo.py,
# which caches the checkpoint under <work_dir>/pretrain/<settings key>/.
_base_ = ['../baselines/ft_deeplabv3_cityscapes.py', './_base_/demo_common.py']
model = dict(model={{_base_.demo_model}})
train_dataloader = {{_base_.demo_train_dataloader}}
val_dataloader = {{_base_.demo_test_dataloader}}
test_dataloader = {{_base_.demo_test_dataloader}}
train_cfg = {{_base_.demo_train_cfg}}
default_hooks = {{_base_.demo_default_hooks}}
param_scheduler = {{_base_.demo_param_scheduler}}
env_cfg = {{_base_.demo_env_cfg}}
optim_wrapper = dict(optimizer=dict(lr=0.05))
