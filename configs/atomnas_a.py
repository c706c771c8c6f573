# AtomNAS-A: one-pass search + training on ImageNet-1k (docs/method.md:
# "Penalty", "Shrinking", "Recipe"). Training the supernet IS the search: the
# FLOPs-weighted L1 penalty (rho 1.8e-4, 25 warm-up epochs) drives atoms' BN
# scales to zero and AtomShrinkHook removes them while training runs; the
# network at the end is the result (searched_arch.json in the work_dir,
# tools/export_searched.py to export it).
#
#   bash tools/dist_train.sh configs/atomnas_a.py 8    # or 32 (reference)
#
# The recipe scales with the number of GPUs by itself: see
# configs/_base_/schedules/atomnas_350e.py.
_base_ = [
    './_base_/models/atomnas-supernet.py',
    './_base_/datasets/imagenet_bs64_atomnas.py',
    './_base_/schedules/atomnas_350e.py',
    './_base_/default_runtime.py',
]

custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)

model = dict(backbone=dict(arch='supernet', stem_channels=16))

custom_hooks = [
    {{_base_.ema_hook}},
    dict(
        type='atomnas_mm.BNL1PenaltyHook',
        rho=1.8e-4,
        warmup_epochs=25,
        weight_decay={{_base_.weight_decay}}),
    # after every epoch: remove atoms with |gamma| <= 1e-3 in the live and
    # EMA weights once they weigh 1M multiply-adds; EMA alone at the end.
    dict(
        type='atomnas_mm.AtomShrinkHook',
        threshold=1e-3,
        min_removed_flops=1e6,
        interval=1,
        by_epoch=True,
        input_size=224),
    # validate the EMA weights after re-estimating their BN statistics
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=50),
]
