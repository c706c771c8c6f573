import glob
import os.path as osp
from unittest import mock

import pytest
import torch
import torch.nn as nn
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import DefaultScope
from mmengine.runner import Runner
from mmpretrain.models import ImageClassifier

from atomnas_mm.engine.hooks.penalty_hook import BNL1PenaltyHook
from atomnas_mm.models import AtomNAS
from atomnas_mm.search.policy import LinearRampSchedule
from atomnas_mm.engine.weight_decay import decayed_params, weight_decay_loss
from atomnas_mm.search.penalty import bn_l1_penalty, proximal_l1_step
from harness import ddp_cfg, spawn_cpu_ddp, toy_arch, toy_loader, unique_name

# A fixed first block, two searchable blocks and one emptied residual block.
ARCH = toy_arch('emptied')


def random_gammas(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.randn(m.weight.shape, generator=gen)


def atom_weights(backbone):
    """``{gamma: its atoms' penalty weights p}`` of the searchable blocks."""
    weights = {}
    for block in backbone.blocks():
        if block.searchable:
            gammas = [m.norm.weight for m in block.dw.values()]
            weights.update(zip(gammas, block.penalty_weight.split(
                [len(g) for g in gammas])))
    return weights


def expected_penalty_and_grads(backbone):
    """sum p*|gamma| and d/dgamma = p*sign(gamma), by hand per atom."""
    total, grads = 0.0, {}
    for block in backbone.blocks():
        if not block.searchable:
            continue
        gammas = [m.norm.weight for m in block.dw.values()]
        costs = block.penalty_weight.split([len(g) for g in gammas])
        for gamma, cost in zip(gammas, costs):
            total += float((cost * gamma.detach().abs()).sum())
            grads[gamma] = cost * gamma.detach().sign()
    return total, grads


# ---------------------------------------------------------------- pure funcs

def test_bn_l1_penalty_value_and_gradient():
    backbone = AtomNAS(ARCH, out_indices=(2, ))
    random_gammas(backbone)
    want, want_grads = expected_penalty_and_grads(backbone)
    assert len(want_grads) == 5  # 2 + 3 branches; first block excluded
    rho = 0.3
    loss = rho * bn_l1_penalty(backbone)
    assert loss.item() == pytest.approx(rho * want, rel=1e-6)
    loss.backward()
    for gamma, grad in want_grads.items():
        torch.testing.assert_close(gamma.grad, rho * grad)
    # Nothing else is penalised: first block, expand/project BNs, betas.
    penalised = set(want_grads)
    for p in backbone.parameters():
        if p not in penalised:
            assert p.grad is None


def test_bn_l1_penalty_uses_atom_cost_and_all_backbones():
    backbone = AtomNAS(ARCH, out_indices=(2, ))
    block = backbone.blocks()[1]
    block.penalty_weight.fill_(2.0)
    # gamma = 1
    want = 2.0 * 16 + float(backbone.blocks()[2].penalty_weight.sum())
    assert bn_l1_penalty(backbone).item() == pytest.approx(want, rel=1e-6)
    twice = nn.ModuleDict(dict(a=backbone, b=AtomNAS(ARCH, out_indices=(2, ))))
    other = float(twice['b'].blocks()[1].penalty_weight.sum()
                  + twice['b'].blocks()[2].penalty_weight.sum())
    assert bn_l1_penalty(twice).item() == pytest.approx(want + other,
                                                        rel=1e-6)
    assert bn_l1_penalty(nn.Linear(2, 2)).item() == 0


def test_weight_decay_loss_value_and_gradient():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3),
                          nn.Flatten(), nn.Linear(3, 4))
    conv, bn, fc = model[0], model[1], model[3]
    wd = 0.2
    want = 0.5 * wd * sum(float((w.detach() ** 2).sum())
                          for w in (conv.weight, fc.weight, fc.bias))
    loss = weight_decay_loss(model, wd)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    for w in (conv.weight, fc.weight, fc.bias):
        torch.testing.assert_close(w.grad, wd * w.detach())
    for p in (conv.bias, bn.weight, bn.bias):
        assert p.grad is None
    fc.weight.requires_grad_(False)  # frozen weights are left out
    assert {id(p) for p in decayed_params(model)} == {id(conv.weight),
                                                      id(fc.bias)}


def soft_threshold(gamma, step):
    return gamma.sign() * (gamma.abs() - step).clamp(min=0)


def test_proximal_step_soft_thresholds_with_each_group_lr():
    backbone = AtomNAS(ARCH, out_indices=(2, ))
    random_gammas(backbone)
    costs = atom_weights(backbone)
    gammas = list(costs)  # 5 penalised gammas, in block order
    before = {g: g.detach().clone() for g in gammas}
    first = gammas[0]
    others = [p for p in backbone.parameters()
              if p is not first and p is not gammas[-1]]
    optimizer = torch.optim.SGD([dict(params=[first], lr=0.1),
                                 dict(params=others, lr=0.01)], lr=0.01)
    rho = 3.0
    proximal_l1_step(backbone, optimizer, rho)
    for gamma, lr in zip(gammas[:-1], [0.1] + [0.01] * 3):
        torch.testing.assert_close(
            gamma.detach(), soft_threshold(before[gamma], lr * rho
                                           * costs[gamma]), rtol=0, atol=0)
    assert (first == 0).any() and (first != 0).any()  # some die exactly
    # A gamma the optimizer does not hold is left alone.
    torch.testing.assert_close(gammas[-1].detach(), before[gammas[-1]])


def test_rho_ramp():
    assert LinearRampSchedule(1e-4, 10)(0) == 0
    assert LinearRampSchedule(1e-4, 10)(5) == pytest.approx(5e-5)
    assert LinearRampSchedule(1e-4, 10)(10) == pytest.approx(1e-4)
    assert LinearRampSchedule(1e-4, 10)(1000) == pytest.approx(1e-4)
    assert LinearRampSchedule(1e-4, 0)(0) == pytest.approx(1e-4)


# ---------------------------------------------------------------- runner

class RecordingSGD(torch.optim.SGD):
    """SGD that keeps the grads and params seen at each step, by name."""

    def __init__(self, model):
        self.names = {p: n for n, p in model.named_parameters()}
        self.records = []
        super().__init__(model.parameters(), lr=0.01, momentum=0.9)

    def step(self, closure=None):
        self.records.append({
            self.names[p]: (p.detach().clone(), p.grad.clone())
            for g in self.param_groups for p in g['params']})
        return super().step(closure)


def make_classifier():
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return ImageClassifier(
            backbone=dict(type='atomnas_mm.AtomNAS', arch=ARCH,
                          out_indices=(2, )),
            neck=dict(type='GlobalAveragePooling'),
            head=dict(type='LinearClsHead', num_classes=3, in_channels=32),
            data_preprocessor=dict(type='ClsDataPreprocessor',
                                   mean=[128] * 3, std=[64] * 3))


def train(work_dir, hooks=(), wrapper_cls=OptimWrapper, wrapper_kwargs=None,
          batch_size=4, **cfg):
    """Train the toy classifier with a RecordingSGD; return runner, optim."""
    torch.manual_seed(0)
    model = make_classifier()
    optim = RecordingSGD(model)
    wrapper = wrapper_cls(optimizer=optim, **(wrapper_kwargs or {}))
    cfg.setdefault('train_cfg', dict(by_epoch=False, max_iters=1))
    runner = Runner(
        model=model, work_dir=str(work_dir),
        experiment_name=unique_name('penalty'),
        train_dataloader=toy_loader(n=8, num_classes=3, batch_size=batch_size,
                                    shuffle=False),
        optim_wrapper=wrapper, custom_hooks=list(hooks),
        default_hooks=dict(checkpoint=None,
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0), default_scope='mmpretrain', **cfg)
    runner.train()
    return runner, optim


def penalty_grads(model):
    """Expected d(penalty)/dparam by name (zeros where not penalised)."""
    _, grads = expected_penalty_and_grads(model.backbone)
    by_param = {p: grads.get(p) for p in model.parameters()}
    return {n: by_param[p] for n, p in model.named_parameters()}


def assert_grad_difference(with_hook, without, model, rho, wd=0.0, step=0):
    """Hooked grads == plain grads + rho*p*sign(gamma) (+ wd*w)."""
    expected = penalty_grads(model)
    decayed = {n for n, p in model.named_parameters()
               if any(p is q for q in decayed_params(model))}
    rec_hook, rec_plain = with_hook.records[step], without.records[step]
    assert rec_hook.keys() == rec_plain.keys()
    assert sum(v is not None for v in expected.values()) == 5
    for name, (param, grad) in rec_hook.items():
        plain_param, plain_grad = rec_plain[name]
        torch.testing.assert_close(param, plain_param)  # same init
        extra = torch.zeros_like(grad)
        if expected[name] is not None:
            extra += rho * expected[name]
        if name in decayed:
            extra += wd * param
        torch.testing.assert_close(grad - plain_grad, extra, atol=1e-5,
                                   rtol=1e-4, msg=name)


def read_log(runner):
    files = glob.glob(osp.join(runner.log_dir, '*.log'))
    assert files
    with open(files[0]) as f:
        return f.read()


def test_hook_adds_penalty_and_weight_decay_gradients(tmp_path):
    rho, wd = 0.5, 0.1
    hook = dict(type='atomnas_mm.BNL1PenaltyHook', rho=rho, warmup_epochs=0,
                weight_decay=wd)
    runner, hooked = train(tmp_path / 'hook', hooks=[hook])
    _, plain = train(tmp_path / 'plain')
    assert any(isinstance(h, BNL1PenaltyHook) for h in runner.hooks)
    assert_grad_difference(hooked, plain, runner.model, rho, wd)
    hub = runner.message_hub
    assert hub.get_scalar('train/penalty_rho').current() == pytest.approx(rho)
    assert hub.get_scalar('train/loss_penalty').current() == pytest.approx(
        rho * hub.get_scalar('train/penalty_l1').current())
    assert hub.get_scalar('train/loss_wd').current() > 0
    log = read_log(runner)
    for key in ('loss_penalty:', 'penalty_rho:', 'loss_wd:', 'loss_total:'):
        assert key in log
    # The wrapper is removed after training.
    assert 'update_params' not in vars(runner.optim_wrapper)


def test_hook_ramps_rho_per_iteration_over_epochs(tmp_path):
    # 8 images / batch 4 = 2 iterations per epoch; ramp over 1 epoch.
    hook = BNL1PenaltyHook(rho=0.4, warmup_epochs=1)
    runner, _ = train(tmp_path, hooks=[hook],
                      train_cfg=dict(by_epoch=True, max_epochs=2))
    rhos = runner.message_hub.get_scalar('train/penalty_rho').data[0]
    assert rhos.tolist() == pytest.approx([0.0, 0.2, 0.4, 0.4])
    hook = BNL1PenaltyHook(rho=0.4, warmup_iters=4)
    runner, _ = train(tmp_path, hooks=[hook],
                      train_cfg=dict(by_epoch=False, max_iters=2))
    rhos = runner.message_hub.get_scalar('train/penalty_rho').data[0]
    assert rhos.tolist() == pytest.approx([0.0, 0.1])


def test_hook_with_gradient_accumulation(tmp_path):
    rho = 0.5
    kwargs = dict(wrapper_kwargs=dict(accumulative_counts=2),
                  train_cfg=dict(by_epoch=False, max_iters=2))
    runner, hooked = train(tmp_path, hooks=[BNL1PenaltyHook(
        rho=rho, warmup_epochs=0)], **kwargs)
    _, plain = train(tmp_path, **kwargs)
    assert len(hooked.records) == len(plain.records) == 1  # one step
    # Each of the 2 calls adds penalty / 2: one full penalty per step.
    assert_grad_difference(hooked, plain, runner.model, rho)


def test_proximal_hook_steps_after_the_optimizer_not_in_the_loss(tmp_path):
    """proximal=True: no penalty gradient; after the (one, accumulated)
    optimizer step the gammas are the plain run's, soft-thresholded."""
    rho = 100.0  # lr 0.01 * 100 * p >= 1 = gamma for atoms with p >= 1: 0
    kwargs = dict(wrapper_kwargs=dict(accumulative_counts=2),
                  train_cfg=dict(by_epoch=False, max_iters=2))
    runner, hooked = train(tmp_path, hooks=[BNL1PenaltyHook(
        rho=rho, warmup_epochs=0, proximal=True)], **kwargs)
    plain_runner, plain = train(tmp_path, **kwargs)
    assert len(hooked.records) == len(plain.records) == 1
    assert_grad_difference(hooked, plain, runner.model, rho=0.0)
    assert assert_soft_thresholded(runner, plain_runner, 0.01 * rho) > 0
    hub = runner.message_hub
    assert hub.get_scalar('train/loss_penalty').current() == pytest.approx(
        rho * hub.get_scalar('train/penalty_l1').current())
    # The step hook is removed after training.
    assert not runner.optim_wrapper.optimizer._optimizer_step_post_hooks


def train_with_and_without_bf16(tmp_path, hook):
    """``train`` with ``hook`` and without, both under AmpOptimWrapper bf16.

    mmengine 0.10.7's AmpOptimWrapper asserts a GPU; on CPU its GradScaler
    disables itself and autocast runs bf16 on the CPU. Patch the check.
    """
    kwargs = dict(wrapper_cls=AmpOptimWrapper,
                  wrapper_kwargs=dict(dtype='bfloat16'))
    target = ('mmengine.optim.optimizer.amp_optimizer_wrapper.'
              'is_cuda_available')
    with mock.patch(target, return_value=True):
        return train(tmp_path, hooks=[hook], **kwargs), train(tmp_path,
                                                              **kwargs)


def assert_soft_thresholded(runner, plain_runner, step):
    """Every penalised gamma is the plain run's, soft-thresholded by
    ``step * p``; returns how many are exactly 0."""
    names = {p: n for n, p in runner.model.named_parameters()}
    plain_params = dict(plain_runner.model.named_parameters())
    zeros = 0
    for gamma, cost in atom_weights(runner.model.backbone).items():
        want = soft_threshold(plain_params[names[gamma]].detach(),
                              step * cost)
        torch.testing.assert_close(gamma.detach(), want, rtol=0, atol=1e-6)
        zeros += int((gamma == 0).sum())
    return zeros


def test_proximal_hook_with_amp_bf16_on_cpu(tmp_path):
    """The proximal step follows AmpOptimWrapper's optimizer step."""
    (runner, _), (plain_runner, _) = train_with_and_without_bf16(
        tmp_path, BNL1PenaltyHook(rho=100.0, warmup_epochs=0, proximal=True))
    assert assert_soft_thresholded(runner, plain_runner, 0.01 * 100.0) > 0


def test_hook_with_amp_bf16_on_cpu(tmp_path):
    rho = 0.5
    (runner, hooked), (_, plain) = train_with_and_without_bf16(
        tmp_path, BNL1PenaltyHook(rho=rho, warmup_epochs=0))
    assert isinstance(runner.optim_wrapper, AmpOptimWrapper)
    assert_grad_difference(hooked, plain, runner.model, rho)


# ---------------------------------------------------------------- DDP


def _ddp_worker(rank, work_dir, rho):
    ddp = ddp_cfg(dict())
    ddp['cfg'] = dict(model_wrapper_cfg=ddp.pop('model_wrapper_cfg'))
    runner, hooked = train(osp.join(work_dir, 'hook'), batch_size=2,
                           hooks=[BNL1PenaltyHook(rho=rho, warmup_epochs=0)],
                           **ddp)
    _, plain = train(osp.join(work_dir, 'plain'), batch_size=2, **ddp)
    model = runner.model.module
    torch.save(dict(hooked=hooked.records[0], plain=plain.records[0],
                    expected=penalty_grads(model),
                    loss_penalty=runner.message_hub.get_scalar(
                        'train/loss_penalty').current(),
                    wrapped=type(runner.model).__name__),
               osp.join(work_dir, f'rank{rank}.pt'))


@pytest.mark.slow
def test_hook_under_ddp_gloo(tmp_path):
    rho = 0.5
    # fork: the workers inherit the imports (spawn re-imports for ~30 s).
    spawn_cpu_ddp(_ddp_worker, str(tmp_path), rho, start_method='fork')
    ranks = [torch.load(tmp_path / f'rank{r}.pt')
             for r in range(2)]
    assert ranks[0]['wrapped'] == 'MMDistributedDataParallel'
    assert ranks[0]['loss_penalty'] > 0
    assert ranks[0]['loss_penalty'] == pytest.approx(ranks[1]['loss_penalty'])
    for name, (_, grad) in ranks[0]['hooked'].items():
        torch.testing.assert_close(grad, ranks[1]['hooked'][name][1],
                                   msg=name)  # DDP averaged them
        extra = ranks[0]['expected'][name]
        diff = grad - ranks[0]['plain'][name][1]
        want = rho * extra if extra is not None else torch.zeros_like(diff)
        torch.testing.assert_close(diff, want, atol=1e-5, rtol=1e-4,
                                   msg=name)


def test_rho_follows_runner_iter_for_resume():
    from types import SimpleNamespace

    from mmengine.logging import MessageHub
    backbone = AtomNAS(ARCH, out_indices=(2, ))
    hook = BNL1PenaltyHook(rho=0.4, warmup_iters=10)
    runner = SimpleNamespace(iter=5, model=backbone, message_hub=MessageHub(
        unique_name('penalty')))
    loss = hook.extra_loss(runner)
    assert loss.item() == pytest.approx(0.2 * bn_l1_penalty(backbone).item())
    assert runner.message_hub.get_scalar('train/penalty_rho').current() == 0.2
