# DeepLabV3 R50-D8 on CamVid day -> dusk at 360x480, 20k iterations, the stock mmseg model, runtime
# and schedule; the FT and DAFT configs next to this folder add the method.
_base_ = [
    'mmseg::_base_/models/deeplabv3_r50-d8.py',
    './camvid_day_dusk.py',
    'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_20k.py',
]
model = dict(
    data_preprocessor=dict(size=(360, 480)),
    backbone=dict(norm_eval=False),  # BN trains in FT too: the comparison changes one thing
    decode_head=dict(num_classes=11),
    auxiliary_head=dict(num_classes=11))
