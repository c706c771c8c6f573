# The whole AtomNAS method on Fashion-MNIST, on a CPU, in minutes:
#
#   .venv/bin/python tools/train.py configs/demo/atomnas_fashion_mnist.py
#
# A supernet sized for 28x28 grey images (3 kernel sizes per block, about
# 3.9M multiply-adds) is trained with the FLOPs-weighted L1 penalty on its
# atoms' BN scales; AtomShrinkHook removes dead atoms every 100 iterations,
# so the FLOPs fall in the log (`backbone_flops`) while it trains. The network
# left at the end is the searched one: work_dirs/atomnas_fashion_mnist/ gets
# searched_arch.json, arch.png and flops.png (the latest), and one
# arch_<iter>.png / flops_<iter>.png per shrink under
# <timestamp>/vis_data/vis_image/. Export it with tools/export_searched.py.
# Data: Debian package `dataset-fashion-mnist` (/usr/share/datasets/...),
# unpacked once into ./data/fashion-mnist/ (cache_dir below, 53 MB).
_base_ = ['../_base_/default_runtime.py']

custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)

# The demo search space as a stage table (docs/method.md, "Search space"):
# [expand_ratio, out_channels, depth, first stride, kernel_sizes]
supernet_stages = [
    [1, 16, 1, 1, [3]],
    [3, 24, 2, 2, [3, 5, 7]],
    [3, 40, 2, 2, [3, 5, 7]],
    [3, 64, 1, 1, [3, 5, 7]],
]
image_size = 28

model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=10, mean=[72.94], std=[90.02]),
    backbone=dict(
        type='atomnas_mm.AtomNAS',
        arch=dict(stages=supernet_stages, stem_channels=16, last_channels=256),
        in_channels=1),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='atomnas_mm.DropoutLinearClsHead',
        dropout_rate=0.1,
        num_classes=10,
        in_channels=256,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1,
                  mode='original'),
        topk=(1, )))

dataset = dict(type='atomnas_mm.FashionMNIST',
               data_root='/usr/share/datasets/fashion-mnist',
               cache_dir='data/fashion-mnist')
train_dataloader = dict(
    batch_size=128,
    num_workers=2,
    persistent_workers=True,
    pin_memory=False,
    dataset=dict(
        **dataset,
        split='train',
        pipeline=[
            dict(type='RandomFlip', prob=0.5, direction='horizontal'),
            dict(type='PackInputs')
        ]),
    sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(
    batch_size=256,
    num_workers=2,
    persistent_workers=True,
    pin_memory=False,
    # Image files (inference) are read as 3 equal BGR channels: keep one.
    dataset=dict(**dataset, split='test',
                 pipeline=[dict(type='RandomGrayscale', prob=1.0,
                                channel_weights=(1., 0., 0.)),
                           dict(type='PackInputs')]),
    sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# SGD keeps the penalty's per-step move (lr * rho * p) far below the 1e-3
# death threshold, so collapsed scales settle under it.
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.1, momentum=0.9, nesterov=True,
                   weight_decay=0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, T_max=4,
         convert_to_iter_based=True),
]
train_cfg = dict(by_epoch=True, max_epochs=4, val_interval=1)
val_cfg = dict()
test_cfg = dict()

custom_hooks = [
    dict(type='EMAHook', momentum=0.05, update_buffers=True,
         priority='ABOVE_NORMAL'),
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=3e-3, warmup_epochs=0.5,
         weight_decay=4e-5),
    dict(type='atomnas_mm.AtomShrinkHook', threshold=1e-3,
         min_removed_flops=2e4, interval=100, by_epoch=False,
         input_size=image_size),
    dict(type='atomnas_mm.BNRecalibrationHook', num_batches=10),
]

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(type='atomnas_mm.SafeCheckpointHook', interval=1,
                    max_keep_ckpts=1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0, deterministic=False)
