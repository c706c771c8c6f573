# Faster R-CNN with an AtomNAS-A backbone (ImageNet-pretrained by atomnas_mm)
# on COCO, the mmdet 1x schedule. Run with this repository's tools (they import
# atomnas_mm):
#   python tools/train.py configs/mmdet/faster-rcnn_atomnas-a_fpn_1x_coco.py
#
# Fill in `pretrained`: an atomnas_mm ImageClassifier checkpoint of AtomNAS-A
# (trained with configs/retrain/atomnas-a_in1k.py, or converted from a
# released reference file by tools/model_converters/atomnas_to_mm.py). Only
# its `backbone.*` weights are used. A child config or --cfg-options must set
# `model.backbone.init_cfg.checkpoint` (re-assigning `pretrained` in a child
# config does not reach the already built `init_cfg`).
#
# A searched net exported by tools/export_searched.py (arch.json and a .pth in
# its --out dir) as the backbone: a child config that adds arch.json to
# `_base_` (mmengine reads JSON bases; their keys become top-level variables)
# and passes its fields on. `_delete_=True` replaces the zoo name 'atomnas_a':
#
#   _base_ = ['/path/to/configs/mmdet/faster-rcnn_atomnas-a_fpn_1x_coco.py',
#             '/path/to/export/arch.json']
#   model = dict(backbone=dict(
#       arch=dict(_delete_=True, rows=_base_.rows,
#                 stem_channels=_base_.stem_channels,
#                 last_channels=_base_.last_channels,
#                 act_cfg=_base_.act_cfg, se_ratio=_base_.se_ratio),
#       init_cfg=dict(checkpoint='/path/to/export/<name>.pth')))
#
# AtomNAS searches never change the block output channels: out_indices and
# the FPN in_channels below hold for every searched net of its supernet.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['atomnas_mm'], allow_failed_imports=False)
default_scope = 'mmdet'

pretrained = 'checkpoints/atomnas-a_in1k.pth'  # fill in (see above)

model = dict(
    backbone=dict(
        _delete_=True,
        type='atomnas_mm.AtomNAS',
        arch='atomnas_a',
        # Stages 1, 2, 4, 6: 24, 40, 96, 320 channels at strides 4, 8, 16, 32.
        out_indices=(1, 2, 4, 6),
        frozen_stages=-1,
        norm_eval=True,  # 2 images per GPU: keep the ImageNet BN statistics
        init_cfg=dict(
            type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=[24, 40, 96, 320]))

# Checkpoints written atomically (a kill cannot leave a broken last one).
default_hooks = dict(checkpoint=dict(type='atomnas_mm.SafeCheckpointHook'))
