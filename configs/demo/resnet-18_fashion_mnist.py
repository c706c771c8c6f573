# mmpretrain's stock ResNet-18 on the Fashion-MNIST demo recipe, on a CPU in
# minutes (no search: the base of a search child config and the
# "full"/"scaled" references of benchmarks/bench_units.py):
#
#   .venv/bin/python tools/train.py configs/demo/resnet-18_fashion_mnist.py
#
# Data, schedule, EMA, weight decay (BNL1PenaltyHook at rho=0), BN
# re-calibration and checkpoints as configs/demo/mobilenet-v2_fashion_mnist.py
# (the AtomNAS demo's). The model is mmpretrain's ResNet (depth 18, stock
# 7x7 stride-2 stem and max-pool, stock strides, deep_stem=False) taking the
# grey images directly (in_channels=1), with its GlobalAveragePooling neck and
# LinearClsHead (512 -> 10). At 28 px the four stages run at 7, 4, 2 and 1
# pixels: 33.0M backbone multiply-adds at 1x1x28x28.
_base_ = ['./atomnas_fashion_mnist.py']

model = dict(
    _delete_=True,
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=10, mean=[72.94], std=[90.02],
                           to_rgb=False),
    backbone=dict(type='ResNet', depth=18, in_channels=1, num_stages=4,
                  out_indices=(3, ), style='pytorch', deep_stem=False),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=512,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1,
                  mode='original'),
        topk=(1, )))

custom_hooks = [
    dict(type='EMAHook', momentum=0.05, update_buffers=True,
         priority='ABOVE_NORMAL'),
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=0, weight_decay=4e-5),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=10),
]
input_size = 28
