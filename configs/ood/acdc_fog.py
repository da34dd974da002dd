# Cityscapes -> ACDC fog (val split, 100 images). Layout and usage: ./_base_/acdc.py.
_base_ = ['./_base_/acdc.py']
test_dataloader = dict(
    dataset=dict(data_prefix=dict(img_path='rgb_anon/fog/val', seg_map_path='gt/fog/val')))
val_dataloader = test_dataloader
