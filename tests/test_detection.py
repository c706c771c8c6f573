"""configs/mmdet: AtomNAS backbones in mmdet, pretrained by atomnas_mm."""
import copy
import importlib.util
import json
import os
import os.path as osp

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope

import atomnas_mm  # noqa: F401
from atomnas_mm.models.archs import get_arch

pytest.importorskip('mmdet', reason='needs mmdet (requirements/mminstall.txt)')
cv2 = pytest.importorskip('cv2', reason='needs opencv')

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = {
    'retinanet': osp.join(REPO, 'configs', 'mmdet',
                          'retinanet_atomnas-a_fpn_1x_coco.py'),
    'faster-rcnn': osp.join(REPO, 'configs', 'mmdet',
                            'faster-rcnn_atomnas-a_fpn_1x_coco.py'),
}
HEADS = {  # child-config text: 2 classes, detections even when untrained
    'retinanet': 'dict(bbox_head=dict(num_classes=2), '
                 'test_cfg=dict(score_thr=0.0))',
    'faster-rcnn': 'dict(roi_head=dict(bbox_head=dict(num_classes=2)), '
                   'test_cfg=dict(rcnn=dict(score_thr=0.0)))',
}


def load_tool(name):
    path = osp.join(REPO, 'tools', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_coco(root, n=4, size=64):
    """``n`` noisy ``size``px images with one or two coloured boxes."""
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


def write_classifier(path, arch, seed=0):
    """An atomnas_mm ImageClassifier checkpoint (random, non-trivial BN)."""
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    torch.manual_seed(seed)
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='atomnas_mm.AtomNAS', arch=arch),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=1280)))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('running_mean'):
                t.normal_(0, 0.1)
            elif name.endswith('running_var'):
                t.uniform_(0.5, 1.5)
    state = model.state_dict()
    arch_dict = model.backbone.arch_dict()
    torch.save(dict(state_dict=state,
                    meta=dict(atomnas_arch=dict(backbone=arch_dict))), path)
    return {k[len('backbone.'):]: v for k, v in state.items()
            if k.startswith('backbone.')}


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


def built_backbone(cfg_path):
    """The detector of ``cfg_path`` after ``init_weights`` (as the Runner)."""
    from mmdet.registry import MODELS
    cfg = Config.fromfile(cfg_path)
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def assert_same(backbone, expected):
    state = backbone.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k


def train(cfg, work_dir):
    """2 iterations with tools/train.py; return the checkpoint."""
    load_tool('train').main([cfg, '--work-dir', work_dir, '--no-validate'])
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    return ckpt


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('coco'))
    write_coco(root)
    return root


@pytest.mark.parametrize('detector', ['retinanet', 'faster-rcnn'])
def test_zoo_backbone(detector, coco, tmp_path):
    pretrained = str(tmp_path / 'atomnas-a_cls.pth')
    expected = write_classifier(pretrained, 'atomnas_a')
    cfg = child_config(str(tmp_path / 'det.py'), CONFIGS[detector], coco,
                       pretrained, HEADS[detector])
    model = built_backbone(cfg)
    assert_same(model.backbone, expected)
    feats = model.backbone(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [24, 40, 96, 320]

    work_dir = str(tmp_path / 'work')
    ckpt = train(cfg, work_dir)
    if detector == 'retinanet':   # the test loop, once
        metrics = load_tool('test').main([cfg, ckpt, '--work-dir', work_dir])
        assert 'coco/bbox_mAP' in metrics


def test_exported_searched_backbone(coco, tmp_path):
    # What tools/export_searched.py writes for a search of the supernet:
    # arch.json and an ImageClassifier checkpoint of the shrunk net.
    arch = get_arch('atomnas_a')
    arch['rows'] = copy.deepcopy(arch['rows'])
    arch['rows'][2] = [24, 1, 1, [3], [7], True]
    arch['rows'][3] = [24, 1, 1, [], [], True]      # emptied residual block
    arch['rows'][9] = [80, 1, 2, [5, 7], [60, 11], True]
    export = tmp_path / 'export'
    export.mkdir()
    pretrained = str(export / 'searched.pth')
    expected = write_classifier(pretrained, arch, seed=1)
    saved = torch.load(pretrained, weights_only=True)
    with open(export / 'arch.json', 'w') as f:
        json.dump(saved['meta']['atomnas_arch']['backbone'], f)

    cfg = child_config(str(tmp_path / 'det.py'), CONFIGS['retinanet'], coco,
                       pretrained, HEADS['retinanet'],
                       extra_base=str(export / 'arch.json'))
    model = built_backbone(cfg)
    assert model.backbone.arch_rows()[3] == [24, 1, 1, [], [], True]
    assert_same(model.backbone, expected)
    ckpt = torch.load(train(cfg, str(tmp_path / 'work')), weights_only=True)
    assert ckpt['state_dict']['backbone.layer2.2.bias'].shape == (24, )
