# Train AtomNAS-A+ (Swish, squeeze-excite) from scratch on ImageNet-1k: the
# AtomNAS recipe of atomnas-a_in1k.py with 32 GPUs x 128 images (ATOMNAS.md
# section 6, retraining of the "+" models). The values that depend on the
# batch are re-derived below with the same formulas as in atomnas-a_in1k.py.
# AtomNAS-B+ / C+ inherit this file and only change the arch.
_base_ = './atomnas-a_in1k.py'

# ---------------------------------------------------------------------------
# Training setup (see atomnas-a_in1k.py for the derivations).
num_gpus = 32
batch_per_gpu = 128
num_train_images = 1281167
# ---------------------------------------------------------------------------
total_batch = num_gpus * batch_per_gpu
iters_per_epoch = -(-(-(-num_train_images // num_gpus)) // batch_per_gpu)
base_lr = 0.016 * total_batch / 256
decay_iters = int(2.4 * iters_per_epoch + 0.5)
ema_momentum = 1 - 0.9999**(total_batch / 4096)

# Swish activation and SE(0.5) come with the arch; dropout 0.28 see
# configs/_base_/models/atomnas-a_plus.py.
model = dict(backbone=dict(arch='atomnas_a_plus'))

train_dataloader = dict(batch_size=batch_per_gpu)
val_dataloader = dict(batch_size=batch_per_gpu)
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=base_lr))

param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=256 / total_batch,
        by_epoch=True,
        begin=0,
        end=5,
        convert_to_iter_based=True),
    dict(
        type='StepLR',
        step_size=decay_iters,
        gamma=0.97,
        by_epoch=False,
        begin=0),
]

auto_scale_lr = dict(base_batch_size=total_batch)

custom_hooks = [
    dict(
        type='EMAHook',
        ema_type='MomentumAnnealingEMA',
        momentum=ema_momentum,
        gamma=9,
        update_buffers=True,
        priority='ABOVE_NORMAL')
]
