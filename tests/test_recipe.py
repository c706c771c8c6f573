"""Recipe building blocks: FractionalStepLR, BatchScaledEMA,
DropoutLinearClsHead."""
import math

import pytest
import torch
from mmengine.optim.scheduler import StepLR
from mmengine.registry import MODELS, PARAM_SCHEDULERS, init_default_scope
from mmpretrain.models.heads import LinearClsHead

import atomnas_mm.engine.ema as ema_module
from atomnas_mm.engine import BatchScaledEMA, FractionalStepLR
from atomnas_mm.models import DropoutLinearClsHead


def _optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler, optimizer, num_steps):
    lrs = []
    for _ in range(num_steps):
        lrs.append(optimizer.param_groups[0]['lr'])
        scheduler.step()
    return lrs


# ---------------------------------------------------------------- schedulers
def test_fractional_step_staircase():
    optimizer = _optimizer()
    scheduler = FractionalStepLR(optimizer, step_size=2.5, gamma=0.5,
                                 by_epoch=False)
    lrs = _lrs(scheduler, optimizer, 12)
    # decays at 3, 5, 8, 10 (first iteration past each multiple of 2.5)
    assert lrs == pytest.approx([0.5**math.floor(t / 2.5) for t in range(12)])
    assert lrs[:6] == pytest.approx([1, 1, 1, 0.5, 0.5, 0.25])


def test_fractional_step_from_epochs():
    """2.4 epochs of 7 iterations: a step of 16.8 iterations (staircase)."""
    optimizer = _optimizer()
    scheduler = PARAM_SCHEDULERS.build(
        dict(type='atomnas_mm.FractionalStepLR', step_size=2.4, gamma=0.97,
             by_epoch=True, convert_to_iter_based=True),
        default_args=dict(optimizer=optimizer, epoch_length=7))
    assert isinstance(scheduler, FractionalStepLR)
    assert scheduler.step_size == pytest.approx(2.4 * 7)  # 16.8, fractional
    lrs = _lrs(scheduler, optimizer, 60)
    expected = [0.97**math.floor(t / 16.8) for t in range(60)]
    assert lrs == pytest.approx(expected)
    assert lrs[16] == 1 and lrs[17] == pytest.approx(0.97)
    assert lrs[34] == pytest.approx(0.97**2)  # 33.6 -> 34, not 2 * 17
    # mmengine's StepLR never decays with that step (t % 16.8 != 0)
    optimizer = _optimizer()
    plain = StepLR.build_iter_from_epoch(optimizer, step_size=2.4,
                                         gamma=0.97, epoch_length=7)
    assert set(_lrs(plain, optimizer, 60)) == {1.0}


@pytest.mark.parametrize('begin,end', [(0, 1000), (2, 17)])
def test_integer_step_equals_mmengine_steplr(begin, end):
    opt_a, opt_b = _optimizer(0.3), _optimizer(0.3)
    ours = FractionalStepLR(opt_a, step_size=3, gamma=0.9, begin=begin,
                            end=end, by_epoch=False)
    ref = StepLR(opt_b, step_size=3, gamma=0.9, begin=begin, end=end,
                 by_epoch=False)
    assert _lrs(ours, opt_a, 25) == pytest.approx(_lrs(ref, opt_b, 25),
                                                  rel=1e-12)


def test_fractional_step_resume():
    optimizer = _optimizer()
    scheduler = FractionalStepLR(optimizer, step_size=2.5, gamma=0.5,
                                 by_epoch=False)
    full = _lrs(scheduler, optimizer, 12)
    optimizer = _optimizer()
    first = FractionalStepLR(optimizer, step_size=2.5, gamma=0.5,
                             by_epoch=False)
    head = _lrs(first, optimizer, 4)
    state, lr = first.state_dict(), optimizer.param_groups[0]['lr']
    optimizer = _optimizer(lr)
    for group in optimizer.param_groups:
        group['initial_lr'] = 1.0
    resumed = FractionalStepLR(optimizer, step_size=2.5, gamma=0.5,
                               by_epoch=False, last_step=3)
    resumed.load_state_dict(state)
    assert head + _lrs(resumed, optimizer, 8) == pytest.approx(full)


# ----------------------------------------------------------------------- EMA
@pytest.mark.parametrize('world_size', [1, 8, 32])
@pytest.mark.parametrize('batch_size', [64, 128])
def test_batch_scaled_ema_momentum(world_size, batch_size, monkeypatch):
    monkeypatch.setattr(ema_module, 'get_world_size', lambda: world_size)
    ema = BatchScaledEMA(torch.nn.Linear(2, 2), batch_size=batch_size)
    total = world_size * batch_size
    assert ema.total_batch == total
    assert ema.momentum == pytest.approx(1 - 0.9999**(total / 4096),
                                         rel=1e-9)
    assert ema.gamma == 9  # the reference's (1 + t) / (10 + t) warm-up


def test_batch_scaled_ema_arguments(monkeypatch):
    monkeypatch.setattr(ema_module, 'get_world_size', lambda: 4)
    model = torch.nn.Linear(2, 2)
    ema = MODELS.build(dict(type='atomnas_mm.BatchScaledEMA', model=model,
                            batch_size=32, decay=0.99, images_per_decay=64,
                            gamma=3, interval=2, update_buffers=True))
    assert isinstance(ema, BatchScaledEMA)
    assert ema.momentum == pytest.approx(1 - 0.99**2)  # 128 / 64 = 2
    assert ema.gamma == 3 and ema.interval == 2 and ema.update_buffers


def test_batch_scaled_ema_without_distributed():
    # no process group: world size 1
    ema = BatchScaledEMA(torch.nn.Linear(2, 2), batch_size=256)
    assert ema.total_batch == 256
    assert ema.momentum == pytest.approx(1 - 0.9999**(256 / 4096))


def test_batch_scaled_ema_update(monkeypatch):
    monkeypatch.setattr(ema_module, 'get_world_size', lambda: 32)
    model = torch.nn.Linear(1, 1, bias=False)
    ema = BatchScaledEMA(model, batch_size=64)
    decay = 0.9999**0.5
    ema.steps.fill_(10**6)  # past the warm-up
    with torch.no_grad():
        ema.module.weight.fill_(0.)
        model.weight.fill_(1.)
    ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(1 - decay, rel=1e-4)


@pytest.mark.parametrize('decay', [0, 1, 1.5, -0.1])
def test_batch_scaled_ema_bad_decay(decay):
    with pytest.raises(ValueError, match='decay'):
        BatchScaledEMA(torch.nn.Linear(2, 2), batch_size=64, decay=decay)


# ---------------------------------------------------------------------- head
def _heads(rate, num_classes=5, in_channels=16):
    torch.manual_seed(0)
    ours = DropoutLinearClsHead(dropout_rate=rate, num_classes=num_classes,
                                in_channels=in_channels)
    ref = LinearClsHead(num_classes=num_classes, in_channels=in_channels)
    ref.load_state_dict(ours.state_dict())  # same keys: fc.weight, fc.bias
    return ours, ref


def test_dropout_head_train_mode_drops():
    head, ref = _heads(0.5)
    feats = (torch.randn(8, 16) + 3, )
    head.train()
    torch.manual_seed(1)
    pre = head.pre_logits(feats)
    dropped = pre == 0
    assert 0 < dropped.sum() < pre.numel()
    # inverted dropout: kept features scaled by 1 / (1 - p)
    torch.testing.assert_close(pre[~dropped], 2 * feats[0][~dropped])
    torch.manual_seed(1)
    out = head(feats)
    assert not torch.allclose(out, ref.eval()(feats))
    torch.manual_seed(2)
    assert not torch.allclose(out, head(feats))  # stochastic


@pytest.mark.parametrize('rate', [0.0, 0.2, 0.28])
def test_dropout_head_eval_equals_linear_head(rate):
    head, ref = _heads(rate)
    feats = (torch.randn(3, 16), torch.randn(4, 16))  # uses the last
    head.eval(), ref.eval()
    torch.testing.assert_close(head(feats), ref(feats))
    torch.testing.assert_close(head.pre_logits(feats), feats[-1])
    # the loss / predict interface is LinearClsHead's
    preds = head.predict(feats)
    assert len(preds) == 4 and preds[0].pred_score.shape == (5, )


def test_dropout_head_zero_rate_train_equals_linear_head():
    head, ref = _heads(0.0)
    feats = (torch.randn(4, 16), )
    torch.testing.assert_close(head.train()(feats), ref.train()(feats))


def test_dropout_head_from_config():
    init_default_scope('mmpretrain')
    head = MODELS.build(dict(type='atomnas_mm.DropoutLinearClsHead',
                             dropout_rate=0.28, num_classes=10,
                             in_channels=8))
    assert isinstance(head, DropoutLinearClsHead)
    assert head.dropout.p == 0.28


@pytest.mark.parametrize('rate', [-0.1, 1.0, 1.5])
def test_dropout_head_bad_rate(rate):
    with pytest.raises(ValueError, match='dropout_rate'):
        DropoutLinearClsHead(dropout_rate=rate, num_classes=5,
                             in_channels=16)
