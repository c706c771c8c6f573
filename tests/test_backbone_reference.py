"""The AtomNAS backbone against an independent float64 reference of the spec.

Complements test_backbone.py (shapes, FLOPs, errors, round trips).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from atomnas_mm.models import ARCHS, AtomNAS
from harness import toy_rows

ZOO = sorted(ARCHS)
STAGE_CHANNELS = [16, 24, 40, 80, 96, 192, 320]
STAGE_STRIDES = [2, 4, 8, 16, 16, 32, 32]


def small_rows():
    """A 3-stage arch with a dropped kernel and an emptied residual block."""
    return toy_rows('dropped')


def small_arch():
    return dict(rows=small_rows(), stem_channels=8, last_channels=32)


def randomize(model, seed=0):
    """Random weights and non-trivial BN statistics (init gives gamma=1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
            elif isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, (2 / fan_in)**0.5, generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=gen)
    return model


def bn(x, norm, start=0, width=None):
    """Eval-mode BatchNorm over channels ``start:start+width`` of ``norm``."""
    width = x.shape[1] if width is None else width
    s = slice(start, start + width)
    return F.batch_norm(x, norm.running_mean[s], norm.running_var[s],
                        norm.weight[s], norm.bias[s], False, 0., norm.eps)


def swish(x):
    return x * torch.sigmoid(x)


def reference_block(block, x, act):
    """docs/method.md, "Search space", per-branch layout: one branch per kernel size.

    Each branch: 1x1 expand (a slice of the block's rows) + BN + act,
    depthwise kxk + BN + act, 1x1 projection; the branch projections are
    summed, then one shared BN and the identity shortcut. SE ("+" nets) gates
    the concatenated depthwise outputs before projection.
    """
    if block.project is None:
        return x + block.bias.view(1, -1, 1, 1)
    starts = [sum(block.hidden[:i]) for i in range(len(block.hidden))]
    branches = []
    for k, h, start in zip(block.kernel_sizes, block.hidden, starts):
        if block.has_expand:
            y = F.conv2d(x, block.expand.conv.weight[start:start + h])
            y = act(bn(y, block.expand.norm, start, h))
        else:
            y = x[:, start:start + h]
        dw = block.dw[f'k{k}']
        y = F.conv2d(y, dw.conv.weight, stride=block.stride, padding=k // 2,
                     groups=h)
        branches.append(act(bn(y, dw.norm)))
    if block.se is not None:
        cat = torch.cat(branches, dim=1)
        s = cat.mean((2, 3), keepdim=True)
        s = act(F.conv2d(s, block.se.conv1.conv.weight,
                         block.se.conv1.conv.bias))
        s = torch.sigmoid(F.conv2d(s, block.se.conv2.conv.weight,
                                   block.se.conv2.conv.bias))
        branches = torch.split(cat * s, block.hidden, dim=1)
    weight = block.project.conv.weight
    out = sum(F.conv2d(y, weight[:, start:start + h])
              for y, h, start in zip(branches, block.hidden, starts))
    out = bn(out, block.project.norm)
    residual = block.stride == 1 and block.in_channels == block.out_channels
    return x + out if residual else out


def reference_backbone(net, x, act):
    """Stem conv 3x3/2 + BN + act, the blocks, head 1x1 conv + BN + act."""
    x = act(bn(F.conv2d(x, net.conv1.conv.weight, stride=2, padding=1),
               net.conv1.norm))
    for block in net.blocks():
        x = reference_block(block, x, act)
    return act(bn(F.conv2d(x, net.conv2.conv.weight), net.conv2.norm))


def measured_atom_flops(net, size=224):
    """Per block, the multiply-adds one atom of each kernel adds, counted by
    the conv/linear/pool hooks on a lone block with and without one atom
    (independent of the cost models)."""
    from atomnas_mm.models import count_flops_params
    from atomnas_mm.models.blocks import AtomicBlock
    out = []
    for block, side in zip(net.blocks(), net.block_input_sizes(size)):
        if not block.searchable:
            out.append(None)
            continue
        shape = (1, block.in_channels, side, side)
        flops = []
        for k, h in block.atom_groups():
            one = [count_flops_params(AtomicBlock(
                block.in_channels, block.out_channels, block.stride, [k],
                [w]), shape)[0] for w in (h, h - 1)]
            flops.append(one[0] - one[1])
        out.append(flops)
    return out


def test_supernet_counts_match_spec():
    net = AtomNAS(arch='supernet')
    blocks = net.blocks()
    searchable = [b for b in blocks if b.has_expand]
    assert len(blocks) == 22 and len(searchable) == 21
    assert sum(len(b.kernel_sizes) for b in searchable) == 63
    assert sum(sum(b.hidden) for b in searchable) == 31392
    assert [len(getattr(net, n)) for n in net.layers] == [1, 4, 4, 4, 4, 4, 1]
    first = blocks[0]
    assert first.expand is None and first.hidden == [32]
    assert first.kernel_sizes == [3]
    for block in searchable:
        assert block.kernel_sizes == [3, 5, 7]
        assert block.hidden == [6 * block.in_channels] * 3
    assert [b.use_res for b in blocks] == [
        b.stride == 1 and b.in_channels == b.out_channels for b in blocks]
    assert sum(b.use_res for b in blocks) == 15


def test_norm_layers_follow_spec():
    net = AtomNAS(arch='atomnas_a_plus')
    norms = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    assert norms
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)
    # No conv bias except in SE (BN follows every other conv).
    for name, m in net.named_modules():
        if isinstance(m, torch.nn.Conv2d) and '.se.' not in name:
            assert m.bias is None, name


@pytest.mark.parametrize('name', ['atomnas_a', 'atomnas_c_plus'])
def test_plus_variants(name):
    net = AtomNAS(arch=name)
    plus = name.endswith('_plus')
    act_type = type(net.conv1.activate).__name__
    assert act_type == ('Swish' if plus else 'ReLU')
    for block in net.blocks():
        assert (block.se is not None) == plus
        if plus:
            se = block.se
            assert se.conv1.conv.out_channels == round(0.5 * block.in_channels)
            assert se.conv1.conv.bias is not None
            assert se.conv2.conv.bias is not None


@pytest.mark.parametrize('name', ['atomnas_b', 'atomnas_a_plus'])
def test_matches_per_branch_reference(name):
    """The fused block equals the per-branch supernet formula (spec 2)."""
    net = randomize(AtomNAS(arch=name)).double().eval()
    act = swish if name.endswith('_plus') else F.relu
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)[0]
        ref = reference_backbone(net, x, act)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_small_arch_with_dropped_kernels():
    net = randomize(AtomNAS(arch=small_arch(), out_indices=(0, 1, 2, 3)))
    net = net.double().eval()
    blocks = net.blocks()
    assert len(blocks) == 6
    assert (blocks[1].kernel_sizes, blocks[1].hidden) == ([3, 7], [12, 6])
    assert blocks[2].project is None and blocks[2].hidden == []
    assert [b.stride for b in blocks[3:5]] == [1, 1]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        outs = net(x)
        ref = reference_backbone(net, x, F.relu)
    assert [tuple(o.shape) for o in outs] == [
        (2, 8, 16, 16), (2, 16, 8, 8), (2, 24, 4, 4), (2, 32, 4, 4)]
    torch.testing.assert_close(outs[-1], ref, rtol=1e-9, atol=1e-9)


def test_plus_arch_dict_round_trip():
    net = AtomNAS(arch='atomnas_b_plus')
    clone = AtomNAS(arch=net.arch_dict())
    assert type(clone.conv1.activate).__name__ == 'Swish'
    assert all(b.se is not None for b in clone.blocks())
    clone.load_state_dict(net.state_dict(), strict=True)


def test_supernet_atom_cost_is_flops_weight():
    """Penalty weight p = f / f_mean, f_mean about 47,106 at 224 px."""
    net = AtomNAS(arch='supernet')
    rows = net.arch_rows()
    costs = measured_atom_flops(net)
    atoms = [(f, h) for row, cost in zip(rows, costs) if cost
             for f, h in zip(cost, row[4])]
    f_mean = sum(f * h for f, h in atoms) / sum(h for _, h in atoms)
    assert f_mean == pytest.approx(47106, abs=1)
    for block, row, cost in zip(net.blocks(), rows, costs):
        if cost is None:
            continue
        expected = torch.cat([torch.full((h, ), f / f_mean)
                              for f, h in zip(cost, row[4])])
        torch.testing.assert_close(block.penalty_weight, expected)


def test_init_weights_starts_gates_at_one():
    net = randomize(AtomNAS(arch='atomnas_a'))
    net.init_weights()
    for block in net.blocks():
        for dw in block.dw.values():
            assert torch.equal(dw.norm.weight, torch.ones_like(dw.norm.weight))
            assert torch.equal(dw.norm.bias, torch.zeros_like(dw.norm.bias))


def test_with_cp_matches_plain():
    torch.manual_seed(0)
    plain = AtomNAS(arch=small_arch()).train()
    ckpt = AtomNAS(arch=small_arch(), with_cp=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert all(b.with_cp for b in ckpt.blocks())
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for net in (plain, ckpt):
        out = net(x)[0]
        out.square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    torch.testing.assert_close(ckpt(x)[0], plain(x)[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


