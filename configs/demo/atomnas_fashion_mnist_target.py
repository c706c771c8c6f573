# The demo with a budget: the search ends at 1.2M backbone multiply-adds
# (about 31% of the demo supernet's 3.85M) instead of wherever rho leads.
#
#   .venv/bin/python tools/train.py configs/demo/atomnas_fashion_mnist_target.py
#
# The budget lives in AtomShrinkHook's target (a child config or
# --cfg-options custom_hooks.2.target.flops=... sets another); the controller
# checks every 50 iterations, steers the penalty (a proximal step on the
# gammas with a target) so the net is in [target, target * 1.02] by half of
# training, then turns the penalty off: the second half fine-tunes the net.
_base_ = ['./atomnas_fashion_mnist.py']

custom_hooks = [
    dict(type='EMAHook', momentum=0.05, update_buffers=True,
         priority='ABOVE_NORMAL'),
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=3e-3, warmup_epochs=0.5,
         weight_decay=4e-5),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops=1.2e6),
         deadline=0.5, tolerance=0.02, threshold=1e-3,
         min_removed_flops=2e4, interval=50, by_epoch=False,
         input_size=28),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=10),
]
