# Tiny DeepLabV3 for CPU tests and demos: the stock mmseg DeepLabV3 model (EncoderDecoder,
# ResNetV1c-D8 backbone, ASPPHead decode head, FCNHead auxiliary head) with every width divided by 4
# and ResNet-18 depth. Module names are the stock ones, so DAFT code that addresses
# `decode_head.conv_seg` / `auxiliary_head.conv_seg` works here and on the full-size model alike.
_base_ = 'mmseg::_base_/models/deeplabv3_r50-d8.py'

# BN instead of SyncBN: SyncBN needs an initialised process group (and CUDA) even for one process.
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    # No pretrained weights: nothing can be downloaded, tiny nets train from scratch.
    pretrained=None,
    backbone=dict(
        depth=18,
        stem_channels=16,  # stock 64
        base_channels=16,  # stock 64 -> stage widths 16, 32, 64, 128
        norm_cfg=norm_cfg),
    decode_head=dict(
        in_channels=128,
        channels=32,
        # The stock (1, 12, 24, 36) assume a ~64x128 feature map (512x1024 crops at stride 8);
        # these keep the same relative reach on the 8x16 maps of 64x128 images.
        dilations=(1, 2, 4, 6),
        norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=16, norm_cfg=norm_cfg))
