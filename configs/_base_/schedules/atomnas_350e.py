# AtomNAS training recipe (docs/method.md, "Recipe"), shared by the one-pass
# search configs (configs/atomnas_{a,b,c}.py) and the retraining configs.
#
# Scaling with the number of GPUs: nothing to edit. The lr is 0.016 per 256
# images and auto_scale_lr (enabled) multiplies it by total_batch / 256 at
# start-up (8 GPUs x 64: 0.032, 32 GPUs x 64: 0.128); the warm-up, the 0.97
# staircase every 2.4 epochs and the penalty ramp are in epochs, converted with
# the real epoch length; the EMA decay 0.9999 per 4096 images is converted
# with the real world size (BatchScaledEMA). Epochs stay 350.
# Only the warm-up start is tied to 32 GPUs x 64: it starts at lr / 8
# (= 0.016 there, as in the reference); with fewer GPUs it starts higher.
batch_per_gpu = 64

optim_wrapper = dict(
    # TensorFlow-style RMSProp (eps inside the square root, square average
    # initialised to 0). Weight decay is a loss term (BNL1PenaltyHook), so the
    # optimizer keeps weight_decay=0 and ONE param group (no paramwise_cfg:
    # the shrink hook needs a single group).
    optimizer=dict(
        type='atomnas_mm.TFRMSprop',
        lr=0.016,
        alpha=0.9,
        momentum=0.9,
        eps=1e-3,
        weight_decay=0))

param_scheduler = [
    # linear warm-up over 5 epochs (per iteration)
    dict(
        type='LinearLR',
        start_factor=1 / 8,
        by_epoch=True,
        begin=0,
        end=5,
        convert_to_iter_based=True),
    # x0.97 every 2.4 epochs, staircase, counted from iteration 0
    dict(
        type='atomnas_mm.FractionalStepLR',
        step_size=2.4,
        gamma=0.97,
        by_epoch=True,
        begin=0,
        convert_to_iter_based=True),
]

train_cfg = dict(by_epoch=True, max_epochs=350, val_interval=1)
val_cfg = dict()
test_cfg = dict()

auto_scale_lr = dict(base_batch_size=256, enable=True)

ema_hook = dict(
    type='EMAHook',
    ema_type='atomnas_mm.BatchScaledEMA',
    batch_size=batch_per_gpu,
    decay=0.9999,
    images_per_decay=4096,
    update_buffers=True,  # EMA of the BN statistics too
    priority='ABOVE_NORMAL')
weight_decay = 1e-5  # as a loss term 0.5 * wd * sum(w^2), conv/FC only
