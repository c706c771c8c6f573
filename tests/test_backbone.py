"""Tests of the AtomNAS backbone, the fused block and the zoo data."""
import pytest
import torch
import torch.nn.functional as F
from mmengine.registry import DefaultScope
from mmpretrain.registry import MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from atomnas_mm.models import (ARCHS, PUBLISHED, AtomicBlock, AtomNAS,
                               count_flops_params)
from harness import toy_rows

ZOO = sorted(ARCHS)
SEARCHED = [name for name in ZOO if name != 'supernet']
STAGE_CHANNELS = [16, 24, 40, 80, 96, 192, 320, 1280]

# AtomNAS-A as published (docs/method.md, "Zoo"), typed in independently of
# atomnas_mm.models.archs.
PUBLISHED_A_ROWS = [
    [16, 1, 1, [3], [16], False], [24, 1, 2, [3, 5, 7], [16, 12, 9], True],
    [24, 1, 1, [3, 5, 7], [19, 2, 1], True],
    [24, 1, 1, [3, 5, 7], [9, 7, 1], True], [24, 1, 1, [3, 5], [14, 1], True],
    [40, 1, 2, [3, 5, 7], [46, 49, 50], True],
    [40, 1, 1, [3, 5, 7], [27, 19, 14], True],
    [40, 1, 1, [3, 5, 7], [22, 11, 3], True],
    [40, 1, 1, [3, 5, 7], [30, 14, 3], True],
    [80, 1, 2, [3, 5, 7], [127, 130, 111], True],
    [80, 1, 1, [3, 5, 7], [33, 25, 45], True],
    [80, 1, 1, [3, 5, 7], [38, 12, 34], True],
    [80, 1, 1, [3, 5, 7], [53, 23, 19], True],
    [96, 1, 1, [3, 5, 7], [344, 196, 168], True],
    [96, 1, 1, [3, 5, 7], [44, 18, 27], True],
    [96, 1, 1, [3, 5, 7], [37, 29, 18], True],
    [96, 1, 1, [3, 5, 7], [52, 21, 24], True],
    [192, 1, 2, [3, 5, 7], [381, 364, 342], True],
    [192, 1, 1, [3, 5, 7], [123, 76, 162], True],
    [192, 1, 1, [3, 5, 7], [179, 107, 212], True],
    [192, 1, 1, [3, 5, 7], [238, 111, 171], True],
    [320, 1, 1, [3, 5, 7], [654, 495, 546], True],
]


def shapes(module):
    """Map state_dict keys to shapes."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------
# Forward / backward and the mmpretrain backbone options
# --------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ZOO)
def test_forward_backward(arch):
    model = AtomNAS(arch)
    model.train()
    outs = model(torch.randn(2, 3, 32, 32))
    assert isinstance(outs, tuple) and len(outs) == 1
    assert outs[0].shape == (2, 1280, 1, 1)
    outs[0].mean().backward()
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_out_indices_stages():
    model = AtomNAS('atomnas_a', out_indices=(1, 2, 4, 6))
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [24, 40, 96, 320]
    assert [o.shape[2] for o in outs] == [16, 8, 4, 2]


def test_out_indices_all():
    model = AtomNAS('atomnas_b', out_indices=tuple(range(8)))
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == STAGE_CHANNELS
    assert [o.shape[2] for o in outs] == [32, 16, 8, 4, 4, 2, 2, 2]


def test_default_out_indices_is_head(tiny_arch):
    outs = AtomNAS(tiny_arch)(torch.randn(1, 3, 32, 32))
    assert len(outs) == 1 and outs[0].shape == (1, 32, 4, 4)


@pytest.mark.parametrize('frozen_stages', [0, 3, 7])
def test_frozen_stages(frozen_stages):
    model = AtomNAS('atomnas_a', frozen_stages=frozen_stages)
    model.train()
    frozen = [model.conv1] + [getattr(model, f'layer{i}')
                              for i in range(1, frozen_stages + 1)]
    free = [getattr(model, f'layer{i}')
            for i in range(frozen_stages + 1, 8)] + [model.conv2]
    for module in frozen:
        assert all(not m.training for m in module.modules())
        assert all(not p.requires_grad for p in module.parameters())
    for module in free:
        assert all(m.training for m in module.modules())
        assert all(p.requires_grad for p in module.parameters())


def test_frozen_stages_keep_bn_stats():
    model = AtomNAS('atomnas_a', frozen_stages=1)
    model.train()
    before = model.layer1[0].dw['k3'].norm.running_mean.clone()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.layer1[0].dw['k3'].norm.running_mean, before)


@pytest.mark.parametrize('norm_eval', [True, False])
def test_norm_eval(norm_eval):
    model = AtomNAS('atomnas_a', norm_eval=norm_eval)
    model.train()
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(m.training is not norm_eval for m in norms)
    assert model.conv1.conv.training
    before = model.layer7[0].project.norm.running_var.clone()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    after = model.layer7[0].project.norm.running_var
    assert torch.equal(after, before) is norm_eval


# --------------------------------------------------------------------------
# Cost against the published table
# --------------------------------------------------------------------------
@pytest.mark.parametrize('arch', ZOO)
def test_flops_params_match_published(arch):
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        classifier = MODELS.build(dict(
            type='ImageClassifier',
            backbone=dict(type='atomnas_mm.AtomNAS', arch=arch),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=1000,
                      in_channels=1280)))
    flops, params = count_flops_params(classifier, (1, 3, 224, 224))
    published = PUBLISHED[arch]
    assert abs(flops - published['flops']) <= 0.005 * published['flops']
    assert abs(params - published['params']) <= 0.05e6


# --------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------
def rows_with(index, row):
    """The tiny arch rows with row ``index`` replaced."""
    rows = toy_rows('tiny')[:2]
    rows[index] = row
    return dict(rows=rows, stem_channels=8, last_channels=32)


@pytest.mark.parametrize('kwargs, match', [
    (dict(arch='atomnas_z'), r"arch: unknown arch 'atomnas_z'"),
    (dict(arch=dict(stem_channels=16)), r"arch: .*'stem_channels': 16"),
    (dict(arch=dict(rows=[])), r'arch: rows must be a non-empty list'),
    (dict(arch=rows_with(1, [24, 1, 2, [3, 5], [8, 4]])),
     r'arch: row 1 must be .*got \[24, 1, 2, \[3, 5\], \[8, 4\]\]'),
    (dict(arch=rows_with(1, [24, 1, 2, [3, 4], [8, 4], True])),
     r'arch: row 1 kernel size 4 must be a positive odd int'),
    (dict(arch=rows_with(1, [24, 1, 2, [3, -3], [8, 4], True])),
     r'arch: row 1 kernel size -3 must be a positive odd int'),
    (dict(arch=rows_with(1, [24, 1, 2, [3, 5], [8], True])),
     r'arch: row 1 kernel_sizes \[3, 5\] and hidden_per_kernel \[8\] '
     r'differ in length'),
    (dict(arch=rows_with(1, [24, 1, 2, [3, 5], [8, -1], True])),
     r'arch: row 1 hidden width -1 must be a non-negative int'),
    (dict(arch=rows_with(1, [24, 1, 2, [3, 3], [8, 4], True])),
     r'arch: row 1 kernel_sizes \[3, 3\] repeat a kernel size'),
    (dict(arch=rows_with(1, [24, 1, 3, [3, 5], [8, 4], True])),
     r'arch: row 1 stride must be 1 or 2, got 3'),
    (dict(arch=rows_with(1, [0, 1, 2, [3, 5], [8, 4], True])),
     r'arch: row 1 out_channels must be a positive int, got 0'),
    (dict(arch=rows_with(1, [24, 0, 2, [3, 5], [8, 4], True])),
     r'arch: row 1 repeats must be a positive int, got 0'),
    (dict(arch=rows_with(0, [16, 1, 1, [3], [12], False])),
     r'stem_channels: 8 does not match .* hidden \[12\]'),
    (dict(out_indices=(8, )), r'out_indices: 8 must be in range\(0, 8\)'),
    (dict(out_indices=(-1, )), r'out_indices: -1 must be in range\(0, 8\)'),
    (dict(frozen_stages=8),
     r'frozen_stages: 8 must be in range\(-1, 8\)'),
    (dict(frozen_stages=-2),
     r'frozen_stages: -2 must be in range\(-1, 8\)'),
])
def test_invalid_arguments(kwargs, match):
    kwargs.setdefault('arch', 'atomnas_a')
    with pytest.raises(ValueError, match=match):
        AtomNAS(**kwargs)


def test_invalid_block_widths():
    with pytest.raises(ValueError, match=r'hidden: .* got \[0, 0\]'):
        AtomicBlock(16, 24, 2, [3, 5], [0, 0])
    with pytest.raises(ValueError,
                       match=r'hidden: .*in_channels \(16\), got \[8\]'):
        AtomicBlock(16, 16, 1, [3], [8], has_expand=False)


# --------------------------------------------------------------------------
# Fused block == per-branch sum (docs/method.md, "Search space")
# --------------------------------------------------------------------------
def randomise_norms(module, generator):
    """Give every BN random running stats and affine parameters."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=generator))
            m.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=generator))
            m.bias.data.copy_(torch.randn(n, generator=generator))


def bn(x, norm):
    """Eval-mode batch norm with the statistics of ``norm``."""
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight,
                        norm.bias, False, 0.0, norm.eps)


def per_branch_reference(block, x, kernel_sizes, hidden):
    """The block in the per-branch layout, built from the fused weights.

    Branch k: its own 1x1 expand conv (rows of the fused expand weight) + BN
    + ReLU, depthwise kxk + BN + ReLU, its own projection (columns of the
    fused projection weight). Branch outputs are summed, then one shared BN,
    then the identity shortcut when the block has one.
    """
    total, start = 0, 0
    for k, h in zip(kernel_sizes, hidden):
        if h == 0:
            continue
        rows = slice(start, start + h)
        start += h
        if block.expand is not None:
            expand = block.expand
            w_e = expand.conv.weight[rows]
            norm = expand.norm
            y = F.conv2d(x, w_e)
            y = F.batch_norm(y, norm.running_mean[rows],
                             norm.running_var[rows], norm.weight[rows],
                             norm.bias[rows], False, 0.0, norm.eps)
            y = F.relu(y)
        else:
            y = x[:, rows]
        dw = block.dw[f'k{k}']
        y = F.conv2d(y, dw.conv.weight, None, block.stride, k // 2, 1, h)
        y = F.relu(bn(y, dw.norm))
        w_p = block.project.conv.weight[:, rows]
        total = total + F.conv2d(y, w_p)
    out = bn(total, block.project.norm)
    return x + out if block.use_res else out


@pytest.mark.parametrize('in_ch, out_ch, stride, kernels, hidden, expand', [
    (16, 16, 1, [3, 5, 7], [8, 4, 6], True),     # residual
    (16, 16, 1, [3, 5, 7], [8, 0, 6], True),     # absent middle kernel
    (16, 16, 1, [3, 5, 7], [0, 0, 6], True),     # one kernel left
    (16, 24, 2, [3, 5, 7], [5, 7, 3], True),     # stride 2, no residual
    (16, 24, 2, [3, 5, 7], [5, 0, 3], True),     # stride 2, absent kernel
    (16, 16, 1, [3], [16], False),               # first block, no expand
])
def test_fused_block_equals_branch_sum(in_ch, out_ch, stride, kernels,
                                       hidden, expand):
    generator = torch.Generator().manual_seed(0)
    block = AtomicBlock(in_ch, out_ch, stride, kernels, hidden,
                        has_expand=expand, norm_cfg=dict(type='BN', eps=1e-3))
    with torch.no_grad():
        randomise_norms(block, generator)
    block.eval()
    live = [k for k, h in zip(kernels, hidden) if h]
    assert block.kernel_sizes == live
    assert block.hidden == [h for h in hidden if h]
    assert block.use_res == (stride == 1 and in_ch == out_ch)
    x = torch.randn(2, in_ch, 9, 9, generator=generator)
    with torch.no_grad():
        out = block(x)
        expected = per_branch_reference(block, x, kernels, hidden)
    assert out.shape == (2, out_ch, (9 + stride - 1) // stride,
                         (9 + stride - 1) // stride)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Architecture rows round trip
# --------------------------------------------------------------------------
def test_atomnas_a_rows_are_published():
    model = AtomNAS('atomnas_a')
    assert model.arch_rows() == PUBLISHED_A_ROWS
    assert model.stem_channels == 16 and model.last_channels == 1280


@pytest.mark.parametrize('arch', SEARCHED)
def test_searched_rows_are_zoo_rows(arch):
    assert AtomNAS(arch).arch_rows() == ARCHS[arch]['rows']


@pytest.mark.parametrize('arch', ZOO + ['tiny'])
def test_arch_dict_round_trip(arch, tiny_arch):
    """``AtomNAS(arch=m.arch_dict())`` is the same network: rows, weights
    (a strict load) and outputs."""
    torch.manual_seed(0)
    out_indices = (1, 3) if arch == 'tiny' else (7, )
    model = AtomNAS(tiny_arch if arch == 'tiny' else arch,
                    out_indices=out_indices).eval()
    rebuilt = AtomNAS(model.arch_dict(), out_indices=out_indices).eval()
    assert rebuilt.arch_rows() == model.arch_rows()
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model(x), rebuilt(x)):
            torch.testing.assert_close(a, b)
