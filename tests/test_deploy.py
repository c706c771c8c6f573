"""Deploy mode: folded BNs and merged kernel groups keep eval outputs."""
import copy

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from atomnas_mm.models import AtomicBlock, AtomNAS
from atomnas_mm.models.block_surgery import remove_atoms
from atomnas_mm.models.deploy import (DeployedAtomicBlock, deploy_model,
                                      merge_depthwise)


def _randomise_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5
    return model


@pytest.mark.parametrize('arch', ['atomnas_a', 'atomnas_b_plus'])
def test_deploy_matches_eval(arch):
    torch.manual_seed(0)
    model = _randomise_bn(AtomNAS(arch=arch, out_indices=(2, 4, 7))).eval()
    before = copy.deepcopy(model.state_dict())
    deployed = deploy_model(model)
    # Pure: the input model is unchanged.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not any(isinstance(m, _BatchNorm) for m in deployed.modules())
    blocks = [m for m in deployed.modules()
              if isinstance(m, DeployedAtomicBlock)]
    assert len(blocks) == 22
    assert not any(isinstance(m, AtomicBlock) for m in deployed.modules())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref, out = model(x), deployed(x)
    for r, o in zip(ref, out):
        assert torch.allclose(r, o, atol=1e-5, rtol=1e-5), \
            (r - o).abs().max()


def test_deploy_channels_last_and_emptied_block():
    torch.manual_seed(0)
    rows = [[16, 1, 1, [3], [16], False],
            [24, 1, 2, [3, 5, 7], [8, 8, 8], True],
            [24, 1, 1, [3, 5, 7], [8, 8, 8], True],
            [24, 1, 1, [5, 7], [4, 4], True]]
    model = _randomise_bn(AtomNAS(arch=dict(rows=rows, stem_channels=16,
                                            last_channels=32),
                                  out_indices=(2, ))).eval()
    remove_atoms(model.layer2[1], torch.zeros(0, dtype=torch.long))
    deployed = deploy_model(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)[-1]
        out = deployed(x)[-1]
        out_cl = deployed.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last))[-1]
    assert torch.allclose(ref, out, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ref, out_cl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('stride', [1, 2])
def test_merge_depthwise(stride):
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=b)
             for c, k, b in [(3, 3, True), (4, 7, False), (2, 5, True)]]
    merged = merge_depthwise(convs)
    assert merged.kernel_size == (7, 7) and merged.groups == 9
    x = torch.randn(1, 9, 11, 11)
    ref = torch.cat([c(p) for c, p in zip(convs, x.split([3, 4, 2], 1))], 1)
    assert torch.allclose(merged(x), ref, atol=1e-6)
