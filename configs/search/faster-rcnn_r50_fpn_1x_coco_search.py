# Search the ResNet-50 inside mmdet's own Faster R-CNN to a FLOPs budget
# while the detector trains: the stock config, unchanged, plus the two
# search hooks (mmdet's tools or this repository's):
#
#   bash tools/dist_train.sh configs/search/faster-rcnn_r50_fpn_1x_coco_search.py 8
#   python tools/test.py configs/search/faster-rcnn_r50_fpn_1x_coco_search.py \
#       WORK_DIR/epoch_12.pth             # the unedited config, the narrow net
#
# The inner widths of the bottlenecks of stages 2-4 are searched (stage 1 is
# frozen by the config, frozen units are not searched; the stage outputs
# feed the FPN and stay). The budget counts the backbone alone at 800x800:
# 2/3 of its multiply-adds at half of training. norm_eval keeps the BN
# statistics of the ImageNet checkpoint; the scales still train and gate.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)

# checkpoints written atomically, with the position within the epoch and the
# random states: a kill at any moment resumes exactly (--resume)
default_hooks = dict(checkpoint=dict(type='atomnas_mm.SafeCheckpointHook'))

custom_hooks = [
    dict(type='atomnas_mm.BNL1PenaltyHook', rho=1e-4, warmup_epochs=1),
    dict(type='atomnas_mm.AtomShrinkHook', target=dict(flops=34e9),
         deadline=0.5, tolerance=0.02, follow_path=True, interval=500,
         by_epoch=False, input_size=800,
         round_to=8),  # widths on 8: README, "Hardware-aligned widths"
]
