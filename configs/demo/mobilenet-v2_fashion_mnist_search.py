# Search mmpretrain's stock MobileNetV2 to a FLOPs budget in one run: the
# base config (unchanged model, data and schedule) plus the two search hooks.
#
#   .venv/bin/python tools/train.py configs/demo/mobilenet-v2_fashion_mnist_search.py
#
# Channel units (docs/search_any_model.md): every expanding
# InvertedResidual's hidden channels (gated by its depthwise BN), the stem,
# each residual stream (gated by all the BNs writing it) and the last conv.
# BNL1PenaltyHook pushes the units' BN scales to zero;
# AtomShrinkHook steers the strength so the backbone reaches the target by
# half of training, removes dead channels from the model, the optimizer
# state and the EMA copy as it goes, then fine-tunes the final net. The
# target is 30% of the backbone's 5.70M multiply-adds at 1x3x28x28; another
# one: --cfg-options custom_hooks.2.target.flops=...
_base_ = ['./mobilenet-v2_fashion_mnist.py']

custom_hooks = [
    dict(type='EMAHook', momentum=0.05, update_buffers=True,
         priority='ABOVE_NORMAL'),
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=3e-3, warmup_epochs=0.5,
         weight_decay=4e-5),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops=1.71e6),
         deadline=0.5, tolerance=0.02, threshold=1e-3,
         min_removed_flops=2e4, interval=50, by_epoch=False,
         input_size=28, follow_path=True),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=10),
]
