# Train (or evaluate) AtomNAS-A on ImageNet-1k with the AtomNAS recipe
# (docs/method.md, "Recipe"): 350 epochs, 64 images per GPU, TF-style RMSProp,
# lr 0.016 per 256 images (scaled to the real batch), EMA, label smoothing,
# dropout 0.2, weight decay 1e-5 as a loss term, seed 1995.
# AtomNAS-B / C inherit this file and only change the arch.
_base_ = [
    '../_base_/models/atomnas-a.py',
    '../_base_/datasets/imagenet_bs64_atomnas.py',
    '../_base_/schedules/atomnas_350e.py',
    '../_base_/default_runtime.py',
]

custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)

custom_hooks = [
    {{_base_.ema_hook}},
    # rho=0: no architecture search, only the weight-decay loss term.
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=0,
         weight_decay={{_base_.weight_decay}}),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=50),
]
