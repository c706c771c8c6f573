"""Budget targets: the controller lands on a FLOPs target, resumes exactly,
decides on rank 0, and refuses targets it cannot reach."""
import os
import os.path as osp
import shutil

import pytest
import torch
from mmengine.hooks import Hook

from atomnas_mm.models import AtomNAS, count_flops_params
from harness import (SUPERNET, RecordHook, budget_cfg, build, ddp_cfg,
                     demo_cmd, shrink_hook, spawn_cpu_ddp, supernet_flops)


def test_lands_on_flops_target_by_the_deadline_and_never_below(tmp_path):
    target = 0.6 * supernet_flops()
    runner = build(budget_cfg(str(tmp_path), dict(flops=target)))
    runner.train()
    flops = count_flops_params(runner.model.backbone, (1, 3, 32, 32))[0]
    assert target <= flops <= target * 1.02
    history = shrink_hook(runner).history
    assert history[0]['flops'] == supernet_flops()
    assert all(h['flops'] == h['cost'] >= target for h in history)
    assert history[-1]['flops'] == flops
    # On the target by the deadline (half of training), before the final
    # shrink; from then on the penalty is off.
    landed = next(h['iter'] for h in history if h['flops'] <= target * 1.02)
    assert landed <= runner.max_iters // 2 + 2 < runner.max_iters
    assert shrink_hook(runner).planner.controller.landed
    hub = runner.message_hub
    rhos = hub.get_scalar('train/penalty_rho').data[0]
    assert (rhos[landed:] == 0).all() and (rhos[:landed] > 0).any()
    # Before that the penalty strength is rho (no ramp) times the scale.
    scales = hub.get_scalar('train/budget_scale').data[0]
    assert rhos[0] == pytest.approx(1e-2)  # scale 1 until the first check
    assert rhos[2] == pytest.approx(1e-2 * scales[0])


def test_the_controller_aims_ahead_of_its_path():
    """The scale moves by (live / aim) ** gain, where the aim is the path
    that reaches the target at lead x deadline; it stays <= max_scale."""
    from atomnas_mm.search.budget import BudgetController
    controller = BudgetController(dict(flops=50.), deadline=0.5, lead=0.9)
    controller.initial_cost = 100.
    assert controller.path(0.45) == pytest.approx(55.)
    assert controller.update(50., 0.45) == pytest.approx(1.)  # on the aim
    assert controller.update(55., 0.45) == pytest.approx(1.1 ** 8)
    controller.scale = 1.
    assert controller.path(0.225) == pytest.approx(77.5)  # the aim at 0.2025
    assert controller.update(77.5 * 1.1, 0.225 * 0.9) == pytest.approx(
        1.1 ** 8)
    for _ in range(5):
        controller.update(100., 0.45)
    assert controller.scale == controller.max_scale == 100.
    for bad in (dict(lead=0), dict(lead=1.5), dict(max_scale=0.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BudgetController(dict(flops=50.), **bad)


class KillAtomsAt(Hook):
    """Zero every atom's BN scale after iteration ``at`` (before the check)."""
    priority = 'VERY_HIGH'

    def __init__(self, at):
        self.at = at

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        if runner.iter + 1 == self.at:
            for m in runner.model.backbone.blocks():
                for branch in m.dw.values():
                    branch.norm.weight.data.zero_()


def test_lands_as_soon_as_the_live_net_is_on_the_target(tmp_path):
    """Atoms dead in the live weights before the deadline are removed at
    once when they put the net on the target, not left to regrow while the
    EMA copy (the config's EMAHook) catches up."""
    target = 0.9 * supernet_flops()
    cfg = budget_cfg(str(tmp_path), dict(flops=target))
    runner = build(cfg, [KillAtomsAt(2)])
    runner.train()
    hook = shrink_hook(runner)
    assert runner.max_iters // 2 == 6  # the deadline
    assert hook.history[1]['iter'] == 2
    assert target <= hook.history[1]['cost'] <= target * 1.02
    assert hook.planner.controller.landed
    rhos = runner.message_hub.get_scalar('train/penalty_rho').data[0]
    assert (rhos[2:] == 0).all()


def test_follow_path_keeps_the_net_on_the_path(tmp_path):
    """With follow_path the net is on the controller's linear path after
    every check (within one atom), so the deadline removes one path step,
    not whatever the penalty left."""
    target = 0.6 * supernet_flops()
    cfg = budget_cfg(str(tmp_path), dict(flops=target))
    cfg['custom_hooks'][2]['follow_path'] = True
    runner = build(cfg)
    runner.train()
    hook = shrink_hook(runner)
    checks = [h for h in hook.history[1:]
              if h['iter'] <= runner.max_iters // 2]
    assert [h['iter'] for h in checks] == [2, 4, 6]  # one per check
    for h in checks:
        path = hook.planner.controller.path(h['iter'] / runner.max_iters)
        assert path <= h['cost'] <= path * 1.01, h
    assert hook.planner.controller.landed
    flops = count_flops_params(runner.model.backbone, (1, 3, 32, 32))[0]
    assert target <= flops <= target * 1.02


def test_resume_continues_exactly(tmp_path):
    target = dict(flops=0.6 * supernet_flops())
    full, record = str(tmp_path / 'full'), RecordHook()
    runner = build(budget_cfg(full, target), [record])
    runner.train()
    part = str(tmp_path / 'part')
    os.makedirs(part)
    shutil.copy(osp.join(full, 'epoch_2.pth'), part)
    resumed_record = RecordHook()
    resumed = build(budget_cfg(part, target, resume=True,
                               load_from=osp.join(part, 'epoch_2.pth')),
                    [resumed_record])
    resumed.train()
    assert resumed_record.losses == pytest.approx(record.losses[-4:],
                                                  rel=1e-5)
    assert resumed.model.backbone.arch_rows() == \
        runner.model.backbone.arch_rows()
    assert shrink_hook(resumed).planner.controller.scale == pytest.approx(
        shrink_hook(runner).planner.controller.scale)


@pytest.mark.parametrize('target, match', [
    (dict(flops=1e12), r'target: flops=1e\+12 is outside the reachable '
                       r'range \[\d+, \d+\]'),
    (dict(flops=1.0), r'target: flops=1 is outside the reachable range'),
    (dict(params=1e9), r'target: params=1e\+09 is outside'),
    (dict(flops=272576 / 1.01), r'target: flops=269877 with tolerance 0.02 '
                                r'is met by this model as it is \(272576\)'),
    (dict(latency=3.0), r'target: expected a dict with one key of'),
    (dict(flops=1e6, params=1e5), r'target: expected a dict with one key'),
    (dict(flops='300M'), r"target.flops: must be a finite number"),
])
def test_bad_targets_fail_before_training(tmp_path, target, match):
    record = RecordHook()
    with pytest.raises(ValueError, match=match):
        build(budget_cfg(str(tmp_path), target), [record]).train()
    assert record.losses == []



class PerturbRank1(Hook):
    """On rank 1 only, rescale the gammas before every check, so that only
    a decision broadcast from rank 0 keeps the ranks in step."""
    priority = 'VERY_HIGH'

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None):
        from mmengine.dist import get_rank
        if get_rank() == 1:
            g = torch.Generator().manual_seed(runner.iter)
            for m in runner.model.module.backbone.blocks():
                for branch in m.dw.values():
                    w = branch.norm.weight.data
                    w.mul_(torch.rand(w.shape, generator=g) * 2)


def _worker(rank, work_dir, target):
    cfg = ddp_cfg(budget_cfg(work_dir, target))
    runner = build(cfg, [PerturbRank1()])
    runner.train()
    torch.save(dict(rows=runner.model.module.backbone.arch_rows(),
                    scale=shrink_hook(runner).planner.controller.scale),
               osp.join(work_dir, f'rank{rank}.pth'))


@pytest.mark.slow
def test_ddp_ranks_with_different_gammas_decide_alike(tmp_path):
    target = dict(flops=0.6 * supernet_flops())
    spawn_cpu_ddp(_worker, str(tmp_path), target)
    r0 = torch.load(tmp_path / 'rank0.pth', weights_only=True)
    r1 = torch.load(tmp_path / 'rank1.pth', weights_only=True)
    assert r0 == r1
    assert r0['rows'] != AtomNAS(arch=SUPERNET).arch_rows()


ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.skipif(not osp.isdir('/usr/share/datasets/fashion-mnist'),
                    reason='needs the Debian package dataset-fashion-mnist '
                    '(tools/install.sh installs it when apt is available)')
def test_demo_target_config_lands_through_train_py(tmp_path):
    """The shipped demo target config, shortened, through tools/train.py;
    the target is set from the command line as a user would."""
    import json
    import subprocess
    target = 1.5e6
    work_dir = tmp_path / 'work'
    cmd = demo_cmd(work_dir, tmp_path / 'data', iters_per_epoch=32,
                   val_images=256, warmup_iters=5, config=osp.join(
                       ROOT, 'configs/demo/atomnas_fashion_mnist_target.py'),
                   options=('custom_hooks.1.warmup_epochs=0',
                            'custom_hooks.2.interval=8',
                            f'custom_hooks.2.target.flops={target}',
                            'custom_hooks.3.num_batches=2'))
    out = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(work_dir / 'searched_arch.json') as f:
        arch = json.load(f)['backbone']
    net = AtomNAS(arch=arch)
    flops = count_flops_params(net, (1, 1, 28, 28))[0]
    assert target <= flops <= target * 1.02
    assert 'budget_scale' in out.stdout + out.stderr
