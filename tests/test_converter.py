"""tools/model_converters/atomnas_to_mm.py on synthetic reference files."""
import importlib.util
import os.path as osp
import pickle

import pytest
import torch
from mmpretrain.registry import MODELS

import atomnas_mm  # noqa: F401

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
BN_KEYS = ('weight', 'bias', 'running_mean', 'running_var',
           'num_batches_tracked')

# 22 blocks like the reference net (stride 2 at blocks 2, 6, 10, 18), tiny
# widths; block 4 is an emptied residual block, block 3 lost kernel 7.
ROWS = ([[8, 1, 1, [3], [8], False],
         [12, 1, 2, [3, 5, 7], [4, 3, 2], True],
         [12, 1, 1, [3, 5], [2, 1], True],
         [12, 1, 1, [], [], True],
         [12, 1, 1, [7], [2], True]]
        + [[16, 1, 2 if i == 0 else 1, [3, 5, 7], [3, 2, 1], True]
           for i in range(4)]
        + [[20, 1, 2 if i == 0 else 1, [3, 5, 7], [2, 2, 2], True]
           for i in range(4)]
        + [[24, 1, 1, [3, 7], [3, 1], True] for i in range(4)]
        + [[28, 1, 2 if i == 0 else 1, [5, 7], [2, 3], True]
           for i in range(4)]
        + [[32, 1, 1, [3, 5, 7], [4, 4, 4], True]])


def load_tool():
    path = osp.join(REPO, 'tools', 'model_converters', 'atomnas_to_mm.py')
    spec = importlib.util.spec_from_file_location('_atomnas_to_mm', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(arch, seed):
    torch.manual_seed(seed)
    model = MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='atomnas_mm.AtomNAS', arch=arch),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=5, in_channels=40)))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(('num_batches_tracked', 'penalty_weight')):
                continue
            if name.endswith(('running_var', '.bn.weight')):
                t.uniform_(0.5, 1.5)
            else:
                t.normal_(0, 0.3)
    return model.eval()


def arch_of(plus):
    arch = dict(rows=ROWS, stem_channels=8, last_channels=40)
    if plus:
        arch.update(act_cfg=dict(type='Swish'), se_ratio=0.5)
    return arch


def to_reference(model, plus):
    """Our state in the reference key layout (docs/method.md, "Reference checkpoints")."""
    sd = model.state_dict()
    ref = {}

    def bn(dst, src, index=slice(None)):
        for k in BN_KEYS:
            v = sd[f'{src}.{k}']
            ref[dst + k] = v if k == 'num_batches_tracked' else v[index]

    ref['features.0.0.weight'] = sd['backbone.conv1.conv.weight']
    bn('features.0.1.', 'backbone.conv1.bn')
    names = {id(m): n for n, m in model.backbone.named_modules()}
    blocks = model.backbone.blocks()
    for i, block in enumerate(blocks, 1):
        p, f = 'backbone.' + names[id(block)], f'features.{i}.'
        if block.project is None:   # identity + constant = BN of zero
            out = f + ('project_conv.1.' if plus else 'pw_bn.')
            ref[out + 'weight'] = torch.ones_like(sd[p + '.bias'])
            ref[out + 'bias'] = sd[p + '.bias']
            ref[out + 'running_mean'] = torch.zeros_like(sd[p + '.bias'])
            ref[out + 'running_var'] = torch.full_like(sd[p + '.bias'],
                                                       1 - 1e-3)
            continue
        if plus:
            if block.expand is not None:
                ref[f + 'expand_conv.0.weight'] = sd[p + '.expand.conv.weight']
                bn(f + 'expand_conv.1.', p + '.expand.bn')
            for j, k in enumerate(block.kernel_sizes):
                d = f'{f}depth_ops.{j}.{0 if i == 1 else 1}.'
                ref[d + '0.weight'] = sd[f'{p}.dw.k{k}.conv.weight']
                bn(d + '1.', f'{p}.dw.k{k}.bn')
            for name, conv in (('se_reduce', 'conv1'), ('se_expand', 'conv2')):
                for t in ('weight', 'bias'):
                    ref[f'{f}se_op.{name}.{t}'] = sd[f'{p}.se.{conv}.conv.{t}']
            ref[f + 'project_conv.0.weight'] = sd[p + '.project.conv.weight']
            bn(f + 'project_conv.1.', p + '.project.bn')
            continue
        start = 0
        for j, (k, h) in enumerate(zip(block.kernel_sizes, block.hidden)):
            sl, o = slice(start, start + h), f'{f}ops.{j}.'
            start += h
            if block.expand is not None:
                ref[o + '0.0.weight'] = sd[p + '.expand.conv.weight'][sl]
                bn(o + '0.1.', p + '.expand.bn', sl)
                dw, proj = o + '1.', o + '2.weight'
            else:
                dw, proj = o + '0.', o + '1.weight'
            ref[dw + '0.weight'] = sd[f'{p}.dw.k{k}.conv.weight']
            bn(dw + '1.', f'{p}.dw.k{k}.bn')
            ref[proj] = sd[p + '.project.conv.weight'][:, sl]
        bn(f + 'pw_bn.', p + '.project.bn')
    head = f'features.{len(blocks) + 1}.'
    ref[head + '0.weight'] = sd['backbone.conv2.conv.weight']
    bn(head + '1.', 'backbone.conv2.bn')
    ref['classifier.1.weight'] = sd['head.fc.weight']
    ref['classifier.1.bias'] = sd['head.fc.bias']
    return {k: v.clone() for k, v in ref.items()}


def reference_file(path, plus, extra=None):
    """A released-style file: noisy 'model', true weights in the shadow."""
    true, noisy = build(arch_of(plus), 0), build(arch_of(plus), 1)
    shadow = {k: v for k, v in to_reference(true, plus).items()
              if not k.endswith('num_batches_tracked')}
    ckpt = dict(model={'module.' + k: v
                       for k, v in to_reference(noisy, plus).items()},
                ema=dict(shadow=shadow, decay=0.9999),
                optimizer={}, last_epoch=349, best_val=0.75)
    if extra:
        ckpt.update(extra)
    torch.save(ckpt, path)
    return true, noisy


class Meter:
    """Stands in for a non-tensor object in a released file."""

    def __init__(self):
        self.value = 1.0


@pytest.mark.parametrize('plus', [False, True], ids=['abc', 'plus'])
def test_convert_matches_logits(tmp_path, plus):
    src, dst = str(tmp_path / 'ref.pth'), str(tmp_path / 'mm.pth')
    true, noisy = reference_file(src, plus)
    load_tool().main([src, dst])

    ckpt = torch.load(dst, weights_only=True)
    arch = ckpt['meta']['atomnas_arch']['backbone']
    assert arch['rows'] == ROWS
    assert (arch['stem_channels'], arch['last_channels']) == (8, 40)
    assert arch.get('se_ratio') == (0.5 if plus else None)
    assert {k.split('.')[0] for k in ckpt['state_dict']} == {'backbone',
                                                             'head'}
    model = build(arch, 2)
    model.load_state_dict(ckpt['state_dict'], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = true(x, mode='tensor')
        torch.testing.assert_close(model(x, mode='tensor'), expected,
                                   rtol=0, atol=1e-5)
        assert not torch.allclose(noisy(x, mode='tensor'), expected,
                                  atol=1e-3)   # the shadow was preferred


def test_unsafe_pickle_refused(tmp_path):
    src, dst = str(tmp_path / 'ref.pth'), str(tmp_path / 'mm.pth')
    true, _ = reference_file(src, False, extra=dict(meters=Meter()))
    tool = load_tool()
    with pytest.raises(pickle.UnpicklingError, match='trust-unsafe-pickle'):
        tool.main([src, dst])
    assert not osp.exists(dst)
    tool.main([src, dst, '--trust-unsafe-pickle'])
    state = torch.load(dst, weights_only=True)['state_dict']
    torch.testing.assert_close(state['head.fc.weight'],
                               true.state_dict()['head.fc.weight'])


def test_not_a_reference_file(tmp_path):
    src = str(tmp_path / 'x.pth')
    torch.save({'state_dict': {'backbone.conv1.weight': torch.zeros(1)}}, src)
    with pytest.raises(ValueError, match='features'):
        load_tool().main([src, str(tmp_path / 'y.pth')])
