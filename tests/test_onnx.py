"""ONNX export (atomnas_mm.export, tools/deployment/pytorch2onnx.py):
dynamic batch, onnxruntime agreement, the model's own input channels."""
import copy
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmpretrain.registry import MODELS

import atomnas_mm  # noqa: F401
from atomnas_mm.export import build_from_checkpoint, export_onnx, verify_onnx

pytest.importorskip('onnx', reason='needs the onnx package '
                    '(requirements/tests.txt)')
ort = pytest.importorskip('onnxruntime', reason='needs onnxruntime '
                          '(requirements/tests.txt)')

SHAPE = 48


def export(cfg, ckpt, out, shape=(SHAPE, SHAPE)):
    """What the tool does: build, export, verify; the max errors."""
    model = build_from_checkpoint(cfg, ckpt)
    module = export_onnx(model, out, shape)
    return verify_onnx(module, out, shape)


def write_model(tmp_path, arch, config_arch=None, in_channels=None):
    """A config (with ``config_arch``) and a checkpoint (with ``arch``)."""
    backbone = dict(type='atomnas_mm.AtomNAS', arch=config_arch or arch)
    if in_channels is not None:
        backbone['in_channels'] = in_channels
    model_cfg = dict(
        type='ImageClassifier',
        backbone=backbone,
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=7, in_channels=32))
    cfg_path = str(tmp_path / 'model.py')
    Config(dict(model=model_cfg, default_scope='mmpretrain',
                custom_imports=dict(imports=['atomnas_mm']))).dump(cfg_path)
    torch.manual_seed(0)
    model = MODELS.build(dict(model_cfg, backbone=dict(
        model_cfg['backbone'], arch=arch)))
    with torch.no_grad():   # non-trivial BN statistics
        for name, t in model.state_dict().items():
            if name.endswith(('running_mean', '.bn.bias')):
                t.normal_(0, 0.2)
            elif name.endswith('running_var'):
                t.uniform_(0.5, 1.5)
    ckpt_path = str(tmp_path / 'model.pth')
    torch.save(dict(state_dict=model.state_dict(),
                    meta=dict(atomnas_arch=dict(backbone=arch))), ckpt_path)
    return cfg_path, ckpt_path, model.eval()


@pytest.mark.parametrize('plus', [False, True], ids=['relu', 'plus'])
def test_onnx_matches_pytorch(tmp_path, tiny_arch, plus):
    arch = copy.deepcopy(tiny_arch)
    if plus:
        arch.update(act_cfg=dict(type='Swish'), se_ratio=0.5)
    # The config names the unshrunk arch, the checkpoint a shrunk one (as a
    # search checkpoint would): the tool builds the stored arch.
    shrunk = copy.deepcopy(arch)
    shrunk['rows'][2] = [24, 1, 1, [3, 7], [2, 1], True]
    cfg, ckpt, model = write_model(tmp_path, shrunk, config_arch=arch)
    out = str(tmp_path / 'model.onnx')
    errors = export(cfg, ckpt, out)
    assert set(errors) == {1, 3}
    assert max(errors.values()) < 1e-4, errors

    # Independent check against the model we wrote (batch 1 and 3).
    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape[0] == 'batch'
    for n in (1, 3):
        x = torch.randn(n, 3, SHAPE, SHAPE)
        with torch.no_grad():
            expected = model(x, mode='tensor').numpy()
        got = session.run(None, {'input': x.numpy()})[0]
        assert got.shape == (n, 7)
        assert abs(got - expected).max() < 1e-4


def test_grey_input(tmp_path, tiny_arch):
    """A 1-channel net (config ``in_channels=1``, checkpoint arch without
    it, as before ``in_channels`` was an arch key) exports as [N, 1, H, W]."""
    cfg, ckpt, model = write_model(tmp_path, tiny_arch, in_channels=1)
    out = str(tmp_path / 'grey.onnx')
    errors = export(cfg, ckpt, out, (28, 28))
    assert max(errors.values()) < 1e-4, errors
    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape[1:] == [1, 28, 28]


def test_missing_checkpoint(tmp_path, tiny_arch):
    cfg, _, _ = write_model(tmp_path, tiny_arch)
    with pytest.raises(FileNotFoundError, match='CHECKPOINT'):
        build_from_checkpoint(cfg, str(tmp_path / 'none.pth'))
