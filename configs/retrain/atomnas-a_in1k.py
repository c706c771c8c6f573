# Train AtomNAS-A from scratch on ImageNet-1k with the AtomNAS recipe
# (ATOMNAS.md section 6): 350 epochs, 32 GPUs x 64 images, RMSProp,
# lr 0.016 per 256 images, 5-epoch warm-up, x0.97 every 2.4 epochs, EMA,
# label smoothing 0.1, weight decay 1e-5, seed 1995.
# AtomNAS-B / C inherit this file and only change the arch.
_base_ = [
    '../_base_/models/atomnas-a.py',
    '../_base_/datasets/imagenet_bs64_atomnas.py',
    'mmpretrain::_base_/default_runtime.py',
]

custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)

# ---------------------------------------------------------------------------
# Training setup. The values below are derived from it when this file is
# parsed: to train on another number of GPUs or batch size, change these two
# numbers in a copy of this file (``--cfg-options`` cannot re-derive them).
num_gpus = 32
batch_per_gpu = 64
num_train_images = 1281167  # ImageNet-1k train split
# ---------------------------------------------------------------------------
total_batch = num_gpus * batch_per_gpu
# Iterations per epoch as mmengine counts them (DefaultSampler pads each
# rank to ceil(N / num_gpus) samples, the last batch is kept).
iters_per_epoch = -(-(-(-num_train_images // num_gpus)) // batch_per_gpu)
# lr = 0.016 * total_batch / 256. ``auto_scale_lr`` (``--auto-scale-lr``)
# rescales it linearly when the real batch differs from ``total_batch``;
# its base_batch_size is therefore ``total_batch`` (the batch this lr is
# for), which is the same rule as 0.016 at base_batch_size=256.
base_lr = 0.016 * total_batch / 256
# Staircase decay every 2.4 epochs, in iterations: mmengine's StepLR needs an
# integer step, and an epoch-based StepLR with step_size=2.4 never fires
# (``last_step % step_size`` is never 0 once converted to iterations).
# Rounding 2.4 * iters_per_epoch shifts the 145th decay by < 1 epoch.
decay_iters = int(2.4 * iters_per_epoch + 0.5)
# EMA decay 0.9999 per 4096 images; mmengine's momentum is 1 - decay.
ema_momentum = 1 - 0.9999**(total_batch / 4096)

train_dataloader = dict(batch_size=batch_per_gpu)
val_dataloader = dict(batch_size=batch_per_gpu)
test_dataloader = val_dataloader

# optimizer
# The faithful optimizer is TensorFlow's RMSProp (eps inside the square root,
# lr inside the momentum buffer): ``type='atomnas_mm.TFRMSprop'`` from
# atomnas_mm.engine.optimizers, with eps=1e-3 and weight_decay=0 once the
# weight decay is a loss term. Until then torch's RMSprop approximates it:
# eps is outside the square root in torch, sqrt(1e-3) ~= 0.0316 gives the same
# denominator at zero square average. Weight decay 1e-5 is applied by the
# optimizer (same gradient as the loss term 0.5 * wd * w^2, but it also
# decays BN parameters; the reference excludes them). One param group, no
# paramwise_cfg, as the search hooks need.
optim_wrapper = dict(
    optimizer=dict(
        type='RMSprop',
        lr=base_lr,
        alpha=0.9,
        momentum=0.9,
        eps=0.0316,
        weight_decay=1e-5))

# learning policy
# Schedulers compose multiplicatively: a linear warm-up from 0.016 (the
# per-256 lr) to base_lr over 5 epochs, times 0.97 ** (iter // decay_iters)
# counted from iteration 0 (so 2 decays have happened when warm-up ends).
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

# train, val, test setting
train_cfg = dict(by_epoch=True, max_epochs=350, val_interval=1)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=total_batch)

# EMA of the weights and of the BN statistics (update_buffers); validation and
# checkpoints' ``ema_state_dict`` use it. MomentumAnnealingEMA gives the
# reference warm-up decay = min(decay, (1 + t) / (10 + t)), i.e.
# momentum = max(ema_momentum, 9 / (9 + steps)).
custom_hooks = [
    dict(
        type='EMAHook',
        ema_type='MomentumAnnealingEMA',
        momentum=ema_momentum,
        gamma=9,
        update_buffers=True,
        priority='ABOVE_NORMAL')
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=100),
    checkpoint=dict(
        type='CheckpointHook', interval=1, max_keep_ckpts=3,
        save_best='auto'),
)

randomness = dict(seed=1995, deterministic=False)
