# Search mmpretrain's own ResNet-50 recipe to a FLOPs budget in one run:
# the stock config, unchanged, plus the two search hooks.
#
#   bash tools/dist_train.sh configs/search/resnet50_8xb32_in1k_search.py 8
#   python tools/test.py configs/search/resnet50_8xb32_in1k_search.py \
#       WORK_DIR/epoch_100.pth            # the unedited config, the narrow net
#
# Channel units (docs/search_any_model.md): each bottleneck's inner widths
# (gated by bn1 and bn2); the stage channels (residual streams) too when
# AtomShrinkHook names ResNetStreamFinder in its finders. The target
# is half of the backbone's 4.1G multiply-adds at 224 px, reached by half of
# training along a linear path; the rest fine-tunes the final net.
_base_ = 'mmpretrain::resnet/resnet50_8xb32_in1k.py'

custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)

# checkpoints written atomically, with the position within the epoch and the
# random states: a kill at any moment resumes exactly (--resume)
default_hooks = dict(checkpoint=dict(type='atomnas_mm.SafeCheckpointHook'))

custom_hooks = [
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-4, warmup_epochs=1),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops=2.05e9),
         deadline=0.5, tolerance=0.02, follow_path=True, interval=500,
         by_epoch=False, input_size=224,
         round_to=8),  # widths on 8: README, "Hardware-aligned widths"
]
