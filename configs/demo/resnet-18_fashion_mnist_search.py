# Search mmpretrain's stock ResNet-18 to a FLOPs budget in one run: the base
# config (unchanged model, data and schedule) plus the two search hooks.
#
#   .venv/bin/python tools/train.py configs/demo/resnet-18_fashion_mnist_search.py
#
# Channel units (docs/search_any_model.md): the inner width of every
# BasicBlock (conv1's outputs, gated by bn1). The stage channels (residual
# streams) are searched too with AtomShrinkHook(finders=[dict(type=
# 'ResNetFinder'), dict(type='ResNetStreamFinder')]): on this demo they
# cost 0.3-0.6 points of top-1, but reach below the inner channels' floor.
# AtomShrinkHook keeps the backbone on a linear path from its 33.0M
# multiply-adds (1x1x28x28) to the target, here 30% of it, by half of
# training, removing the weakest channels from the model, the optimizer
# state and the EMA copy; the second half fine-tunes the final net.
_base_ = ['./resnet-18_fashion_mnist.py']

custom_hooks = [
    dict(type='EMAHook', momentum=0.05, update_buffers=True,
         priority='ABOVE_NORMAL'),
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=3e-3, warmup_epochs=0.5,
         weight_decay=4e-5),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops=10e6),
         deadline=0.5, tolerance=0.02, threshold=1e-3,
         min_removed_flops=2e4, interval=50, by_epoch=False,
         input_size=28, follow_path=True),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=10),
]
