# mmpretrain's stock MobileNetV2 1.0 on the Fashion-MNIST demo recipe, on a
# CPU in minutes (no search: the base of a search child config and the
# "full"/"scaled" references of benchmarks/bench_units.py):
#
#   .venv/bin/python tools/train.py configs/demo/mobilenet-v2_fashion_mnist.py
#
# Data, schedule (4 epochs, batch 128, SGD lr 0.1 nesterov, 100-iteration
# warm-up, cosine), EMA, weight decay 4e-5 (held by BNL1PenaltyHook at
# rho=0, the optimizer's is 0), BN re-calibration and checkpoints are the
# AtomNAS demo's (configs/demo/atomnas_fashion_mnist.py). The model is
# mmpretrain's MobileNetV2 (widen_factor=1.0, 1280 channels out) with its
# GlobalAveragePooling neck and LinearClsHead, 10 classes; the loss keeps the
# demo recipe's label smoothing 0.1.
#
# Grey images: the stock MobileNetV2 stem takes 3 channels (it has no
# in_channels argument). The data preprocessor's 3-channel mean/std
# broadcast each 1-channel image to 3 equal channels ((1, H, W) - (3, 1, 1)
# -> (3, H, W)), so the backbone gets (N, 3, 28, 28); to_rgb stays off (the
# flip would only act on 3-channel inputs anyway). Backbone multiply-adds at
# 1x3x28x28: 5.70M (atomnas_mm.models.count_flops_params).
_base_ = ['./atomnas_fashion_mnist.py']

model = dict(
    _delete_=True,
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=10, mean=[72.94] * 3,
                           std=[90.02] * 3, to_rgb=False),
    backbone=dict(type='MobileNetV2', widen_factor=1.0),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=1280,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1,
                  mode='original'),
        topk=(1, )))

# The demo's hooks without the search: EMA, the recipe's weight decay (4e-5,
# BNL1PenaltyHook at rho=0 adds it to the loss), BN re-calibration.
custom_hooks = [
    dict(type='EMAHook', momentum=0.05, update_buffers=True,
         priority='ABOVE_NORMAL'),
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=0, weight_decay=4e-5),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=10),
]
input_size = 28
