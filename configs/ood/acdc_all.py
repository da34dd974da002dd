# Cityscapes -> ACDC, all four conditions (fog, night, rain, snow; val split, 406 images) as one
# test set: one mIoU over the union. Per-condition numbers: acdc_{fog,night,rain,snow}.py.
# Layout and usage: ./_base_/acdc.py.
_base_ = ['./_base_/acdc.py']
test_dataloader = dict(
    dataset=dict(
        _delete_=True,
        type='ConcatDataset',
        datasets=[
            dict(
                type='CityscapesDataset',
                data_root={{_base_.data_root}},
                data_prefix=dict(img_path=f'rgb_anon/{c}/val', seg_map_path=f'gt/{c}/val'),
                img_suffix='_rgb_anon.png',
                seg_map_suffix='_gt_labelTrainIds.png',
                pipeline={{_base_.test_pipeline}}) for c in ('fog', 'night', 'rain', 'snow')
        ]))
val_dataloader = test_dataloader
