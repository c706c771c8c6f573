# One-pass search for a FLOPs budget on ImageNet-1k: write the budget, not a
# penalty strength. AtomShrinkHook's budget controller steers the penalty (a
# proximal step on the atoms' BN scales with a target) from the live cost of
# the backbone (atoms not yet dead), puts the net in [target, target * 1.02]
# by half of training, then turns the penalty off: the second half trains the
# final net (README, "Budgets").
#
#   bash tools/dist_train.sh configs/atomnas_target.py 8
#   bash tools/dist_train.sh configs/atomnas_target.py 8 \
#       --cfg-options custom_hooks.2.target.flops=250e6
#
# The target counts the backbone's multiply-adds at 224 px; the zoo table adds
# the classifier head (1.34M): AtomNAS-A/B/C have 257M/325M/359M backbones,
# so the default 300M lands between A and B. The supernet has 32 stem
# channels (as for B and C); rho is the starting strength (C's), which the
# controller scales.
_base_ = ['./atomnas_c.py']

custom_hooks = [
    {{_base_.ema_hook}},
    dict(
        type='atomnas_mm.BNL1PenaltyHook',
        rho=1.0e-4,
        warmup_epochs=25,
        weight_decay={{_base_.weight_decay}}),
    dict(
        type='atomnas_mm.AtomShrinkHook',
        target=dict(flops=300e6),
        deadline=0.5,
        tolerance=0.02,
        threshold=1e-3,
        min_removed_flops=1e6,
        interval=1,
        by_epoch=True,
        input_size=224),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=50),
]
