import math

import pytest
import torch
import torch.nn as nn
from mmengine.optim import build_optim_wrapper
from mmengine.optim.scheduler import LinearLR, MultiStepMomentum

from atomnas_mm.engine.optimizers.tf_rmsprop import TFRMSprop


def hand_rmsprop(p, grads, lrs, alpha=0.9, momentum=0.9, eps=1e-3, wd=0.0):
    """TF RMSProp on python floats, one step per (grad, lr)."""
    p, ms, mom = list(p), [0.0] * len(p), [0.0] * len(p)
    for g, lr in zip(grads, lrs):
        for i in range(len(p)):
            gi = g[i] + wd * p[i]
            ms[i] = alpha * ms[i] + (1 - alpha) * gi * gi
            mom[i] = momentum * mom[i] + lr * gi / math.sqrt(ms[i] + eps)
            p[i] -= mom[i]
    return p, ms, mom


GRADS = [[0.5, -1.0, 0.02], [0.1, 2.0, -0.3], [-0.7, 0.0, 0.4]]
LRS = [0.1, 0.05, 0.2]


@pytest.mark.parametrize('momentum,wd', [(0.9, 0.0), (0.0, 0.0), (0.9, 0.1)])
def test_three_steps_match_hand_computation(momentum, wd):
    init = [1.0, -2.0, 0.5]
    p = nn.Parameter(torch.tensor(init, dtype=torch.float64))
    opt = TFRMSprop([p], lr=LRS[0], momentum=momentum, weight_decay=wd)
    for g, lr in zip(GRADS, LRS):
        opt.param_groups[0]['lr'] = lr  # lr changes between steps
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    want_p, want_ms, want_mom = hand_rmsprop(init, GRADS, LRS,
                                             momentum=momentum, wd=wd)
    torch.testing.assert_close(p.data, torch.tensor(want_p, dtype=p.dtype))
    state = opt.state[p]
    torch.testing.assert_close(state['square_avg'],
                               torch.tensor(want_ms, dtype=p.dtype))
    if momentum:
        torch.testing.assert_close(state['momentum_buffer'],
                                   torch.tensor(want_mom, dtype=p.dtype))
    else:
        assert 'momentum_buffer' not in state


def test_first_step_differs_from_torch_rmsprop():
    # eps inside the sqrt and ms from 0: step 1 is lr * g / sqrt(0.1 g^2 + eps)
    p = nn.Parameter(torch.tensor([1.0]))
    opt = TFRMSprop([p], lr=0.1)
    p.grad = torch.tensor([0.01])
    opt.step()
    want = 1.0 - 0.1 * 0.01 / math.sqrt(0.1 * 1e-4 + 1e-3)
    assert p.item() == pytest.approx(want, rel=1e-6)


def test_skips_params_without_grad_and_state_is_tensors():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    opt = TFRMSprop([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.data, torch.ones(2)) and b not in opt.state
    sd = opt.state_dict()
    assert all(isinstance(v, torch.Tensor)
               for s in sd['state'].values() for v in s.values())
    opt2 = TFRMSprop([a, b], lr=0.1)
    opt2.load_state_dict(sd)
    torch.testing.assert_close(opt2.state[a]['square_avg'],
                               opt.state[a]['square_avg'])


@pytest.mark.parametrize('kwargs', [dict(lr=-1), dict(alpha=1.0),
                                    dict(eps=-1e-3), dict(momentum=-0.1)])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        TFRMSprop([nn.Parameter(torch.ones(1))], **kwargs)


def test_optim_wrapper_and_schedulers_drive_lr_and_momentum():
    model = nn.Linear(2, 1, bias=False)
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type='atomnas_mm.TFRMSprop', lr=0.1)))
    assert isinstance(wrapper.optimizer, TFRMSprop)
    group = wrapper.optimizer.param_groups[0]
    assert (group['alpha'], group['momentum'], group['eps'],
            group['weight_decay']) == (0.9, 0.9, 1e-3, 0.0)
    lr_sched = LinearLR(wrapper, start_factor=0.5, by_epoch=False,
                        end=3)
    mom_sched = MultiStepMomentum(wrapper, milestones=[1], gamma=0.5,
                                  by_epoch=False)
    init = [1.0, -1.0]
    model.weight.data = torch.tensor([init])
    x = torch.tensor([[1.0, 2.0]])
    grads, lrs, moms = [], [], []
    for _ in range(3):
        lrs.append(group['lr'])
        moms.append(group['momentum'])
        loss = (model(x) ** 2).sum()
        grads.append((2 * model(x).detach() * x)[0].tolist())
        wrapper.update_params(loss)
        lr_sched.step()
        mom_sched.step()
    assert lrs == pytest.approx([0.05, 0.075, 0.1])
    assert moms == pytest.approx([0.9, 0.45, 0.45])
    # Replay by hand with the varying lr and momentum.
    p, ms, mom = list(init), [0.0, 0.0], [0.0, 0.0]
    for g, lr, m in zip(grads, lrs, moms):
        for i in range(2):
            ms[i] = 0.9 * ms[i] + 0.1 * g[i] ** 2
            mom[i] = m * mom[i] + lr * g[i] / math.sqrt(ms[i] + 1e-3)
            p[i] -= mom[i]
    torch.testing.assert_close(model.weight.data[0], torch.tensor(p))
