# AtomNAS search inside Faster R-CNN (any two-stage detector alike): the
# supernet backbone in the detector, the FLOPs-weighted BN-L1 penalty on its
# atoms, dead atoms removed while the detector trains (docs/method.md).
# This repository's tools or mmdet's own (the config imports atomnas_mm):
#   python tools/train.py CONFIG                 # CONFIG: this file
#   python tools/train.py CONFIG --resume        # the architecture is restored
#   python tools/test.py CONFIG WORK_DIR/epoch_12.pth   # the unedited config
#
# Set `model.backbone.init_cfg.checkpoint` to an ImageNet checkpoint of the
# same supernet (stem 16, as configs/atomnas_a.py), taken before or during
# its search: the backbone narrows to the checkpoint's widths. The logs count the backbone alone (`backbone_flops` for an
# input_size x input_size image, `backbone_params`); the FPN in_channels
# hold for every searched net of the supernet. rho is AtomNAS-A's ImageNet
# value and the ramp one epoch: neither is tuned for detection.
_base_ = './faster-rcnn_atomnas-a_fpn_1x_coco.py'

model = dict(backbone=dict(arch='supernet', stem_channels=16))

custom_hooks = [
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=1.8e-4, warmup_epochs=1),
    # after every epoch: remove atoms with |gamma| <= 1e-3 once they weigh
    # 1M multiply-adds
    dict(type='atomnas_mm.AtomShrinkHook', threshold=1e-3,
         min_removed_flops=1e6, interval=1, by_epoch=True, input_size=800),
]
