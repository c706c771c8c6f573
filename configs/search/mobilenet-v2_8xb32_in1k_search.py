# Search mmpretrain's own MobileNetV2 recipe to a FLOPs budget in one run:
# the stock config, unchanged, plus the two search hooks.
#
#   bash tools/dist_train.sh configs/search/mobilenet-v2_8xb32_in1k_search.py 8
#   python tools/test.py configs/search/mobilenet-v2_8xb32_in1k_search.py \
#       WORK_DIR/epoch_300.pth            # the unedited config, the narrow net
#   python tools/export_searched.py WORK_DIR --out export/mbv2_150m
#
# Every expanding inverted residual's hidden channels form one channel unit
# gated by its depthwise BN (docs/search_any_model.md). The penalty pushes
# the units' BN scales to zero; AtomShrinkHook keeps the backbone on a linear
# path from its 300M multiply-adds (224 px) to the target by half of
# training, removing the weakest channels from the model, the optimizer
# state, the EMA copy and the DDP wrapper as it goes; the second half
# fine-tunes the final net. Another budget: --cfg-options
# custom_hooks.1.target.flops=...
_base_ = 'mmpretrain::mobilenet_v2/mobilenet-v2_8xb32_in1k.py'

custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)

# checkpoints written atomically, with the position within the epoch and the
# random states: a kill at any moment resumes exactly (--resume)
default_hooks = dict(checkpoint=dict(type='atomnas_mm.SafeCheckpointHook'))

custom_hooks = [
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-4, warmup_epochs=1),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops=150e6),
         deadline=0.5, tolerance=0.02, follow_path=True, interval=500,
         by_epoch=False, input_size=224,
         round_to=8),  # widths on 8: README, "Hardware-aligned widths"
]
