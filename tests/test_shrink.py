"""Shrink surgery as pure functions: exactness, optimizer, EMA, reshaping."""
import copy

import pytest
import torch
from mmengine.model import ExponentialMovingAverage

from atomnas_mm.models import AtomNAS
from atomnas_mm.search import (FLOPsCost, apply_plan, plan_shrink,
                               removed_cost, reshape_to_arch, shrink_model,
                               shrink_optimizer)
from harness import ROWS, toy_arch



def small_net(seed=0):
    torch.manual_seed(seed)
    net = AtomNAS(arch=toy_arch())
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return net


def kill_atoms(net, empty_residual=True):
    """Zero gammas: a whole kernel and 2 atoms of layer2.0 (stride 2), all
    of the residual layer2.1, all but a weak one of the non-residual
    layer3.0."""
    b = net.blocks()
    with torch.no_grad():
        b[1].dw['k5'].norm.weight.zero_()
        b[1].dw['k3'].norm.weight[:2] = 0
        for m in b[2].dw.values():
            m.norm.weight[:6 if empty_residual else 5].zero_()
        for m in b[3].dw.values():
            m.norm.weight.zero_()
        b[3].dw['k5'].norm.weight[3] = 1e-4 if empty_residual else 0.5


def test_plan_rules():
    net = small_net()
    kill_atoms(net)
    plan = plan_shrink(net)
    assert plan['layer2.0'].tolist() == [2, 3, 4, 5] + list(range(12, 18))
    assert plan['layer2.1'].tolist() == []          # residual: may empty
    assert plan['layer3.0'].tolist() == [8 + 3]     # strongest atom kept
    assert 'layer3.1' not in plan
    # EMA veto: an atom alive in the EMA weights survives.
    ema = copy.deepcopy(net)
    ema.blocks()[1].dw['k5'].norm.weight.data.fill_(0.5)
    assert plan_shrink(net, ema_model=ema)['layer2.0'].tolist() == \
        [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    # Final shrink: the EMA weights alone decide.
    ema_only = plan_shrink(small_net(1), ema_model=net, ema_only=True)
    assert ema_only.keys() == plan.keys()


def test_shrink_exact_in_eval():
    net = small_net()
    kill_atoms(net)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    before = net(x)[0]
    report = shrink_model(net)
    after = net(x)[0]
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    assert report['removed'] == {'layer2.0': 8, 'layer2.1': 18, 'layer3.0': 15}
    rows = net.arch_rows()
    assert rows[1] == [12, 1, 2, [3, 7], [4, 6], True]     # emptied kernel
    assert rows[2] == [12, 1, 1, [], [], True]             # identity block
    assert rows[3] == [16, 1, 2, [5], [1], True]           # kept one atom
    # Without folding the constants the outputs do change.
    net2 = small_net()
    kill_atoms(net2)
    net2.eval()
    shrink_model(net2, fold=False)
    assert not torch.allclose(before, net2(x)[0], atol=1e-3)


def test_shrunk_net_round_trips_through_rows():
    net = small_net()
    kill_atoms(net)
    shrink_model(net)
    rebuilt = AtomNAS(arch=net.arch_dict())
    rebuilt.load_state_dict(net.state_dict())
    net.eval(), rebuilt.eval()
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(net(x)[0], rebuilt(x)[0])


def test_atom_costs_travel_with_atoms():
    net = small_net()
    kill_atoms(net)
    cost = net.blocks()[1].penalty_weight.clone()
    plan = plan_shrink(net)
    shrink_model(net)
    assert torch.equal(net.blocks()[1].penalty_weight, cost[plan['layer2.0']])


def test_removed_cost():
    net = small_net()
    kill_atoms(net)
    plan = plan_shrink(net)
    # layer2.0: in 8 @16px, out 12 @8px; k3 atoms: 8*256 + 9*64 + 12*64.
    k3 = 8 * 256 + 9 * 64 + 12 * 64
    k5 = 8 * 256 + 25 * 64 + 12 * 64
    only_l20 = {'layer2.0': plan['layer2.0']}
    assert removed_cost(net, only_l20, FLOPsCost(32)) == 2 * k3 + 6 * k5


def _train_step(net, opt, x):
    opt.zero_grad()
    net(x)[0].square().mean().backward()
    opt.step()


@pytest.mark.parametrize('opt_type', ['rmsprop', 'adam'])
def test_optimizer_continuity(opt_type):
    """The step after a shrink equals the unshrunk step on surviving atoms.

    (In train mode an emptied residual block adds its eval-mode constant,
    not the BN bias the unshrunk block gives, so none is emptied here.)
    """
    net = small_net()
    build = {'rmsprop': lambda p: torch.optim.RMSprop(p, lr=0.01, eps=1e-3,
                                                      momentum=0.9),
             'adam': lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-3)}[opt_type]
    opt = build(net.parameters())
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        _train_step(net, opt, x)
    kill_atoms(net, empty_residual=False)
    small = copy.deepcopy(net)
    small_opt = build(small.parameters())
    small_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    plan = plan_shrink(small)
    renamed = apply_plan(small, plan)
    shrink_optimizer(small_opt, small, renamed)
    assert small_opt.param_groups[0]['params'] == list(small.parameters())
    _train_step(net, opt, x)
    _train_step(small, small_opt, x)
    big = net.blocks()[1]
    keep = plan['layer2.0']
    sb = small.blocks()[1]
    assert torch.allclose(sb.expand.conv.weight, big.expand.conv.weight[keep],
                          atol=1e-5, rtol=1e-4)
    assert torch.allclose(sb.project.conv.weight,
                          big.project.conv.weight[:, keep], atol=1e-5, rtol=1e-4)
    assert torch.allclose(sb.dw['k7'].conv.weight, big.dw['k7'].conv.weight,
                          atol=1e-5, rtol=1e-4)
    assert torch.allclose(small.conv2.conv.weight, net.conv2.conv.weight,
                          atol=1e-5, rtol=1e-4)
    # State of surviving params was carried, not reset.
    state = small_opt.state[sb.expand.conv.weight]
    assert any(torch.is_tensor(v) and v.dim() and v.abs().sum() > 0
               for v in state.values())


def test_ema_follows_with_values_kept():
    net = small_net()
    ema = ExponentialMovingAverage(net, momentum=0.5, update_buffers=True)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1)
    ema.update_parameters(net)
    ema.update_parameters(net)
    kill_atoms(net)
    kill_atoms(ema.module)
    old = ema.module.blocks()[1].expand.conv.weight.clone()
    plan = plan_shrink(net, ema_model=ema.module)
    apply_plan(net, plan)
    apply_plan(ema.module, plan)
    ema.avg_parameters = ema.module.state_dict()
    assert torch.equal(ema.module.blocks()[1].expand.conv.weight,
                       old[plan['layer2.0']])
    ema.update_parameters(net)  # shapes agree after the shrink
    assert ema.module.arch_rows() == net.arch_rows()


def test_reshape_to_arch_and_errors():
    net = small_net()
    kill_atoms(net)
    shrink_model(net)
    fresh = small_net(3)
    reshape_to_arch(fresh, {'': net.arch_dict()})
    assert fresh.arch_rows() == net.arch_rows()
    fresh.load_state_dict(net.state_dict())
    with pytest.raises(ValueError, match='block 1: kernel 3 needs 6 atoms, the model has 4'):
        reshape_to_arch(net, {'': small_net().arch_dict()})
    with pytest.raises(ValueError, match="no AtomNAS at 'backbone'"):
        reshape_to_arch(net, {'backbone': net.arch_dict()})


def test_mismatched_checkpoint_is_refused():
    net = small_net()
    kill_atoms(net)
    shrink_model(net)
    # A wider net cannot be loaded into a narrower one.
    with pytest.raises(ValueError, match='another architecture'):
        net.load_state_dict(small_net().state_dict())
    other = AtomNAS(arch=dict(rows=ROWS[:1] + [[12, 1, 2, [3, 5, 9], [6, 6, 6],
                                                True]] + ROWS[2:],
                              stem_channels=8, last_channels=32))
    with pytest.raises(ValueError, match='another architecture'):
        other.load_state_dict(small_net().state_dict())


def test_narrower_state_dict_reshapes_on_load():
    """A checkpoint of a shrunk net loads into the supernet it came from."""
    net = small_net()
    kill_atoms(net)
    shrink_model(net)
    fresh = small_net(3)
    fresh.load_state_dict(net.state_dict())
    assert fresh.arch_dict() == net.arch_dict()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x)[0], net.eval()(x)[0])


def test_block_gammas_order():
    net = small_net()
    b = net.blocks()[1]
    assert torch.equal(b.gammas()[6:12], b.dw['k5'].norm.weight)
