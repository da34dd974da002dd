# Cityscapes -> ACDC night (val split, 106 images). Layout and usage: ./_base_/acdc.py.
_base_ = ['./_base_/acdc.py']
test_dataloader = dict(
    dataset=dict(data_prefix=dict(img_path='rgb_anon/night/val', seg_map_path='gt/night/val')))
val_dataloader = test_dataloader
