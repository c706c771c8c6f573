"""``type='atomnas_mm.AtomNAS'`` from mmpretrain and mmdet configs."""
import os.path as osp
import subprocess
import sys
import textwrap

import mmdet
import pytest
import torch
from mmdet.registry import MODELS as DET_MODELS
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData
from mmpretrain.registry import MODELS as PRETRAIN_MODELS

from atomnas_mm.models import AtomNAS
from atomnas_mm.registry import MODELS

BACKBONE = dict(type='atomnas_mm.AtomNAS', arch='atomnas_a',
                out_indices=(1, 2, 4, 6))


def test_registered_in_own_registry():
    assert MODELS.scope == 'atomnas_mm'
    assert MODELS.get('AtomNAS') is AtomNAS


@pytest.mark.parametrize('scope, registry', [
    ('mmpretrain', PRETRAIN_MODELS), ('mmdet', DET_MODELS)])
def test_build_from_downstream_registry(scope, registry):
    with DefaultScope.overwrite_default_scope(scope):
        backbone = registry.build(BACKBONE)
    assert type(backbone) is AtomNAS
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [24, 40, 96, 320]


# Run in a fresh interpreter: nothing imports atomnas_mm before the build, so
# mmengine must find it from the ``atomnas_mm.`` prefix alone.
FRESH_BUILD = textwrap.dedent('''
    import sys
    from mmengine.registry import DefaultScope
    from {scope}.registry import MODELS
    assert 'atomnas_mm' not in sys.modules
    with DefaultScope.overwrite_default_scope('{scope}'):
        model = MODELS.build(dict(type='atomnas_mm.AtomNAS',
                                  arch='atomnas_a', out_indices=(2, 7)))
    print(type(model).__module__, type(model).__name__,
          model.arch_rows()[1], sep=';')
''')


@pytest.mark.parametrize('scope', ['mmpretrain', 'mmdet'])
def test_build_without_import(scope):
    result = subprocess.run(
        [sys.executable, '-c', FRESH_BUILD.format(scope=scope)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    module, name, row = result.stdout.strip().splitlines()[-1].split(';')
    assert (module, name) == ('atomnas_mm.models.backbones.atomnas',
                              'AtomNAS')
    assert row == '[24, 1, 2, [3, 5, 7], [16, 12, 9], True]'


def retinanet_cfg():
    """mmdet's RetinaNet R50-FPN model config with an AtomNAS-A backbone."""
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', '_base_',
                    'models', 'retinanet_r50_fpn.py')
    model = Config.fromfile(path).model
    model.backbone = BACKBONE
    model.neck.in_channels = [24, 40, 96, 320]
    return model


@pytest.fixture(scope='module')
def retinanet():
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = DET_MODELS.build(retinanet_cfg())
    assert type(model.backbone) is AtomNAS
    return model


def det_batch(model, training):
    sample = DetDataSample(metainfo=dict(img_shape=(256, 256),
                                         ori_shape=(256, 256),
                                         scale_factor=(1.0, 1.0)))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[40., 50., 160., 200.]]),
        labels=torch.tensor([3]))
    image = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    return model.data_preprocessor(
        dict(inputs=[image], data_samples=[sample]), training)


def test_retinanet_tensor_forward(retinanet):
    retinanet.eval()
    data = det_batch(retinanet, training=False)
    with torch.no_grad():
        cls_scores, bbox_preds = retinanet(**data, mode='tensor')
    assert [tuple(s.shape) for s in cls_scores] == [
        (1, 9 * 80, 256 // s, 256 // s) for s in (8, 16, 32, 64, 128)]
    assert [s.shape[1] for s in bbox_preds] == [9 * 4] * 5


def test_retinanet_loss_backward(retinanet):
    retinanet.train()
    data = det_batch(retinanet, training=True)
    losses = retinanet(**data, mode='loss')
    loss, _ = retinanet.parse_losses(losses)
    assert {'loss_cls', 'loss_bbox'} <= set(losses)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grad = retinanet.backbone.layer2[0].expand.conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
