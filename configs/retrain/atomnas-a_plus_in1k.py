# Train AtomNAS-A+ (Swish, squeeze-excite, dropout 0.28) from scratch on
# ImageNet-1k: the AtomNAS recipe with 128 images per GPU (docs/method.md
# section 6, retraining of the "+" models). B+ / C+ inherit this file.
_base_ = [
    '../_base_/models/atomnas-a_plus.py',
    '../_base_/datasets/imagenet_bs64_atomnas.py',
    '../_base_/schedules/atomnas_350e.py',
    '../_base_/default_runtime.py',
]

custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)

batch_per_gpu = 128
train_dataloader = dict(batch_size=batch_per_gpu)
val_dataloader = dict(batch_size=batch_per_gpu)
test_dataloader = val_dataloader

custom_hooks = [
    dict(
        type='EMAHook',
        ema_type='atomnas_mm.BatchScaledEMA',
        batch_size=batch_per_gpu,
        decay=0.9999,
        images_per_decay=4096,
        update_buffers=True,
        priority='ABOVE_NORMAL'),
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=0,
         weight_decay={{_base_.weight_decay}}),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=50),
]
