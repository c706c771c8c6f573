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


def matches_pytorch(out, model, batches):
    """Assert the ONNX file ``out`` gives ``model``'s logits (1e-4) at every
    batch size of ``batches``; return its session."""
    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    for n in batches:
        x = torch.randn(n, 3, SHAPE, SHAPE)
        with torch.no_grad():
            expected = model(x, mode='tensor').numpy()
        got = session.run(None, {'input': x.numpy()})[0]
        assert got.shape == (n, 7)
        assert abs(got - expected).max() < 1e-4
    return session


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
    assert matches_pytorch(out, model, (1, 3)).get_inputs()[0].shape[0] == \
        'batch'


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


# -- the ONNX Runtime form (issue 21) -------------------------------------------
from atomnas_mm.models import AtomicBlock  # noqa: E402
from atomnas_mm.models.deploy_onnx import (choose_parts, onnx_block,  # noqa
                                           pad_channels)

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))


def randomise(module, seed=0):
    """Non-trivial BN statistics and affine parameters, eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.3
            m.running_mean = torch.randn(n, generator=g) * 0.3
            m.running_var = torch.rand(n, generator=g) + 0.5
    return module.eval()


def test_pad_channels():
    t = torch.arange(6.).view(3, 2)
    padded = pad_channels(t, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], t)
    assert not padded[3:].any()
    assert torch.equal(pad_channels(t, 4, dim=1)[:, :2], t)
    assert pad_channels(t, 3) is t
    with pytest.raises(ValueError, match='do not fit'):
        pad_channels(t, 2)


def test_choose_parts():
    block = AtomicBlock(16, 24, 2, [3, 5, 7], [11, 5, 3])
    assert choose_parts(block, 'split') == [[0], [1], [2]]
    assert choose_parts(block, 'merged') == [[0, 1, 2]]
    # Without alignment or a cost per part, merging only adds zero taps.
    assert choose_parts(block, 'auto', 1, 64, overhead=0) == [[0], [1], [2]]
    # A huge cost per part merges everything.
    assert choose_parts(block, 'auto', 16, 64, overhead=1e12) == [[0, 1, 2]]
    # Aligned to 16, the 5x5 and 7x7 groups (5 + 3 channels) share a part.
    assert choose_parts(block, 'auto', 16, 64, overhead=0) == [[0], [1, 2]]
    with pytest.raises(ValueError, match='merge must be one of'):
        choose_parts(block, 'fused')


@pytest.mark.parametrize('merge', ['auto', 'split', 'merged'])
@pytest.mark.parametrize('align', [1, 8, 16])
@pytest.mark.parametrize('kind', ['stride2', 'residual_se'])
def test_onnx_block_equals_the_block(merge, align, kind):
    torch.manual_seed(0)
    if kind == 'stride2':
        block = AtomicBlock(16, 24, 2, [3, 5, 7], [11, 5, 3])
    else:
        block = AtomicBlock(24, 24, 1, [3, 5, 7], [9, 17, 2], se_channels=6,
                            act_cfg=dict(type='Swish'))
    block = randomise(block)
    form = onnx_block(block, 15 * 15, align, merge)
    assert all(w % align == 0 for w in form.widths), form.widths
    assert sum(form.widths) >= sum(block.hidden)
    assert len(form.widths) == {'split': 3, 'merged': 1}.get(
        merge, len(form.widths))
    x = torch.randn(2, block.in_channels, 15, 15)
    with torch.no_grad():
        ref, out = block(x), form(x)
    assert ref.abs().max() > 0.1
    assert torch.allclose(ref, out, atol=1e-5, rtol=1e-5), \
        (ref - out).abs().max()


@pytest.mark.slow  # a subprocess through tools/deployment/pytorch2onnx.py
def test_onnx_tool_pads_and_matches_pytorch(tmp_path, tiny_arch):
    """Through tools/deployment/pytorch2onnx.py: the graph holds no Split,
    every depthwise conv after an expand conv has a multiple of 16 channels
    (zero channels added: more than the arch's), and onnxruntime equals the
    PyTorch model at batch 1 and 4 (dynamic batch), also for an emptied
    residual block."""
    import subprocess
    import sys

    import onnx
    arch = copy.deepcopy(tiny_arch)
    arch['rows'].insert(3, [24, 1, 1, [3, 5], [0, 0], True])  # emptied
    cfg, ckpt, model = write_model(tmp_path, arch)
    out = str(tmp_path / 'tool.onnx')
    run = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'deployment',
                                  'pytorch2onnx.py'), cfg, ckpt, '--out', out,
         '--shape', str(SHAPE), '--verify'],
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith('max'))
    assert all(float(e) < 1e-4 for e in
               line.split(': ', 1)[1].replace('batch 1: ', '')
               .replace('batch 3: ', '').split(', ')), line

    graph = onnx.load(out).graph
    assert 'Split' not in {n.op_type for n in graph.node}
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    dw = [shapes[n.input[1]][0] for n in graph.node if n.op_type == 'Conv'
          and any(a.name == 'group' and a.i > 1 for a in n.attribute)]
    # The first block has no expand conv (its 8 input channels are given).
    assert dw[0] == 8 and dw[1:] and all(c % 16 == 0 for c in dw[1:]), dw
    assert sum(dw[1:]) > sum(sum(r[4]) for r in arch['rows'][1:])

    matches_pytorch(out, model, (1, 4))


@pytest.mark.slow  # a subprocess through tools/deployment/pytorch2onnx.py
def test_onnx_tool_refuses_a_bad_align(tmp_path, tiny_arch):
    import subprocess
    import sys
    cfg, ckpt, _ = write_model(tmp_path, tiny_arch)
    run = subprocess.run(
        [sys.executable, osp.join(REPO, 'tools', 'deployment',
                                  'pytorch2onnx.py'), cfg, ckpt, '--out',
         str(tmp_path / 'x.onnx'), '--align', '0'],
        capture_output=True, text=True, timeout=600)
    assert run.returncode != 0 and '--align must be >= 1' in run.stderr
