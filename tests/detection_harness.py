"""Tiny detection data and child configs of the mmdet configs, and mmdet's
own tools in a subprocess: shared by the detection tests (needs mmdet and
opencv where called)."""
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

import numpy as np

# 32-channel FPN and heads, 2 classes: CPU-fast detectors.
SMALL_HEADS = {
    'retinanet': 'dict(neck=dict(out_channels=32), bbox_head=dict('
                 'num_classes=2, in_channels=32, feat_channels=32, '
                 'stacked_convs=1), test_cfg=dict(score_thr=0.0))',
    'faster-rcnn': 'dict(neck=dict(out_channels=32), rpn_head=dict('
                   'in_channels=32, feat_channels=32), roi_head=dict('
                   'bbox_roi_extractor=dict(out_channels=32), bbox_head=dict('
                   'in_channels=32, fc_out_channels=64, num_classes=2)), '
                   'train_cfg=dict(rpn=dict(sampler=dict(num=64)), '
                   'rcnn=dict(sampler=dict(num=64))), '
                   'test_cfg=dict(rcnn=dict(score_thr=0.0)))',
}


def write_coco(root, n=4, size=64):
    """``n`` noisy ``size``px images with one or two coloured boxes."""
    import cv2
    rng = np.random.default_rng(0)
    os.makedirs(osp.join(root, 'img'), exist_ok=True)
    images, anns = [], []
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for j in range(1 + i % 2):
            x, y = int(rng.integers(0, size // 2)), int(rng.integers(0, 24))
            w, h = int(rng.integers(16, size // 2)), int(rng.integers(16, 36))
            cat = 1 + (i + j) % 2
            img[y:y + h, x:x + w] = (200, 40, 40) if cat == 1 else (40, 40,
                                                                  200)
            anns.append(dict(id=len(anns) + 1, image_id=i + 1,
                             category_id=cat, bbox=[x, y, w, h],
                             area=w * h, iscrowd=0))
        name = f'{i}.jpg'
        cv2.imwrite(osp.join(root, 'img', name), img)
        images.append(dict(id=i + 1, file_name=name, width=size,
                           height=size))
    with open(osp.join(root, 'ann.json'), 'w') as f:
        json.dump(dict(images=images, annotations=anns,
                       categories=[dict(id=1, name='a'),
                                   dict(id=2, name='b')]), f)


def child_config(path, base, data_root, pretrained, head, extra_base=None):
    """A child config: tiny data, 2 classes, 1 epoch of 2 iterations."""
    bases = [base] + ([extra_base] if extra_base else [])
    arch = ''
    if extra_base:   # the snippet documented in the config
        arch = ('arch=dict(_delete_=True, rows=_base_.rows, '
                'stem_channels=_base_.stem_channels, '
                'last_channels=_base_.last_channels, '
                'act_cfg=_base_.act_cfg, se_ratio=_base_.se_ratio), ')
    text = f'''
_base_ = {bases!r}
data_root = {data_root + '/'!r}
metainfo = dict(classes=('a', 'b'))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='PackDetInputs')]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 64), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                          'img_shape', 'scale_factor'))]
data = dict(data_root=data_root, metainfo=metainfo, ann_file='ann.json',
            data_prefix=dict(img='img/'))
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(pipeline=train_pipeline, **data))
val_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                      dataset=dict(pipeline=test_pipeline, **data))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'ann.json')
test_evaluator = val_evaluator
model = dict(backbone=dict({arch}init_cfg=dict(checkpoint={pretrained!r})),
             **{head})
train_cfg = dict(max_epochs=1, val_interval=10)
default_hooks = dict(logger=dict(interval=1))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
log_level = 'WARNING'
'''
    with open(path, 'w') as f:
        f.write(text)
    return path


def mmdet_tool(name, args, cwd):
    """``mmdet/.mim/tools/<name>.py args`` in a subprocess (one thread: the
    tests share 2 cores); returns its log."""
    out = subprocess.run(
        [sys.executable, osp.join(osp.dirname(importlib.util.find_spec('mmdet').origin),
                          '.mim', 'tools', f'{name}.py'), *args],
        cwd=str(cwd), capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    return log
